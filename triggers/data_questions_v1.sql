-- data questions v1: one `sql_answer` job per inserted question, and per question whose text, target schema or
-- allowed tables changed (that puts it back to pending with its answer cleared first); one NOTIFY per statement.
-- A correction queues the one `sql_retrain` job at the threshold. SECURITY DEFINER with a fixed search_path, as
-- documents_v3: an application (pgsynapse_app) writes questions and corrections, the triggers queue the jobs.

CREATE OR REPLACE FUNCTION pgsynapse.data_questions_enqueue_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pgsynapse.jobs (kind, ref_id)
        SELECT 'sql_answer', id FROM new_rows
        ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    ELSE
        INSERT INTO pgsynapse.jobs (kind, ref_id)
        SELECT 'sql_answer', nr.id
        FROM new_rows nr JOIN old_rows o ON o.id = nr.id
        WHERE (nr.text, nr.target_schema, nr.allowed_tables) IS DISTINCT FROM (o.text, o.target_schema, o.allowed_tables)
        ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('pgsynapse_jobs', json_build_object('kind', 'sql_answer', 'n', n)::text);
    END IF;
    RETURN NULL;
END $$;

-- an edited question is asked again: its answer is cleared while it waits
CREATE OR REPLACE FUNCTION pgsynapse.data_questions_reask_v1() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    IF (NEW.text, NEW.target_schema, NEW.allowed_tables) IS DISTINCT FROM (OLD.text, OLD.target_schema, OLD.allowed_tables) THEN
        NEW.status := 'pending';
        NEW.sql := NULL;
        NEW.result := NULL;
        NEW.row_count := NULL;
        NEW.truncated := NULL;
        NEW.error := NULL;
        NEW.schema_context := NULL;
        NEW.sql_model_id := NULL;
        NEW.latency_ms := NULL;
        NEW.answered_at := NULL;
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.sql_corrections_enqueue_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    untrained bigint;
    threshold int;
    n bigint;
BEGIN
    SELECT sql_retrain_min_corrections INTO threshold FROM pgsynapse.learning_settings;
    SELECT count(*) INTO untrained FROM pgsynapse.sql_corrections WHERE trained_in_model IS NULL;
    -- one SQL retrain at a time: none is queued while another is pending or running
    IF untrained >= coalesce(threshold, 50) AND NOT EXISTS (
        SELECT 1 FROM pgsynapse.jobs WHERE kind = 'sql_retrain' AND status IN ('pending', 'running')) THEN
        INSERT INTO pgsynapse.jobs (kind, ref_id) VALUES ('sql_retrain', 0)
        ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            PERFORM pg_notify('pgsynapse_jobs', json_build_object('kind', 'sql_retrain', 'n', 1)::text);
        END IF;
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.data_questions_enqueue_v1(), pgsynapse.data_questions_reask_v1(),
    pgsynapse.sql_corrections_enqueue_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS data_questions_enqueue_insert ON pgsynapse.data_questions;
CREATE TRIGGER data_questions_enqueue_insert
    AFTER INSERT ON pgsynapse.data_questions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.data_questions_enqueue_v1();

DROP TRIGGER IF EXISTS data_questions_enqueue_update ON pgsynapse.data_questions;
CREATE TRIGGER data_questions_enqueue_update
    AFTER UPDATE ON pgsynapse.data_questions
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.data_questions_enqueue_v1();

DROP TRIGGER IF EXISTS data_questions_reask ON pgsynapse.data_questions;
CREATE TRIGGER data_questions_reask
    BEFORE UPDATE ON pgsynapse.data_questions
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.data_questions_reask_v1();

DROP TRIGGER IF EXISTS sql_corrections_enqueue ON pgsynapse.sql_corrections;
CREATE TRIGGER sql_corrections_enqueue
    AFTER INSERT ON pgsynapse.sql_corrections
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.sql_corrections_enqueue_v1();
