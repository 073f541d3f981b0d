-- data questions v5: data_questions_reask_v2 (triggers/data_questions_v3.sql), and an edit clears the guardrail
-- rule that blocked or flagged the question (data_questions.guardrail, migration 0040) with its answer. The v2
-- function stays for a release that still calls it.

CREATE OR REPLACE FUNCTION pgsynapse.data_questions_reask_v3() RETURNS trigger
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
        NEW.guardrail := NULL;
        NEW.asked_at := now();
    END IF;
    RETURN NEW;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.data_questions_reask_v3() FROM PUBLIC;

DROP TRIGGER IF EXISTS data_questions_reask ON pgsynapse.data_questions;
CREATE TRIGGER data_questions_reask
    BEFORE UPDATE ON pgsynapse.data_questions
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.data_questions_reask_v3();
