-- feedback consistent v2: feedback_consistent_v1, but a rating off the scale (0, 6) is left to the table's CHECK
-- (feedback_rating_between_1_and_5), which says that: v1 refused it first as a contradiction with helpful ("says
-- helpful and rates it 0: a rating of 4 or 5 counts as helpful ..."), which sent the user to fix the wrong thing.

CREATE OR REPLACE FUNCTION pgsynapse.feedback_consistent_v2() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    IF NEW.helpful IS NOT NULL AND NEW.rating BETWEEN 1 AND 5 AND NEW.helpful <> (NEW.rating >= 4) THEN
        RAISE EXCEPTION 'feedback on question % says % and rates it %: a rating of 4 or 5 counts as helpful, 1 to 3 as not helpful (give one of the two, or both agreeing)',
            NEW.question_id, CASE WHEN NEW.helpful THEN 'helpful' ELSE 'not helpful' END, NEW.rating
            USING ERRCODE = 'check_violation', CONSTRAINT = 'feedback_helpful_agrees_with_rating';
    END IF;
    RETURN NEW;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.feedback_consistent_v2() FROM PUBLIC;

DROP TRIGGER IF EXISTS feedback_consistent ON pgsynapse.feedback;
CREATE TRIGGER feedback_consistent
    BEFORE INSERT OR UPDATE OF helpful, rating ON pgsynapse.feedback
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.feedback_consistent_v2();
