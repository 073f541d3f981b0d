-- data questions v2: data_questions_enqueue_v1, sql_corrections_enqueue_v1, unchanged but for the wake-up: they call pgsynapse.wake_v1
-- (migration 0018), which sends the NOTIFY unless pgsynapse.queue_settings.notify_on_enqueue is off (the
-- workers then poll: docs/scaling.md, NOTIFY). The triggers are re-pointed at the new functions.

CREATE OR REPLACE FUNCTION pgsynapse.data_questions_enqueue_v2() RETURNS trigger
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
        PERFORM pgsynapse.wake_v1('sql_answer', n);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.sql_corrections_enqueue_v2() RETURNS trigger
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
            PERFORM pgsynapse.wake_v1('sql_retrain', 1);
        END IF;
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.data_questions_enqueue_v2(), pgsynapse.sql_corrections_enqueue_v2() FROM PUBLIC;

DROP TRIGGER IF EXISTS data_questions_enqueue_insert ON pgsynapse.data_questions;
CREATE TRIGGER data_questions_enqueue_insert
    AFTER INSERT ON pgsynapse.data_questions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.data_questions_enqueue_v2();

DROP TRIGGER IF EXISTS data_questions_enqueue_update ON pgsynapse.data_questions;
CREATE TRIGGER data_questions_enqueue_update
    AFTER UPDATE ON pgsynapse.data_questions
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.data_questions_enqueue_v2();

DROP TRIGGER IF EXISTS sql_corrections_enqueue ON pgsynapse.sql_corrections;
CREATE TRIGGER sql_corrections_enqueue
    AFTER INSERT ON pgsynapse.sql_corrections
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.sql_corrections_enqueue_v2();
