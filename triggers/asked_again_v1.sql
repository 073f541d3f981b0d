-- asked again v1: a question (or a question about the data) that goes back from failed to pending is asked again
-- now, whoever puts it back: `pgsynapse retry-failed` of any release, or an UPDATE by hand. Its latency_ms then
-- counts from here (migration 0024), as after an edit of its text (questions_reask_v6, data_questions_reask_v2).
-- Before this trigger only the retry-failed of releases with 0024 set asked_at, and one of an earlier release,
-- running beside them during an upgrade, left the hours of the outage in the latency.

CREATE OR REPLACE FUNCTION pgsynapse.asked_again_v1() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    IF OLD.status = 'failed' AND NEW.status = 'pending' THEN
        NEW.asked_at := now();
    END IF;
    RETURN NEW;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.asked_again_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS questions_asked_again ON pgsynapse.questions;
CREATE TRIGGER questions_asked_again
    BEFORE UPDATE OF status ON pgsynapse.questions
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.asked_again_v1();

DROP TRIGGER IF EXISTS data_questions_asked_again ON pgsynapse.data_questions;
CREATE TRIGGER data_questions_asked_again
    BEFORE UPDATE OF status ON pgsynapse.data_questions
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.asked_again_v1();
