-- pgsynapse 0023: a job that is done with nothing to write (its row deleted, an image with no image model, a
-- retrain with no feedback to learn from) says why. The reason went only to the handler and was lost: the job read
-- `done` like one that wrote its result. The worker logs it too (`job_skipped`).

ALTER TABLE pgsynapse.jobs ADD COLUMN IF NOT EXISTS skip_reason text;
COMMENT ON COLUMN pgsynapse.jobs.skip_reason IS
    'done with nothing written, and why (the row was deleted, already done, nothing to learn from); NULL otherwise';
