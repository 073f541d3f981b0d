-- feedback check v1: feedback is on an answer. A row for a question that has none (still pending, failed,
-- blocked, or asked again since) is refused saying so, as `pgsynapse feedback` and Client.feedback refuse it:
-- it became a training example whose query never got an answer (a failed question's text may be 500,000
-- characters), counted toward retrain_min_feedback. A chunk_id may name any passage (the one that answers the
-- question, cited or not: a correction); the command line and Client name a cited one by its rank.

CREATE OR REPLACE FUNCTION pgsynapse.feedback_check_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    question_status text;
BEGIN
    SELECT status INTO question_status FROM pgsynapse.questions WHERE id = NEW.question_id;
    IF FOUND AND question_status <> 'answered' THEN  -- a question that is not there: the foreign key says so
        RAISE EXCEPTION 'question % is %: it has no answer to give feedback on', NEW.question_id, question_status
            USING ERRCODE = 'check_violation', CONSTRAINT = 'feedback_needs_an_answer';
    END IF;
    RETURN NEW;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.feedback_check_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS feedback_check ON pgsynapse.feedback;
CREATE TRIGGER feedback_check
    BEFORE INSERT OR UPDATE OF question_id ON pgsynapse.feedback
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.feedback_check_v1();
