-- pgsynapse 0030: whether a worker on this database takes a kind of job, for `pgsynapse ask` and `sql-ask`: a
-- worker that listens but runs other kinds (PGSYNAPSE_KINDS=embed) never answers, and the command waited out its
-- timeout. An application role may not read pgsynapse.workers (host names, pids, models: operations.md's roles),
-- so the counts come from this function, with its owner's rights. Listening: the workers' LISTEN connections;
-- seen: workers whose heartbeat (every 10 s at most) is under 120 s old, as `status` calls a worker stale after
-- it; taking: those of them that run job_kind.
CREATE OR REPLACE FUNCTION pgsynapse.workers_taking_v1(job_kind text)
RETURNS TABLE (listening bigint, seen bigint, taking bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
    SELECT (SELECT count(*) FROM pg_stat_activity
            WHERE application_name = 'pgsynapse-listener' AND datname = current_database()),
           count(*), count(*) FILTER (WHERE job_kind = ANY(w.kinds))
    FROM pgsynapse.workers w WHERE w.heartbeat_at > now() - interval '120 seconds';
$$;
REVOKE ALL ON FUNCTION pgsynapse.workers_taking_v1(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgsynapse.workers_taking_v1(text) TO pgsynapse_app, pgsynapse_worker, pgsynapse_admin;
