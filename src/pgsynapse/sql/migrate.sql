-- Named queries of `pgsynapse migrate` (pgsynapse/migrate.py): the bookkeeping of the migrations, not the
-- migrations themselves (src/pgsynapse/migrations/NNNN_*.sql). Loaded by pgsynapse.queries.q(name, "migrate.sql").

-- name: migrations_tracked
SELECT to_regclass('public.pgsynapse_migrations') IS NOT NULL AS tracked;

-- name: applied_migrations
SELECT version FROM public.pgsynapse_migrations ORDER BY version;

-- name: migrate_lock
-- serialises concurrent `migrate` runs (two workers starting at once)
SELECT pg_advisory_lock(%(key)s);

-- name: migrate_try_lock
-- the lock at once, if no other `migrate` holds it (else the caller says it waits, then takes migrate_lock)
SELECT pg_try_advisory_lock(%(key)s) AS locked;

-- name: migrate_unlock
SELECT pg_advisory_unlock(%(key)s);

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
