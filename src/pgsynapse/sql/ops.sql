-- Named queries of operations: metrics, health and ingest. Loaded by pgsynapse.queries.q(name, "ops.sql").

-- name: model_versions_metrics
SELECT id, name, runtime, status, traffic_percent FROM pgsynapse.model_versions ORDER BY id;

-- name: health_ping
SELECT 1 AS ok;

-- name: existing_hashes
-- Ingest's idempotency check: which of these contents are already stored.
SELECT DISTINCT content_hash FROM pgsynapse.documents WHERE content_hash = ANY(%(hashes)s);

-- name: copy_documents
COPY pgsynapse.documents (source, title, body, metadata) FROM STDIN;

-- name: documents_by_hash
SELECT id FROM pgsynapse.documents WHERE content_hash = ANY(%(hashes)s);

-- name: follow_progress
SELECT count(*) FILTER (WHERE status = 'embedded') AS embedded,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'pending') AS pending
FROM pgsynapse.documents WHERE id = ANY(%(ids)s);

-- name: ingest_lock
-- Serialises concurrent ingests' "is it new?" decisions (transaction-scoped).
SELECT pg_advisory_xact_lock(hashtext('pgsynapse.ingest'));
