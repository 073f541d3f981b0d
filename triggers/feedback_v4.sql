-- feedback v4: one training example per question, from its latest feedback row (the feedback's created_at, then
-- its id), as the A/B report counts verdicts (ab_report: a user who clicks twice does not count twice). Every
-- other example of the question is superseded by it (training_examples.superseded_by, migration 0021): it neither
-- counts toward retrain_min_feedback nor trains. A later click that changes the verdict (helpful, then not)
-- leaves the question no positive example; deleting the later row lets the one before it stand again. Otherwise
-- feedback_to_examples_v3.

-- the questions' latest examples stand, their others point at a later one (the latest when each was superseded).
-- Its callers are the trigger functions below, which run with their owner's rights and a fixed search_path (as
-- wake_v1's)
CREATE OR REPLACE FUNCTION pgsynapse.supersede_examples_v1(question_ids bigint[]) RETURNS void
LANGUAGE sql AS $$
    WITH latest AS (
        SELECT DISTINCT ON (te.question_id) te.question_id, te.id
        FROM pgsynapse.training_examples te JOIN pgsynapse.feedback fb ON fb.id = te.feedback_id
        WHERE te.question_id = ANY(question_ids)
        ORDER BY te.question_id, fb.created_at DESC, fb.id DESC
    )
    -- only what changes: the latest if it was superseded (its successor deleted, or older feedback written
    -- later), and the others that stood until now; an example already superseded stays as it is
    UPDATE pgsynapse.training_examples te
    SET superseded_by = CASE WHEN te.id = latest.id THEN NULL ELSE latest.id END
    FROM latest
    WHERE te.question_id = latest.question_id
      AND CASE WHEN te.id = latest.id THEN te.superseded_by IS NOT NULL ELSE te.superseded_by IS NULL END;
$$;
REVOKE ALL ON FUNCTION pgsynapse.supersede_examples_v1(bigint[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgsynapse.feedback_to_examples_v4() RETURNS trigger
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

REVOKE ALL ON FUNCTION pgsynapse.feedback_to_examples_v4() FROM PUBLIC;

DROP TRIGGER IF EXISTS feedback_to_examples ON pgsynapse.feedback;
CREATE TRIGGER feedback_to_examples
    AFTER INSERT ON pgsynapse.feedback
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.feedback_to_examples_v4();

-- a deleted feedback row takes its example with it (ON DELETE CASCADE): the question's latest remaining one stands
CREATE OR REPLACE FUNCTION pgsynapse.feedback_deleted_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    questions bigint[] := ARRAY(SELECT DISTINCT question_id FROM old_rows);
BEGIN
    -- the examples superseded by a deleted one stand again (its ON DELETE SET NULL has not run yet here)
    UPDATE pgsynapse.training_examples te SET superseded_by = NULL
    WHERE te.question_id = ANY(questions) AND te.superseded_by IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM pgsynapse.training_examples s WHERE s.id = te.superseded_by);
    PERFORM pgsynapse.supersede_examples_v1(questions);
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.feedback_deleted_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS feedback_deleted ON pgsynapse.feedback;
CREATE TRIGGER feedback_deleted
    AFTER DELETE ON pgsynapse.feedback
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.feedback_deleted_v1();
