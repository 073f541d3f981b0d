-- feedback v6: a feedback row whose verdict (helpful, rating) or passage (chunk_id) is changed by an UPDATE
-- (pgsynapse_app may: a user who changes their click) rebuilds its training example as an INSERT builds it, and an
-- example that now teaches something else counts as new again (trained_in_version NULL: the next retrain learns
-- the new verdict). Before, the example kept the verdict the row was inserted with. A chunk_id set to NULL by the
-- deletion of its passage (ON DELETE SET NULL, a document edit) is no new verdict: the example's own positive went
-- with the passage. The retrain threshold is checked as on INSERT.
-- An INSERT and an UPDATE build an example and queue a retrain with the same two functions below:
-- feedback_to_examples_v6 is feedback_to_examples_v5 (triggers/feedback_v5.sql) written with them.

-- what a feedback row teaches: helpful (or rated 4-5), the passage it names (else the answer's first source) is the
-- positive; not helpful, every source of the answer is a negative. Its callers are the trigger functions below,
-- which run with their owner's rights and a fixed search_path (as wake_v1's)
CREATE OR REPLACE FUNCTION pgsynapse.feedback_example_v1(helpful boolean, rating int, chunk_id bigint, sources jsonb,
                                                         OUT positive bigint, OUT negatives bigint[])
LANGUAGE sql STABLE SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
    SELECT CASE WHEN coalesce(helpful, rating >= 4) THEN
               (SELECT c.id FROM pgsynapse.chunks c WHERE c.id = coalesce(chunk_id, (sources -> 0 ->> 'chunk_id')::bigint))
           END,
           CASE WHEN NOT coalesce(helpful, rating >= 4) THEN
               ARRAY(SELECT DISTINCT (s ->> 'chunk_id')::bigint
                     FROM jsonb_array_elements(coalesce(sources, '[]')) s
                     WHERE s ->> 'chunk_id' IS NOT NULL)
           ELSE '{}'::bigint[] END;
$$;
REVOKE ALL ON FUNCTION pgsynapse.feedback_example_v1(boolean, int, bigint, jsonb) FROM PUBLIC;

-- one training job of a kind (retrain, sql_retrain) at a time: queued, and the workers woken, unless one is pending
-- or running
CREATE OR REPLACE FUNCTION pgsynapse.queue_one_v1(job_kind text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgsynapse.jobs WHERE kind = job_kind AND status IN ('pending', 'running')) THEN
        INSERT INTO pgsynapse.jobs (kind, ref_id) VALUES (job_kind, 0)
        ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            PERFORM pgsynapse.wake_v1(job_kind, 1);
        END IF;
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgsynapse.queue_one_v1(text) FROM PUBLIC;

-- a retrain, when the untrained examples reach retrain_min_feedback
CREATE OR REPLACE FUNCTION pgsynapse.queue_retrain_when_due_v1() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    IF (SELECT count(*) FROM pgsynapse.training_examples
        WHERE trained_in_version IS NULL AND positive_chunk_id IS NOT NULL AND superseded_by IS NULL)
       >= coalesce((SELECT retrain_min_feedback FROM pgsynapse.learning_settings), 200) THEN
        PERFORM pgsynapse.queue_one_v1('retrain');
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgsynapse.queue_retrain_when_due_v1() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgsynapse.feedback_to_examples_v6() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    INSERT INTO pgsynapse.training_examples (feedback_id, question_id, query, positive_chunk_id, negative_chunk_ids)
    SELECT f.id, q.id, coalesce(nullif(q.retrieval_query, ''), q.text), ex.positive, ex.negatives
    FROM new_rows f
    JOIN pgsynapse.questions q ON q.id = f.question_id
    CROSS JOIN LATERAL pgsynapse.feedback_example_v1(f.helpful, f.rating, f.chunk_id, q.sources) ex;
    PERFORM pgsynapse.supersede_examples_v1(ARRAY(SELECT DISTINCT question_id FROM new_rows));
    PERFORM pgsynapse.queue_retrain_when_due_v1();
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgsynapse.feedback_to_examples_v6() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgsynapse.feedback_updated_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE pgsynapse.training_examples te
    SET positive_chunk_id = ex.positive, negative_chunk_ids = ex.negatives, trained_in_version = NULL
    FROM new_rows f
    JOIN old_rows o ON o.id = f.id
    JOIN pgsynapse.questions q ON q.id = f.question_id
    CROSS JOIN LATERAL pgsynapse.feedback_example_v1(f.helpful, f.rating, f.chunk_id, q.sources) ex
    WHERE te.feedback_id = f.id
      AND ((f.helpful, f.rating) IS DISTINCT FROM (o.helpful, o.rating)
           OR (f.chunk_id IS NOT NULL AND f.chunk_id IS DISTINCT FROM o.chunk_id))
      AND (te.positive_chunk_id, te.negative_chunk_ids) IS DISTINCT FROM (ex.positive, ex.negatives);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pgsynapse.queue_retrain_when_due_v1();
    END IF;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgsynapse.feedback_updated_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS feedback_to_examples ON pgsynapse.feedback;
CREATE TRIGGER feedback_to_examples
    AFTER INSERT ON pgsynapse.feedback
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.feedback_to_examples_v6();
DROP FUNCTION IF EXISTS pgsynapse.feedback_to_examples_v5();

DROP TRIGGER IF EXISTS feedback_updated ON pgsynapse.feedback;
CREATE TRIGGER feedback_updated
    AFTER UPDATE ON pgsynapse.feedback
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.feedback_updated_v1();
