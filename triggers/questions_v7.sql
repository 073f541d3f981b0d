-- questions v7: questions_enqueue_insert_v6, but a blank session_id ('' or spaces, which some apps write for none)
-- makes no conversation: answers treat it as no session (answers.sql, load_questions), and one row counting every
-- blank-session question of every user would say otherwise. The update trigger stays questions_enqueue_update_v6.

CREATE OR REPLACE FUNCTION pgsynapse.questions_enqueue_insert_v7() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO pgsynapse.jobs (kind, ref_id)
    SELECT 'answer', id FROM new_rows WHERE status = 'pending'
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pgsynapse.wake_v1('answer', n);
    END IF;
    INSERT INTO pgsynapse.conversations AS c (session_id, turns)
    SELECT session_id, count(*) FROM new_rows WHERE btrim(session_id) <> '' GROUP BY session_id
    ON CONFLICT (session_id) DO UPDATE SET turns = c.turns + excluded.turns, last_turn_at = now();
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.questions_enqueue_insert_v7() FROM PUBLIC;

DROP TRIGGER IF EXISTS questions_enqueue_insert ON pgsynapse.questions;
CREATE TRIGGER questions_enqueue_insert
    AFTER INSERT ON pgsynapse.questions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.questions_enqueue_insert_v7();
