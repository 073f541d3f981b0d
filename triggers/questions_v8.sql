-- questions v8: questions_reask_v5, and the edited question's asked_at (migration 0024) is the time of its edit:
-- its latency_ms, written with its new answer, is measured from when it was asked again, not from the row's
-- first INSERT.

CREATE OR REPLACE FUNCTION pgsynapse.questions_reask_v6() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    IF NEW.text IS DISTINCT FROM OLD.text THEN
        NEW.status := 'pending';
        NEW.answer := NULL;
        NEW.sources := NULL;
        NEW.model_version_id := NULL;
        NEW.retrieval_query := NULL;
        NEW.guardrail := NULL;
        NEW.answerer := NULL;
        NEW.error := NULL;
        NEW.flags := '{}';
        NEW.cached_from := NULL;
        NEW.answered_at := NULL;
        NEW.latency_ms := NULL;
        NEW.asked_at := now();
    END IF;
    RETURN NEW;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.questions_reask_v6() FROM PUBLIC;

DROP TRIGGER IF EXISTS questions_reask ON pgsynapse.questions;
CREATE TRIGGER questions_reask
    BEFORE UPDATE OF text ON pgsynapse.questions
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.questions_reask_v6();
