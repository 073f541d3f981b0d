-- pgsynapse 0017: autovacuum for the job queue at size (issue 21; bench/scale.py --part queue, BENCHMARKS.md).
-- Every job is inserted, updated to running and to done, and later deleted: each step leaves a dead tuple, and the
-- partial indexes the claim reads (jobs_claim, jobs_pending_dedup) keep pointing at them until a VACUUM. With the
-- server's defaults autovacuum comes after 50 + 20 % of the table's rows are dead: at 10 M retained done jobs that
-- is 2 M, while the bench shows the claim index doubling and the claim's latency tripling after 20 k jobs of churn.
-- Here a vacuum comes after 2,000 + 1 % (about 100 k at 10 M rows), and an analyze after 2 % so the claim's plan
-- follows the pending count. Idempotent (ALTER TABLE ... SET only sets).
ALTER TABLE pgsynapse.jobs SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
