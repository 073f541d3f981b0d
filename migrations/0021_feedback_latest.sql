-- pgsynapse 0021: one training example per question, from its latest feedback row, as the A/B report already
-- counts verdicts. Before it, every feedback row was an example: a user who clicked "helpful" ten times on one
-- answer put that question ten times into the next retrain and counted ten towards retrain_min_feedback, and one
-- who clicked "helpful" and then "not helpful" still trained on the first. An example that a later feedback row of
-- the same question replaces points at it (superseded_by) and is left out of the threshold's count, the retrain
-- and the ranker's training; deleting the later row lets the one before it stand again.
ALTER TABLE pgsynapse.training_examples
    ADD COLUMN IF NOT EXISTS superseded_by bigint REFERENCES pgsynapse.training_examples (id) ON DELETE SET NULL;
CREATE INDEX IF NOT EXISTS training_examples_question ON pgsynapse.training_examples (question_id);

-- the threshold's count reads the untrained examples that stand
DROP INDEX IF EXISTS pgsynapse.training_examples_untrained;
CREATE INDEX IF NOT EXISTS training_examples_untrained_v2 ON pgsynapse.training_examples (created_at)
    WHERE trained_in_version IS NULL AND superseded_by IS NULL;

-- pgsynapse:include feedback_v4.sql

-- the examples already there: each question's latest stands, as the triggers keep it from now on
SELECT pgsynapse.supersede_examples_v1(ARRAY(SELECT DISTINCT question_id FROM pgsynapse.training_examples
                                             WHERE question_id IS NOT NULL));
