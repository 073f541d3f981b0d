-- questions v9: a session's turns in pgsynapse.conversations are its questions, whatever changes them. v7 counted
-- them up on a question's INSERT only: a question deleted, or moved to another session by an UPDATE of
-- session_id, stayed counted where it had been, and the session it went to had no row. Now a DELETE counts down
-- (questions_count_deleted_v1, new) and a move counts down its old session and up its new one
-- (questions_enqueue_update_v7: v6 and the move). A session left with no question has no row, as a blank one has
-- none: an application that deletes a user's questions leaves no trace of their session id.
-- Every change of the counts goes through count_turns_v1: one statement that locks (or makes) the conversation
-- rows in session_id order, so two statements changing the same sessions (inserts, deletes, moves in opposite
-- directions) wait for one another, never deadlock; the count is changed under the row lock, never lost.
-- questions_enqueue_insert_v8 is v7 counting through it.

CREATE OR REPLACE FUNCTION pgsynapse.count_turns_v1(sessions text[], deltas int[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    INSERT INTO pgsynapse.conversations AS c (session_id, turns)
    SELECT s, sum(d) FROM unnest(sessions, deltas) AS t(s, d)
    WHERE btrim(s) <> '' GROUP BY s HAVING sum(d) <> 0 ORDER BY s
    ON CONFLICT (session_id) DO UPDATE SET turns = c.turns + excluded.turns,
        last_turn_at = CASE WHEN excluded.turns > 0 THEN now() ELSE c.last_turn_at END;
    IF -1 = ANY(deltas) THEN  -- rows this statement locked above: none is counted below 1 but by it
        DELETE FROM pgsynapse.conversations WHERE session_id = ANY(sessions) AND turns <= 0;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.questions_enqueue_insert_v8() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
    sessions text[];
BEGIN
    INSERT INTO pgsynapse.jobs (kind, ref_id)
    SELECT 'answer', id FROM new_rows WHERE status = 'pending'
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pgsynapse.wake_v1('answer', n);
    END IF;
    SELECT array_agg(session_id) INTO sessions FROM new_rows WHERE btrim(session_id) <> '';
    IF sessions IS NOT NULL THEN
        PERFORM pgsynapse.count_turns_v1(sessions, array_fill(1, ARRAY[cardinality(sessions)]));
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.questions_enqueue_update_v7() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
    sessions text[];
    deltas int[];
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
    -- a question moved to another session: one turn less in the one it left, one more in the one it joined
    SELECT array_agg(m.s), array_agg(m.d) INTO sessions, deltas
    FROM new_rows nr JOIN old_rows o ON o.id = nr.id
    CROSS JOIN LATERAL (VALUES (o.session_id, -1), (nr.session_id, 1)) AS m(s, d)
    WHERE nr.session_id IS DISTINCT FROM o.session_id AND btrim(m.s) <> '';
    IF sessions IS NOT NULL THEN
        PERFORM pgsynapse.count_turns_v1(sessions, deltas);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.questions_count_deleted_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    sessions text[];
BEGIN
    SELECT array_agg(session_id) INTO sessions FROM old_rows WHERE btrim(session_id) <> '';
    IF sessions IS NOT NULL THEN
        PERFORM pgsynapse.count_turns_v1(sessions, array_fill(-1, ARRAY[cardinality(sessions)]));
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.count_turns_v1(text[], int[]), pgsynapse.questions_enqueue_insert_v8(),
    pgsynapse.questions_enqueue_update_v7(), pgsynapse.questions_count_deleted_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS questions_enqueue_insert ON pgsynapse.questions;
CREATE TRIGGER questions_enqueue_insert
    AFTER INSERT ON pgsynapse.questions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.questions_enqueue_insert_v8();

DROP TRIGGER IF EXISTS questions_enqueue_update ON pgsynapse.questions;
CREATE TRIGGER questions_enqueue_update
    AFTER UPDATE ON pgsynapse.questions
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.questions_enqueue_update_v7();

DROP TRIGGER IF EXISTS questions_count_deleted ON pgsynapse.questions;
CREATE TRIGGER questions_count_deleted
    AFTER DELETE ON pgsynapse.questions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.questions_count_deleted_v1();
