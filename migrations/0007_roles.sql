-- pgsynapse 0007: roles and privileges. Applications get their own rows and the results, never the queue.
--
--   pgsynapse_app     writes documents, questions and feedback (their input columns only), reads them back with
--                     their results (chunks, embeddings, model_versions, conversations). The triggers that queue
--                     its jobs are SECURITY DEFINER, so it has no privilege at all on jobs, training_examples,
--                     the inference cache and log, workers, guardrail_rules or learning_settings.
--   pgsynapse_worker  `pgsynapse run --no-migrate`: SELECT, INSERT, UPDATE, DELETE on every table of the schema
--                     (but only SELECT on guardrail_rules), the sequences, ensure_embedding_index().
--   pgsynapse_admin   the worker's rights plus the guardrail rules: `status`, `retry-failed`, `retrain`, `promote`,
--                     `rollback`, `traffic`, `retire`, `model export`.
-- None of them owns anything or may run migrations: that stays the owner's (the role that runs `migrate`).
-- Grant them to LOGIN roles: GRANT pgsynapse_app TO myapp;
--
-- Roles are cluster-wide: another database of the cluster may have created them already, or a DBA ahead of a
-- `migrate` run by a role without CREATEROLE. Privileges granted directly to each role (no role granted to a
-- role) need no ADMIN option on roles this migration did not create.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pgsynapse_app', 'pgsynapse_worker', 'pgsynapse_admin'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION
                -- another database's migration created it since the check
                WHEN duplicate_object OR unique_violation THEN NULL;
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION 'role % does not exist and role % may not create it', r, current_user
                        USING ERRCODE = 'insufficient_privilege',
                              HINT = 'have a superuser run CREATE ROLE pgsynapse_app NOLOGIN; CREATE ROLE '
                                     'pgsynapse_worker NOLOGIN; CREATE ROLE pgsynapse_admin NOLOGIN; then migrate again';
            END;
        END IF;
    END LOOP;
END $$;

-- pgsynapse:include documents_v3.sql
-- pgsynapse:include questions_v2.sql
-- pgsynapse:include feedback_v2.sql
-- pgsynapse:include model_versions_v1.sql

-- Nothing for PUBLIC: functions are executable by everyone by default, the rest is explicit.
REVOKE ALL ON SCHEMA pgsynapse FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgsynapse FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgsynapse FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgsynapse FROM PUBLIC;
REVOKE ALL ON public.pgsynapse_migrations FROM PUBLIC;
-- the schema check of workers and of `pgsynapse ingest`
GRANT SELECT ON public.pgsynapse_migrations TO pgsynapse_app, pgsynapse_worker, pgsynapse_admin;

GRANT USAGE ON SCHEMA pgsynapse TO pgsynapse_app, pgsynapse_worker, pgsynapse_admin;

-- pgsynapse_app
GRANT SELECT, DELETE ON pgsynapse.documents, pgsynapse.questions, pgsynapse.feedback TO pgsynapse_app;
GRANT INSERT (source, title, body, metadata), UPDATE (source, title, body, metadata)
    ON pgsynapse.documents TO pgsynapse_app;
GRANT INSERT (session_id, text), UPDATE (session_id, text) ON pgsynapse.questions TO pgsynapse_app;
GRANT INSERT (question_id, helpful, rating, chunk_id, comment), UPDATE (helpful, rating, chunk_id, comment)
    ON pgsynapse.feedback TO pgsynapse_app;
GRANT USAGE ON SEQUENCE pgsynapse.documents_id_seq, pgsynapse.questions_id_seq, pgsynapse.feedback_id_seq
    TO pgsynapse_app;
GRANT SELECT ON pgsynapse.chunks, pgsynapse.embeddings, pgsynapse.model_versions, pgsynapse.conversations
    TO pgsynapse_app;

-- pgsynapse_worker and pgsynapse_admin
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgsynapse TO pgsynapse_worker, pgsynapse_admin;
REVOKE INSERT, UPDATE, DELETE ON pgsynapse.guardrail_rules FROM pgsynapse_worker;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA pgsynapse TO pgsynapse_worker, pgsynapse_admin;
GRANT EXECUTE ON FUNCTION pgsynapse.ensure_embedding_index(int) TO pgsynapse_worker, pgsynapse_admin;

-- Tables and sequences later migrations create (as this same owner) are the worker's and admin's too; an
-- application gets only what a migration grants it by name.
ALTER DEFAULT PRIVILEGES IN SCHEMA pgsynapse
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO pgsynapse_worker, pgsynapse_admin;
ALTER DEFAULT PRIVILEGES IN SCHEMA pgsynapse
    GRANT USAGE, SELECT ON SEQUENCES TO pgsynapse_worker, pgsynapse_admin;
