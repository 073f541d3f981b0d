-- questions v3: an UPDATE that changes a question's text asks it again. BEFORE, per row: the row goes back to
-- pending with its answer cleared (an answer to the old text is no answer to the new one). AFTER, per statement:
-- one `answer` job per such row, deduplicated among pending jobs, and one NOTIFY. A job still running on the old
-- text is not written: its write finds another text (write_answer in sql/answers.sql) and is superseded.
-- Other columns (session_id) change nothing. The enqueue function is SECURITY DEFINER with a fixed search_path,
-- like questions_v2's: an application edits a question without any privilege on pgsynapse.jobs.

CREATE FUNCTION pgsynapse.questions_reask_v3() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    IF NEW.text IS DISTINCT FROM OLD.text THEN
        NEW.status := 'pending';
        NEW.answer := NULL;
        NEW.sources := NULL;
        NEW.model_version_id := NULL;
        NEW.retrieval_query := NULL;
        NEW.guardrail := NULL;
        NEW.answerer := NULL;
        NEW.error := NULL;
        NEW.answered_at := NULL;
        NEW.latency_ms := NULL;
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION pgsynapse.questions_enqueue_update_v3() RETURNS trigger
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
        PERFORM pg_notify('pgsynapse_jobs', json_build_object('kind', 'answer', 'n', n)::text);
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.questions_reask_v3() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgsynapse.questions_enqueue_update_v3() FROM PUBLIC;

CREATE TRIGGER questions_reask
    BEFORE UPDATE OF text ON pgsynapse.questions
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.questions_reask_v3();

CREATE TRIGGER questions_enqueue_update
    AFTER UPDATE ON pgsynapse.questions
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.questions_enqueue_update_v3();
