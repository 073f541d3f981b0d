-- data questions v3: data_questions_reask_v1, and the edited question's asked_at (migration 0024) is the time of
-- its edit: its latency_ms is measured from when it was asked again, not from the row's first INSERT.

CREATE OR REPLACE FUNCTION pgsynapse.data_questions_reask_v2() RETURNS trigger
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
        NEW.asked_at := now();
    END IF;
    RETURN NEW;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.data_questions_reask_v2() FROM PUBLIC;

DROP TRIGGER IF EXISTS data_questions_reask ON pgsynapse.data_questions;
CREATE TRIGGER data_questions_reask
    BEFORE UPDATE ON pgsynapse.data_questions
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.data_questions_reask_v2();
