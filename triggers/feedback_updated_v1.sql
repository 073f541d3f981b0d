-- feedback updated v1: a feedback row whose verdict (helpful, rating) or passage (chunk_id) is changed by an UPDATE
-- (pgsynapse_app may: a user who changes their click) rebuilds its training example as feedback_to_examples_v5
-- builds it on INSERT, and an example that now teaches something else counts as new again (trained_in_version
-- NULL: the next retrain learns the new verdict). Before, the example kept the verdict the row was inserted with.
-- A chunk_id set to NULL by the deletion of its passage (ON DELETE SET NULL, a document edit) is no new verdict:
-- the example's own positive went with the passage. The retrain threshold is checked as on INSERT.

-- one retrain at a time: queued when the untrained examples reach retrain_min_feedback and none is pending or
-- running (feedback_to_examples_v5's rule; its callers run with their owner's rights)
CREATE OR REPLACE FUNCTION pgsynapse.queue_retrain_when_due_v1() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    untrained bigint;
    threshold int;
    n bigint;
BEGIN
    SELECT retrain_min_feedback INTO threshold FROM pgsynapse.learning_settings;
    SELECT count(*) INTO untrained FROM pgsynapse.training_examples
    WHERE trained_in_version IS NULL AND positive_chunk_id IS NOT NULL AND superseded_by IS NULL;
    IF untrained >= coalesce(threshold, 200) AND NOT EXISTS (
        SELECT 1 FROM pgsynapse.jobs WHERE kind = 'retrain' AND status IN ('pending', 'running')) THEN
        INSERT INTO pgsynapse.jobs (kind, ref_id) VALUES ('retrain', 0)
        ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            PERFORM pgsynapse.wake_v1('retrain', 1);
        END IF;
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgsynapse.queue_retrain_when_due_v1() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgsynapse.feedback_updated_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    WITH changed AS (
        SELECT f.id, CASE WHEN coalesce(f.helpful, f.rating >= 4) THEN
                   (SELECT c.id FROM pgsynapse.chunks c
                    WHERE c.id = coalesce(f.chunk_id, (q.sources -> 0 ->> 'chunk_id')::bigint))
               END AS positive,
               CASE WHEN NOT coalesce(f.helpful, f.rating >= 4) THEN
                   ARRAY(SELECT DISTINCT (s ->> 'chunk_id')::bigint
                         FROM jsonb_array_elements(coalesce(q.sources, '[]')) s
                         WHERE s ->> 'chunk_id' IS NOT NULL)
               ELSE '{}'::bigint[] END AS negatives
        FROM new_rows f
        JOIN old_rows o ON o.id = f.id
        JOIN pgsynapse.questions q ON q.id = f.question_id
        WHERE (f.helpful, f.rating) IS DISTINCT FROM (o.helpful, o.rating)
           OR (f.chunk_id IS NOT NULL AND f.chunk_id IS DISTINCT FROM o.chunk_id)
    )
    UPDATE pgsynapse.training_examples te
    SET positive_chunk_id = c.positive, negative_chunk_ids = c.negatives, trained_in_version = NULL
    FROM changed c
    WHERE te.feedback_id = c.id
      AND (te.positive_chunk_id, te.negative_chunk_ids) IS DISTINCT FROM (c.positive, c.negatives);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pgsynapse.queue_retrain_when_due_v1();
    END IF;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgsynapse.feedback_updated_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS feedback_updated ON pgsynapse.feedback;
CREATE TRIGGER feedback_updated
    AFTER UPDATE ON pgsynapse.feedback
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.feedback_updated_v1();
