-- pgsynapse 0046: (1) one definition of "the job's row is no more" (deleted or truncated while its job ran):
-- queries.sql's reap_expired_leases (a job out of attempts on lease expiry) and close_job_of_removed_row (one that
-- fails for good in its worker) each wrote the same CASE out before; both close such a job as done, skip_reason 'its
-- row was deleted'. 0040 and 0043 keep their own copies (what they ran, once). (2) Answers recorded before the answer
-- handler dropped it (ranking/rescore.py rescores) name as their ranker a teacher ranker (runtime 'version', path
-- 'version:N') that is the model version N that answered them, promoted since: its own vectors found the
-- candidates, so it left their order as it was, and ab-report credited it with them. They record no ranker now, as
-- the handler records such answers. Idempotent.

-- (1) a bulk load's job (ref_ids) is not one row's: never. Its arguments are named by position ($1...) in the body:
-- a column of the tables read would win over a parameter of the same name. LANGUAGE sql, STABLE (it reads tables:
-- the calling statement's snapshot, as the CASE written out had), neither STRICT (ref_ids is NULL for one row's job)
-- nor SECURITY DEFINER: it reads what its caller, the worker, may read. Its subqueries keep the planner from
-- inlining it: about 19 us a job against 3.5 us written out (40,000 jobs judged, 2-core machine), paid only for the
-- jobs whose lease expired and the one job that fails for good.
CREATE OR REPLACE FUNCTION pgsynapse.job_row_removed_v1(kind text, ref_id bigint, ref_ids bigint[]) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT $3 IS NULL AND CASE $1
        WHEN 'embed' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.documents r WHERE r.id = $2)
        WHEN 'answer' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.questions r WHERE r.id = $2)
        WHEN 'embed_image' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.images r WHERE r.id = $2)
        WHEN 'sql_answer' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.data_questions r WHERE r.id = $2)
        ELSE false
    END
$$;
REVOKE ALL ON FUNCTION pgsynapse.job_row_removed_v1(text, bigint, bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgsynapse.job_row_removed_v1(text, bigint, bigint[]) TO pgsynapse_worker, pgsynapse_admin;

-- (2) N as rescore.version_of reads it (digits after 'version:', so 'version:01' is version 1); the CASE keeps the
-- cast off every other path ('/models/x' would not cast)
UPDATE pgsynapse.questions q
SET ranker_id = NULL
FROM pgsynapse.ranker_models r
WHERE q.ranker_id = r.id AND r.runtime = 'version'
  AND CASE WHEN r.path ~ '^version:[0-9]+$' THEN substr(r.path, length('version:') + 1)::numeric END
      = q.model_version_id;
