-- pgsynapse 0005: running workers register themselves (for `pgsynapse status`): what they process, which model
-- versions they hold with which runtime, load time and memory, and the process's resident memory.

CREATE TABLE IF NOT EXISTS pgsynapse.workers (
    worker_id    text PRIMARY KEY,          -- host:pid:random, as in jobs.worker
    host         text NOT NULL,
    pid          int NOT NULL,
    kinds        text[] NOT NULL,
    -- [{"version", "name", "runtime", "path", "load_seconds", "rss_added_mb"}, ...]
    models       jsonb NOT NULL DEFAULT '[]',
    rss_mb       double precision,
    processed    jsonb NOT NULL DEFAULT '{}',
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
