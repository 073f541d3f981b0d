-- questions v10: a TRUNCATE of questions (or one that cascades to them) leaves no session in
-- pgsynapse.conversations. It fires no DELETE trigger, so questions_count_deleted_v1 (v9) never counted the
-- truncated questions down: every session kept its turns though no question was left. After the TRUNCATE the
-- table is empty, so no session has a turn: each loses its row, as a session whose last question is deleted does.
-- The TRUNCATE holds questions ACCESS EXCLUSIVE to its commit, so no statement counts turns meanwhile; the
-- questions asked after it (in its transaction too) are counted from 0 by questions_enqueue_insert_v8.

CREATE OR REPLACE FUNCTION pgsynapse.questions_count_truncated_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    DELETE FROM pgsynapse.conversations;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.questions_count_truncated_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS questions_count_truncated ON pgsynapse.questions;
CREATE TRIGGER questions_count_truncated
    AFTER TRUNCATE ON pgsynapse.questions
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.questions_count_truncated_v1();
