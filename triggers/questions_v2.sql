-- questions v2: the enqueue function of v1, now SECURITY DEFINER with a fixed search_path, so an application
-- (pgsynapse_app) asks without any privilege on pgsynapse.jobs or pgsynapse.conversations' writes.

CREATE OR REPLACE FUNCTION pgsynapse.questions_enqueue_insert_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO pgsynapse.jobs (kind, ref_id)
    SELECT 'answer', id FROM new_rows WHERE status = 'pending'
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('pgsynapse_jobs', json_build_object('kind', 'answer', 'n', n)::text);
    END IF;
    INSERT INTO pgsynapse.conversations AS c (session_id, turns)
    SELECT session_id, count(*) FROM new_rows WHERE session_id IS NOT NULL GROUP BY session_id
    ON CONFLICT (session_id) DO UPDATE SET turns = c.turns + excluded.turns, last_turn_at = now();
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.questions_enqueue_insert_v2() FROM PUBLIC;

DROP TRIGGER IF EXISTS questions_enqueue_insert ON pgsynapse.questions;
CREATE TRIGGER questions_enqueue_insert
    AFTER INSERT ON pgsynapse.questions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.questions_enqueue_insert_v2();
