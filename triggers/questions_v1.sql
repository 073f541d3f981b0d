-- questions: enqueue one `answer` job per inserted question and wake the worker with one NOTIFY per statement.

CREATE FUNCTION pgsynapse.questions_enqueue_insert_v1() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE TRIGGER questions_enqueue_insert
    AFTER INSERT ON pgsynapse.questions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.questions_enqueue_insert_v1();
