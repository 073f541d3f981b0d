-- pgsynapse 0024: a question's latency_ms is measured from when it was last asked. It was measured from the row's
-- created_at, so a question edited (asked again) a day later, or put back by `pgsynapse retry-failed` after an
-- outage, carried all the time before it into its latency and into the A/B report's p50 / p95. asked_at is the
-- INSERT's time, reset by an edit of the question (the reask triggers) and by retry-failed. The rows already there
-- keep NULL, read as created_at (coalesce in sql/answers.sql and sql/textsql.sql): no table rewrite.
ALTER TABLE pgsynapse.questions ADD COLUMN IF NOT EXISTS asked_at timestamptz;
ALTER TABLE pgsynapse.questions ALTER COLUMN asked_at SET DEFAULT now();
COMMENT ON COLUMN pgsynapse.questions.asked_at IS
    'when the question was last asked (its INSERT, an edit of its text, retry-failed): latency_ms counts from it; NULL: created_at';
ALTER TABLE pgsynapse.data_questions ADD COLUMN IF NOT EXISTS asked_at timestamptz;
ALTER TABLE pgsynapse.data_questions ALTER COLUMN asked_at SET DEFAULT now();
COMMENT ON COLUMN pgsynapse.data_questions.asked_at IS
    'when the question was last asked (its INSERT, an edit, retry-failed): latency_ms counts from it; NULL: created_at';

-- pgsynapse:include questions_v8.sql
-- pgsynapse:include data_questions_v3.sql
DROP FUNCTION IF EXISTS pgsynapse.questions_reask_v5();
DROP FUNCTION IF EXISTS pgsynapse.data_questions_reask_v1();
