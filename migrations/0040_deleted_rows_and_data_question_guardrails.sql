-- pgsynapse 0040: (1) a DELETE closes the failed jobs of the rows it deleted: `pgsynapse status` listed them as failed
-- until `retry-failed` closed them (triggers/deleted_rows_v1.sql); the failed jobs of rows deleted before this
-- migration are closed here. (2) Data questions are checked against the guardrail rules as questions are: one a block
-- rule matches ends 'blocked' (no statement generated), the rule that blocked or flagged it is recorded in
-- data_questions.guardrail, and an edit clears it (triggers/data_questions_v5.sql; data_questions_reask_v2 stays for
-- a release that still calls it). Idempotent.

-- (1) the lookup of a deleted row's failed jobs: few rows (failed jobs only), a key that never changes
CREATE INDEX IF NOT EXISTS jobs_failed_ref ON pgsynapse.jobs (kind, ref_id) WHERE status = 'failed';

-- pgsynapse:include deleted_rows_v1.sql

UPDATE pgsynapse.jobs j
SET status = 'done', finished_at = now(), lease_until = NULL, skip_reason = 'its row was deleted'
WHERE j.status = 'failed' AND j.ref_ids IS NULL AND CASE j.kind
    WHEN 'embed' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.documents r WHERE r.id = j.ref_id)
    WHEN 'answer' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.questions r WHERE r.id = j.ref_id)
    WHEN 'embed_image' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.images r WHERE r.id = j.ref_id)
    WHEN 'sql_answer' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.data_questions r WHERE r.id = j.ref_id)
    ELSE false
END;

-- (2) a guardrail rule that blocked or flagged the data question: {"rule_id", "action", "similarity", "rule", "stage"}
ALTER TABLE pgsynapse.data_questions ADD COLUMN IF NOT EXISTS guardrail jsonb;
ALTER TABLE pgsynapse.data_questions DROP CONSTRAINT IF EXISTS data_questions_status_check;
ALTER TABLE pgsynapse.data_questions ADD CONSTRAINT data_questions_status_check
    CHECK (status IN ('pending', 'answered', 'refused', 'failed', 'blocked'));

-- pgsynapse:include data_questions_v5.sql
