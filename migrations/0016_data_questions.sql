-- pgsynapse 0016: questions about the data (issue 19). An application INSERTs a question into data_questions; a
-- trigger queues an `sql_answer` job; the worker generates one SELECT with a local model (or an endpoint), checks it
-- with a PostgreSQL parser (textsql/safety.py), runs it as the read-only role pgsynapse_reader in a READ ONLY
-- transaction with a statement timeout and row / byte limits, writes the statement and the result on the row and
-- announces it on pgsynapse_data_answers. Corrections (sql_corrections) become training pairs; an `sql_retrain` job
-- fine-tunes the SQL model, gates it by execution accuracy and registers it in sql_models, which is routed, promoted
-- and rolled back like the text model versions. SQL models have their own registry, for the reasons image models
-- do (docs/architecture.md): no dimension, no vectors, no backfill, a different runtime list.

CREATE TABLE IF NOT EXISTS pgsynapse.sql_models (
    id              serial PRIMARY KEY,
    name            text NOT NULL,
    base_id         int REFERENCES pgsynapse.sql_models (id),
    -- a transformers model directory, a .gguf file, a preset name, or the model name of an openai endpoint
    path            text NOT NULL,
    runtime         text NOT NULL CHECK (runtime IN ('transformers', 'llama-cpp', 'openai')),
    metrics         jsonb NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'candidate' CHECK (status IN ('candidate', 'rejected', 'active', 'retired')),
    traffic_percent numeric(5, 2) NOT NULL DEFAULT 0 CHECK (traffic_percent BETWEEN 0 AND 100),
    created_at      timestamptz NOT NULL DEFAULT now(),
    activated_at    timestamptz,
    -- the model this one replaced when it was promoted: what `sql-model rollback` returns to
    replaced_id     int REFERENCES pgsynapse.sql_models (id)
);
CREATE UNIQUE INDEX IF NOT EXISTS sql_models_one_active ON pgsynapse.sql_models ((true)) WHERE status = 'active';

CREATE TABLE IF NOT EXISTS pgsynapse.data_questions (
    id             bigserial PRIMARY KEY,
    session_id     text,
    text           text NOT NULL,
    target_schema  text NOT NULL DEFAULT 'public',
    -- NULL: every table of target_schema that the reader role may SELECT; else table names (of target_schema, or
    -- schema-qualified), of which only those the reader role may SELECT are used
    allowed_tables text[],
    status         text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'answered', 'refused', 'failed')),
    -- the statement generated: also when refused (what was refused; it never ran)
    sql            text,
    -- {"columns": [{"name": "region", "type": "text"}, ...], "rows": [["north", 12], ...]}
    result         jsonb,
    row_count      int,
    truncated      boolean,
    error          text,
    -- the schema text the model was given (the SQL trainer rebuilds the prompt from it)
    schema_context text,
    sql_model_id   int REFERENCES pgsynapse.sql_models (id),
    latency_ms     int,
    text_hash      text GENERATED ALWAYS AS (md5(text)) STORED,
    created_at     timestamptz NOT NULL DEFAULT now(),
    answered_at    timestamptz
);
CREATE INDEX IF NOT EXISTS data_questions_session ON pgsynapse.data_questions (session_id, id)
    WHERE session_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS pgsynapse.sql_corrections (
    id               bigserial PRIMARY KEY,
    question_id      bigint NOT NULL REFERENCES pgsynapse.data_questions (id) ON DELETE CASCADE,
    -- the right statement; NULL with approved = true: the generated one was right (a thumbs up)
    corrected_sql    text,
    approved         boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- the SQL model whose training used it (NULL: not trained on yet)
    trained_in_model int REFERENCES pgsynapse.sql_models (id) ON DELETE SET NULL,
    CONSTRAINT sql_corrections_sql_or_approved CHECK (corrected_sql IS NOT NULL OR approved)
);
CREATE INDEX IF NOT EXISTS sql_corrections_question ON pgsynapse.sql_corrections (question_id);

-- the trigger's threshold; the worker writes PGSYNAPSE_SQL_RETRAIN_MIN_CORRECTIONS here at start
ALTER TABLE pgsynapse.learning_settings
    ADD COLUMN IF NOT EXISTS sql_retrain_min_corrections int NOT NULL DEFAULT 50
        CHECK (sql_retrain_min_corrections > 0);

-- pgsynapse:include data_questions_v1.sql

-- The role generated statements run as (SET LOCAL ROLE inside a READ ONLY transaction). It reads nothing until
-- an operator grants it tables: GRANT SELECT ON public.orders TO pgsynapse_reader (docs/operations.md). The
-- worker and admin roles are its members, so they may SET ROLE to it; it is never a member of anything.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'pgsynapse_reader') THEN
        BEGIN
            CREATE ROLE pgsynapse_reader NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'role pgsynapse_reader does not exist and role % may not create it', current_user
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'have a superuser run CREATE ROLE pgsynapse_reader NOLOGIN; then migrate again';
        END;
    END IF;
END $$;
-- Membership needs ADMIN on pgsynapse_reader (a superuser, or the CREATEROLE role that created it): an owner
-- without it is told what to run, and the worker refuses data questions with the same hint until it is done.
-- The owner itself is made a member too (a worker connected as the owner, the embedded default).
DO $$
DECLARE
    grantee text;
BEGIN
    FOREACH grantee IN ARRAY ARRAY['pgsynapse_worker', 'pgsynapse_admin', current_user::text] LOOP
        IF NOT pg_catalog.pg_has_role(grantee, 'pgsynapse_reader', 'MEMBER') THEN
            BEGIN
                EXECUTE format('GRANT pgsynapse_reader TO %I', grantee);
            EXCEPTION WHEN insufficient_privilege OR invalid_grant_operation THEN
                RAISE WARNING 'role % may not grant pgsynapse_reader: have a superuser run GRANT pgsynapse_reader TO %',
                    current_user, grantee;
            END;
        END IF;
    END LOOP;
END $$;
-- nothing of pgsynapse's own schema: not even USAGE
REVOKE ALL ON SCHEMA pgsynapse FROM pgsynapse_reader;

-- An application asks, corrects and reads its answers; it never touches the queue or the SQL model registry's
-- writes.
GRANT SELECT, DELETE ON pgsynapse.data_questions TO pgsynapse_app;
GRANT INSERT (session_id, text, target_schema, allowed_tables), UPDATE (session_id, text, target_schema, allowed_tables)
    ON pgsynapse.data_questions TO pgsynapse_app;
GRANT SELECT ON pgsynapse.sql_corrections, pgsynapse.sql_models TO pgsynapse_app;
GRANT INSERT (question_id, corrected_sql, approved) ON pgsynapse.sql_corrections TO pgsynapse_app;
GRANT USAGE ON SEQUENCE pgsynapse.data_questions_id_seq, pgsynapse.sql_corrections_id_seq TO pgsynapse_app;
