-- feedback v3: feedback_to_examples_v2, unchanged but for the wake-up: they call pgsynapse.wake_v1
-- (migration 0018), which sends the NOTIFY unless pgsynapse.queue_settings.notify_on_enqueue is off (the
-- workers then poll: docs/scaling.md, NOTIFY). The triggers are re-pointed at the new functions.

CREATE OR REPLACE FUNCTION pgsynapse.feedback_to_examples_v3() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    untrained bigint;
    threshold int;
    n bigint;
BEGIN
    INSERT INTO pgsynapse.training_examples (feedback_id, question_id, query, positive_chunk_id, negative_chunk_ids)
    SELECT f.id, q.id, q.text,
           CASE WHEN coalesce(f.helpful, f.rating >= 4) THEN
               (SELECT c.id FROM pgsynapse.chunks c
                WHERE c.id = coalesce(f.chunk_id, (q.sources -> 0 ->> 'chunk_id')::bigint))
           END,
           CASE WHEN NOT coalesce(f.helpful, f.rating >= 4) THEN
               ARRAY(SELECT DISTINCT (s ->> 'chunk_id')::bigint
                     FROM jsonb_array_elements(coalesce(q.sources, '[]')) s
                     WHERE s ->> 'chunk_id' IS NOT NULL)
           ELSE '{}'::bigint[] END
    FROM new_rows f
    JOIN pgsynapse.questions q ON q.id = f.question_id;

    SELECT retrain_min_feedback INTO threshold FROM pgsynapse.learning_settings;
    SELECT count(*) INTO untrained FROM pgsynapse.training_examples
    WHERE trained_in_version IS NULL AND positive_chunk_id IS NOT NULL;
    -- one retrain at a time: none is queued while another is pending or running
    IF untrained >= coalesce(threshold, 200) AND NOT EXISTS (
        SELECT 1 FROM pgsynapse.jobs WHERE kind = 'retrain' AND status IN ('pending', 'running')) THEN
        INSERT INTO pgsynapse.jobs (kind, ref_id) VALUES ('retrain', 0)
        ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            PERFORM pgsynapse.wake_v1('retrain', 1);
        END IF;
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.feedback_to_examples_v3() FROM PUBLIC;

DROP TRIGGER IF EXISTS feedback_to_examples ON pgsynapse.feedback;
CREATE TRIGGER feedback_to_examples
    AFTER INSERT ON pgsynapse.feedback
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.feedback_to_examples_v3();
