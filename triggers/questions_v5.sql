-- questions v5: questions v3's re-ask on edit, now also clearing flags (migration 0010) and cached_from (migration
-- 0011): an edited question is neither flagged nor "from the cache" while it waits for its new answer.
-- An UPDATE that changes a question's text sends it back to pending with its answer (a partial, streamed one too)
-- cleared; questions_enqueue_update_v3 (unchanged) queues its new job. A partial or final write of a job still
-- running on the old text finds another text and writes nothing (sql/answers.sql: stream_answer, write_answer).

CREATE OR REPLACE FUNCTION pgsynapse.questions_reask_v5() RETURNS trigger
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
    END IF;
    RETURN NEW;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.questions_reask_v5() FROM PUBLIC;

DROP TRIGGER IF EXISTS questions_reask ON pgsynapse.questions;
CREATE TRIGGER questions_reask
    BEFORE UPDATE OF text ON pgsynapse.questions
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.questions_reask_v5();
