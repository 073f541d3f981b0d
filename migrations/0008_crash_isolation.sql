-- pgsynapse 0008: crash isolation. A job whose lease expired while it shared a batch (its worker died or hung,
-- and any job of the batch may be the cause) is refunded that attempt and requeued `solo`: it is claimed alone,
-- while its worker holds no other batch, until it is done. An expiry while claimed alone is that job's own and
-- counts toward max_attempts, so a row that kills its worker fails alone and its batch-mates end done.

ALTER TABLE pgsynapse.jobs ADD COLUMN IF NOT EXISTS solo boolean NOT NULL DEFAULT false;
-- the solo claim's index (empty unless a worker died); the batch claim keeps jobs_claim
CREATE INDEX IF NOT EXISTS jobs_claim_solo ON pgsynapse.jobs (kind, run_after, id) WHERE status = 'pending' AND solo;
