-- pgsynapse 0006: done jobs are history. Workers delete those finished more than `done_job_retention_seconds`
-- ago (default 7 days; 0 keeps them), a bounded batch at a time; this index keeps that from scanning the queue.
-- Failed jobs are kept: they are what `pgsynapse retry-failed` acts on.

CREATE INDEX IF NOT EXISTS jobs_done_finished ON pgsynapse.jobs (finished_at) WHERE status = 'done';
