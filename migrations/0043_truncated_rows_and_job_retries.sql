-- pgsynapse 0043: (1) a TRUNCATE of documents, questions, images or data questions closes the failed jobs of the
-- rows it removed, as a DELETE does since 0040: a TRUNCATE fires no DELETE trigger, so `pgsynapse status` listed
-- them as failed until `retry-failed` closed them (triggers/truncated_rows_v1.sql); the failed jobs of rows
-- truncated before this migration are closed here. (2) The view job_retries_v1 shows an application (pgsynapse_app,
-- which may not read the queue) the row whose job failed and is tried again: during the retries the row stays
-- 'pending' with error NULL, like a row still queued. Idempotent.

-- pgsynapse:include truncated_rows_v1.sql

UPDATE pgsynapse.jobs j
SET status = 'done', finished_at = now(), lease_until = NULL, skip_reason = 'its row was deleted'
WHERE j.status = 'failed' AND j.ref_ids IS NULL AND CASE j.kind
    WHEN 'embed' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.documents r WHERE r.id = j.ref_id)
    WHEN 'answer' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.questions r WHERE r.id = j.ref_id)
    WHEN 'embed_image' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.images r WHERE r.id = j.ref_id)
    WHEN 'sql_answer' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.data_questions r WHERE r.id = j.ref_id)
    ELSE false
END;

-- (2) one row per unfinished job of an application's row (a document, question, image or data question) that failed
-- before and is tried again: its attempts so far, the error of the last one, and when it is tried next. Only the
-- kinds of the rows an application reads, and the error its row gets if the job fails for good; never a retrain's
-- or a backfill's. A bulk load's single job (ref_ids) is not listed: its documents are not retried one by one.
CREATE OR REPLACE VIEW pgsynapse.job_retries_v1 AS
SELECT CASE kind WHEN 'embed' THEN 'documents' WHEN 'answer' THEN 'questions' WHEN 'embed_image' THEN 'images'
           ELSE 'data_questions' END AS row_table,
       ref_id AS row_id, kind, status, attempts, last_error, run_after AS next_attempt_after
FROM pgsynapse.jobs
WHERE kind IN ('embed', 'answer', 'embed_image', 'sql_answer') AND status IN ('pending', 'running')
  AND last_error IS NOT NULL AND ref_ids IS NULL;

GRANT SELECT ON pgsynapse.job_retries_v1 TO pgsynapse_app, pgsynapse_worker, pgsynapse_admin;
