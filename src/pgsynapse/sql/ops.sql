-- Named queries of operations: metrics, health and ingest. Loaded by pgsynapse.queries.q(name, "ops.sql").

-- name: queue_depth
-- The metrics scrape's view of the queue, read through the partial indexes only (jobs_claim, jobs_running_lease,
-- jobs_failed): done jobs, the bulk of the table, are not counted at scrape time (each worker counts its own in
-- pgsynapse_jobs_processed_total; `pgsynapse status` counts them all, on demand).
SELECT kind, sum(pending)::bigint AS pending, sum(running)::bigint AS running, sum(failed)::bigint AS failed,
       max(oldest_pending_seconds) AS oldest_pending_seconds
FROM (
    SELECT kind, count(*) AS pending, 0 AS running, 0 AS failed,
           extract(epoch FROM now() - min(coalesce(queued_at, created_at))) AS oldest_pending_seconds
    FROM pgsynapse.jobs WHERE status = 'pending' GROUP BY kind
    UNION ALL
    SELECT kind, 0, count(*), 0, NULL FROM pgsynapse.jobs WHERE status = 'running' GROUP BY kind
    UNION ALL
    SELECT kind, 0, 0, count(*), NULL FROM pgsynapse.jobs WHERE status = 'failed' GROUP BY kind
) by_status
GROUP BY kind
ORDER BY kind;

-- name: model_versions_metrics
-- the active version's traffic_percent is replaced by what the routed candidates leave it (served_shares); a
-- retired version has no series (its vectors are gone, it never serves again: a series of a thing that is gone
-- goes, as Prometheus expects), a rejected one keeps its own (searched until it is retired)
SELECT id, name, runtime, status, traffic_percent FROM pgsynapse.model_versions
WHERE status <> 'retired'
ORDER BY id;

-- name: health_ping
SELECT 1 AS ok;

-- name: existing_hashes
-- Ingest's idempotency check: which of these contents are already stored.
SELECT DISTINCT content_hash FROM pgsynapse.documents WHERE content_hash = ANY(%(hashes)s);

-- name: copy_documents
COPY pgsynapse.documents (source, title, body, metadata) FROM STDIN;

