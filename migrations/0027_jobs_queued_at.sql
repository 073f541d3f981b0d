-- pgsynapse 0027: when a job was last put in the queue: NULL for its creation (read as created_at; no table
-- rewrite), set by retry-failed. The queue's age (`pgsynapse status`, pgsynapse_queue_oldest_pending_seconds and
-- its alert) and the insert -> result latency (pgsynapse_insert_to_result_seconds) count from it: a job that failed
-- three hours ago counted as three hours old, and its result three hours late, the moment it was put back.
ALTER TABLE pgsynapse.jobs ADD COLUMN IF NOT EXISTS queued_at timestamptz;
