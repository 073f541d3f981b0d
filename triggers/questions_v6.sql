-- questions v6: questions_enqueue_insert_v2, questions_enqueue_update_v3, unchanged but for the wake-up: they call pgsynapse.wake_v1
-- (migration 0018), which sends the NOTIFY unless pgsynapse.queue_settings.notify_on_enqueue is off (the
-- workers then poll: docs/scaling.md, NOTIFY). The triggers are re-pointed at the new functions.

CREATE OR REPLACE FUNCTION pgsynapse.questions_enqueue_insert_v6() RETURNS trigger
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
    SELECT session_id, count(*) FROM new_rows WHERE session_id IS NOT NULL GROUP BY session_id
    ON CONFLICT (session_id) DO UPDATE SET turns = c.turns + excluded.turns, last_turn_at = now();
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.questions_enqueue_update_v6() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO pgsynapse.jobs (kind, ref_id)
    SELECT 'answer', nr.id
    FROM new_rows nr JOIN old_rows o ON o.id = nr.id
    WHERE nr.text IS DISTINCT FROM o.text AND nr.status = 'pending'
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pgsynapse.wake_v1('answer', n);
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.questions_enqueue_insert_v6(), pgsynapse.questions_enqueue_update_v6() FROM PUBLIC;

DROP TRIGGER IF EXISTS questions_enqueue_insert ON pgsynapse.questions;
CREATE TRIGGER questions_enqueue_insert
    AFTER INSERT ON pgsynapse.questions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.questions_enqueue_insert_v6();

DROP TRIGGER IF EXISTS questions_enqueue_update ON pgsynapse.questions;
CREATE TRIGGER questions_enqueue_update
    AFTER UPDATE ON pgsynapse.questions
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.questions_enqueue_update_v6();