-- name: documents_by_source
-- Ingest: the newest stored document of each of these sources (a changed file's old version)
SELECT DISTINCT ON (source) source, id FROM pgsynapse.documents WHERE source = ANY(%(sources)s)
ORDER BY source, id DESC;

-- name: replace_document
-- Ingest --replace: the file's new content; the update trigger queues the document's embed job
UPDATE pgsynapse.documents SET title = %(title)s, body = %(body)s, metadata = metadata || %(metadata)s::jsonb
WHERE id = %(id)s;

-- name: move_images_of_other_versions
-- Ingest --replace, before drop_other_versions: the images linked to the versions it deletes (ON DELETE SET NULL
-- left them unlinked: the picture beside the file stored twice, once with no document). One that ingest stored
-- from a file beside the version (its source in the same directory) is deleted: the run stores the file's picture
-- for the kept document, or has (a file since changed or removed leaves no stale picture); so is a picture the kept
-- document has already (content_hash). Any other (an application's) is linked to the kept document of its source,
-- not embedded again (an UPDATE of the link alone); one picture once, when several deleted versions bring it.
WITH versions AS (
    SELECT d.id AS dropped, min(k.id) AS kept, regexp_replace(f.source, '[^/]*$', '') AS dir
    FROM unnest(%(sources)s::text[], %(hashes)s::text[]) AS f(source, hash)
    JOIN pgsynapse.documents d ON d.source = f.source AND d.content_hash <> f.hash
    JOIN pgsynapse.documents k ON k.source = f.source AND k.content_hash = f.hash
    GROUP BY d.id, f.source
), moved AS (
    SELECT i.id, v.kept, regexp_replace(i.source, '[^/]*$', '') IS NOT DISTINCT FROM v.dir OR (
        i.content_hash IS NOT NULL AND (
            row_number() OVER (PARTITION BY v.kept, i.content_hash ORDER BY i.id) > 1
            OR EXISTS (SELECT 1 FROM pgsynapse.images o WHERE o.document_id = v.kept AND o.content_hash = i.content_hash))
    ) AS gone
    FROM pgsynapse.images i JOIN versions v ON i.document_id = v.dropped
), deleted AS (
    DELETE FROM pgsynapse.images i USING moved m WHERE i.id = m.id AND m.gone
)
UPDATE pgsynapse.images i SET document_id = m.kept FROM moved m WHERE i.id = m.id AND NOT m.gone;

-- name: drop_other_versions
-- Ingest --replace: a file is its source's one document. The source's documents with other content (old versions
-- that runs without --replace kept beside it) are deleted, once the file's content is stored under its source
-- (a content stored only under another source is no reason to delete anything).
DELETE FROM pgsynapse.documents d USING unnest(%(sources)s::text[], %(hashes)s::text[]) AS f(source, hash)
WHERE d.source = f.source AND d.content_hash <> f.hash
  AND EXISTS (SELECT 1 FROM pgsynapse.documents k WHERE k.source = f.source AND k.content_hash = f.hash);

-- name: documents_by_hash
SELECT id FROM pgsynapse.documents WHERE content_hash = ANY(%(hashes)s);

-- name: follow_progress
SELECT count(*) FILTER (WHERE status = 'embedded') AS embedded,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'pending') AS pending
FROM pgsynapse.documents WHERE id = ANY(%(ids)s);

-- name: ingest_lock
-- Serialises concurrent ingests' "is it new?" decisions (transaction-scoped; db.take_xact_lock waits in slices)
SELECT pg_advisory_xact_lock(hashtext('pgsynapse.ingest'));

-- name: documents_stored
-- `pgsynapse ask`: whether there is any document for an answer to come from
SELECT EXISTS (SELECT 1 FROM pgsynapse.documents) AS stored;

-- name: documents_waiting
-- `pgsynapse ask` with no worker running, `pgsynapse search`: documents that no answer can find until a worker
-- embeds them
SELECT count(*) AS n FROM pgsynapse.documents WHERE status = 'pending';

-- name: failed_job_errors
-- `pgsynapse status`: why jobs failed, the commonest errors first (the failed rows stay for retry-failed)
SELECT kind, last_error AS error, count(*) AS n, max(finished_at) AS last_at
FROM pgsynapse.jobs WHERE status = 'failed'
GROUP BY kind, last_error ORDER BY n DESC, last_at DESC LIMIT %(limit)s;

-- name: skipped_job_reasons
-- `pgsynapse status`: jobs done with nothing to write, and why (migration 0023), over the done jobs still kept
SELECT kind, skip_reason AS reason, count(*) AS n
FROM pgsynapse.jobs WHERE status = 'done' AND skip_reason IS NOT NULL
GROUP BY kind, skip_reason ORDER BY n DESC, kind LIMIT %(limit)s;

-- name: workers_answering
-- `pgsynapse ask` / `sql-ask`: whether a worker on this database takes the kind of job (else the question would wait):
-- one listening, and among the workers seen lately one that runs the kind, or none registered yet (it registers
-- before its worker_started). A function (migration 0030): an application role may not read pgsynapse.workers
SELECT listening, seen, taking FROM pgsynapse.workers_taking_v1(%(kind)s);

-- name: status_counts
SELECT (SELECT count(*) FROM pgsynapse.documents) AS documents,
       (SELECT count(*) FROM pgsynapse.documents WHERE status = 'pending') AS documents_pending,
       (SELECT count(*) FROM pgsynapse.documents WHERE status = 'failed') AS documents_failed,
       (SELECT count(*) FROM pgsynapse.chunks) AS chunks,
       (SELECT count(*) FROM pgsynapse.embeddings) AS embeddings;

-- name: status_versions
SELECT id, name, runtime, dim, status, traffic_percent, runtime_pending, backfilled_at, metrics->'ab' AS ab
FROM pgsynapse.model_versions ORDER BY id;

-- name: runtime_export_state
-- `pgsynapse status`: an export of a model version to the workers' runtime under way (minutes on a small host, at a
-- first start before the worker registers): the sessions holding the export lock (pgsynapse/export/register.py,
-- pg_advisory_xact_lock(hashtext(%(lock)s))) and those waiting for it. An advisory lock on a bigint key is shown in
-- pg_locks as its high 32 bits (classid) and low 32 bits (objid), objsubid 1. seconds: since the holder's
-- transaction (the export's) began; NULL where pg_stat_activity hides it from this role. holder: the holder's
-- application_name (shown to every role), which tells `pgsynapse model export --switch` (%(command)s, then " vN")
-- from a worker at its start (pgsynapse/db.py, runtime_export); workers_waiting: the waiting sessions not named so.
WITH k AS (SELECT hashtext(%(lock)s)::bigint AS key)
SELECT count(*) FILTER (WHERE l.granted) AS exporting, count(*) FILTER (WHERE NOT l.granted) AS waiting,
       round(extract(epoch FROM now() - min(a.xact_start) FILTER (WHERE l.granted)))::float AS seconds,
       min(a.application_name) FILTER (WHERE l.granted) AS holder,
       count(*) FILTER (WHERE NOT l.granted AND coalesce(a.application_name, '') <> %(command)s
                          AND coalesce(a.application_name, '') NOT LIKE %(command)s || ' v%%') AS workers_waiting
FROM pg_catalog.pg_locks l
CROSS JOIN k
LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
  AND l.classid::bigint = (k.key >> 32) & 4294967295 AND l.objid::bigint = k.key & 4294967295;

-- name: table_lock_holders
-- table_locks.lock_table: the other sessions holding a lock on %(table)s that conflicts with SHARE ROW EXCLUSIVE
-- (ACCESS SHARE and ROW SHARE do not), oldest transaction first
SELECT a.pid, a.application_name, a.usename AS role, a.state,
       round(extract(epoch FROM clock_timestamp() - a.xact_start)::numeric, 1)::float AS transaction_seconds
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.relation = %(table)s::regclass AND l.granted
  AND l.pid <> pg_backend_pid() AND l.mode NOT IN ('AccessShareLock', 'RowShareLock')
ORDER BY a.xact_start NULLS LAST
LIMIT 5;
