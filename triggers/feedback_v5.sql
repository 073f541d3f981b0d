-- feedback v5: an example's query is what its question was searched with (questions.retrieval_query: a follow-up
-- with its session's context), not its bare text ("and what about heap tables?" says nothing of what it asks).
-- Otherwise feedback_to_examples_v4 (triggers/feedback_v4.sql: one example per question, supersede_examples_v1,
-- feedback_deleted_v1 unchanged).

CREATE OR REPLACE FUNCTION pgsynapse.feedback_to_examples_v5() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    untrained bigint;
    threshold int;
    n bigint;
BEGIN
    INSERT INTO pgsynapse.training_examples (feedback_id, question_id, query, positive_chunk_id, negative_chunk_ids)
    SELECT f.id, q.id, coalesce(nullif(q.retrieval_query, ''), q.text),
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

    PERFORM pgsynapse.supersede_examples_v1(ARRAY(SELECT DISTINCT question_id FROM new_rows));

    SELECT retrain_min_feedback INTO threshold FROM pgsynapse.learning_settings;
    SELECT count(*) INTO untrained FROM pgsynapse.training_examples
    WHERE trained_in_version IS NULL AND positive_chunk_id IS NOT NULL AND superseded_by IS NULL;
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

REVOKE ALL ON FUNCTION pgsynapse.feedback_to_examples_v5() FROM PUBLIC;

DROP TRIGGER IF EXISTS feedback_to_examples ON pgsynapse.feedback;
CREATE TRIGGER feedback_to_examples
    AFTER INSERT ON pgsynapse.feedback
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.feedback_to_examples_v5();

DROP FUNCTION IF EXISTS pgsynapse.feedback_to_examples_v4();
