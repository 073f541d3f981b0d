-- feedback consistent v1: a feedback row whose helpful and rating disagree (helpful and rated 1 to 3, not helpful
-- and rated 4 or 5) is refused saying so, as `pgsynapse feedback` and Client.feedback refuse it. The A/B report
-- and the retrain read a row as coalesce(helpful, rating >= 4): helpful and rated 1 counted as helpful, whatever
-- the rating said. A trigger, not a CHECK constraint: a CHECK (even NOT VALID) is checked on every new version of
-- a row, so a contradictory row from before this migration would refuse the chunk_id = NULL that deleting its
-- passage writes (ON DELETE SET NULL), and with it the edit of a document. This one fires only when a row is
-- written with its helpful or rating: the rows already there stay as they are.

CREATE OR REPLACE FUNCTION pgsynapse.feedback_consistent_v1() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    IF NEW.helpful IS NOT NULL AND NEW.rating IS NOT NULL AND NEW.helpful <> (NEW.rating >= 4) THEN
        RAISE EXCEPTION 'feedback on question % says % and rates it %: a rating of 4 or 5 counts as helpful, 1 to 3 as not helpful (give one of the two, or both agreeing)',
            NEW.question_id, CASE WHEN NEW.helpful THEN 'helpful' ELSE 'not helpful' END, NEW.rating
            USING ERRCODE = 'check_violation', CONSTRAINT = 'feedback_helpful_agrees_with_rating';
    END IF;
    RETURN NEW;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.feedback_consistent_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS feedback_consistent ON pgsynapse.feedback;
CREATE TRIGGER feedback_consistent
    BEFORE INSERT OR UPDATE OF helpful, rating ON pgsynapse.feedback
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.feedback_consistent_v1();
