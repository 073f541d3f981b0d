-- Named queries of `pgsynapse migrate` (pgsynapse/migrate.py): the bookkeeping of the migrations, not the
-- migrations themselves (src/pgsynapse/migrations/NNNN_*.sql). Loaded by pgsynapse.queries.q(name, "migrate.sql").

-- name: migrations_tracked
SELECT to_regclass('public.pgsynapse_migrations') IS NOT NULL AS tracked;

-- name: applied_migrations
SELECT version FROM public.pgsynapse_migrations ORDER BY version;

-- name: migrate_lock
-- serialises concurrent `migrate` runs (two workers starting at once): a transaction lock, taken again in each
-- migration's transaction, so that a transaction pooler (PgBouncer) cannot take it on one server connection and
-- release it on another (a session lock did: the pooled server session kept it, and the next migrate waited)
SELECT pg_advisory_xact_lock(%(key)s);

-- name: migrate_try_lock
-- the lock at once, if no other `migrate` holds it (else the caller says it waits, then takes migrate_lock)
SELECT pg_try_advisory_xact_lock(%(key)s) AS locked;

-- name: migrate_lock_holder
-- The session holding the migration lock (a bigint key: classid its high half, objid its low one, objsubid 1): a
-- `migrate` or a starting worker applying migrations, or, idle for long, a session left holding it (an older
-- pgsynapse's migrate through a transaction pooler took it on one server connection and unlocked on another). state
-- and query are NULL for another role's session without pg_read_all_stats.
SELECT a.pid, a.application_name, a.state, round(extract(epoch FROM now() - a.state_change))::int AS state_seconds
FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid = (%(key)s::bigint >> 32)::oid AND l.objid = (%(key)s::bigint & 4294967295)::oid
  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
LIMIT 1;

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS public.pgsynapse_migrations (
    version int PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: record_migration
INSERT INTO public.pgsynapse_migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: pgvector_versions
SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector') AS installed,
       (SELECT default_version FROM pg_available_extensions WHERE name = 'vector') AS available;
