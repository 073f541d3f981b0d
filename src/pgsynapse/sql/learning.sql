-- Named queries of the learning loop. Loaded by pgsynapse.queries.q(name, "learning.sql").

-- name: untrained_examples
SELECT count(*) AS n FROM pgsynapse.training_examples
WHERE trained_in_version IS NULL AND positive_chunk_id IS NOT NULL;

-- name: register_version
INSERT INTO pgsynapse.model_versions (name, kind, base_version_id, passage_version_id, artifact_path, runtime, dim,
                                      metrics, status)
VALUES (%(name)s, 'embedding', %(base)s, %(passage)s, %(path)s, 'torch', %(dim)s, %(metrics)s, %(status)s)
RETURNING id;

-- name: mark_examples_trained
UPDATE pgsynapse.training_examples SET trained_in_version = %(version)s
WHERE id = ANY(%(ids)s) AND trained_in_version IS NULL;

-- name: enqueue_backfill
WITH j AS (
    INSERT INTO pgsynapse.jobs (kind, ref_id, payload, run_after)
    VALUES ('backfill', %(version)s, %(payload)s, now() + make_interval(secs => %(delay)s))
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING
    RETURNING id
)
SELECT pg_notify('pgsynapse_jobs', json_build_object('kind', 'backfill', 'n', 1)::text) FROM j;

-- name: missing_chunks
-- Chunks without an embedding of this version, oldest first: a crashed backfill resumes where it stopped.
SELECT c.id, d.title, c.text
FROM pgsynapse.chunks c JOIN pgsynapse.documents d ON d.id = c.document_id
WHERE NOT EXISTS (SELECT 1 FROM pgsynapse.embeddings e WHERE e.model_version_id = %(version)s AND e.chunk_id = c.id)
ORDER BY c.id
LIMIT %(limit)s;

-- name: version_by_id
SELECT id, name, artifact_path, runtime, dim, status, traffic_percent, backfilled_at, metrics, passage_version_id
FROM pgsynapse.model_versions WHERE id = %(version)s;

-- name: copy_passage_embeddings
-- A query encoder's backfill: the chunk vectors of its passage version, copied, not encoded again.
INSERT INTO pgsynapse.embeddings (chunk_id, model_version_id, embedding)
SELECT chunk_id, %(version)s, embedding FROM pgsynapse.embeddings
WHERE model_version_id = %(passage)s AND chunk_id = ANY(%(ids)s)
ON CONFLICT DO NOTHING;

-- name: passage_has_chunks
SELECT chunk_id FROM pgsynapse.embeddings WHERE model_version_id = %(passage)s AND chunk_id = ANY(%(ids)s);

-- name: lock_backfill_version
-- The backfill write's stale-write guard: the version's status, read under a share lock held to the end of the
-- write's transaction. A retire that committed first is seen (the caller writes nothing and reports the job
-- superseded); a retire that comes later waits for the write, then deletes what it wrote too.
SELECT status FROM pgsynapse.model_versions WHERE id = %(version)s FOR SHARE;

-- name: insert_backfill_embeddings
-- ON CONFLICT: a resumed backfill never writes a duplicate
INSERT INTO pgsynapse.embeddings (chunk_id, model_version_id, embedding) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING;

-- name: notify_backfilled
SELECT pg_notify('pgsynapse_models', json_build_object('backfilled', %(version)s::int)::text);

-- name: finish_backfill
UPDATE pgsynapse.model_versions
SET backfilled_at = now(), traffic_percent = CASE WHEN status = 'candidate' THEN %(traffic)s ELSE traffic_percent END
WHERE id = %(version)s AND backfilled_at IS NULL;

-- name: routable_versions
SELECT id, name, artifact_path, runtime, dim, status, traffic_percent, passage_version_id
FROM pgsynapse.model_versions
WHERE status = 'active' OR (status = 'candidate' AND backfilled_at IS NOT NULL AND traffic_percent > 0)
ORDER BY id;

-- name: demote_active
UPDATE pgsynapse.model_versions SET status = 'candidate', traffic_percent = 0, deactivated_at = now()
WHERE status = 'active' AND id <> %(version)s
RETURNING id;

-- name: activate
UPDATE pgsynapse.model_versions SET status = 'active', traffic_percent = 100, activated_at = now()
WHERE id = %(version)s AND status = 'candidate' AND backfilled_at IS NOT NULL
RETURNING id;

-- name: previous_active
SELECT id FROM pgsynapse.model_versions
WHERE status = 'candidate' AND deactivated_at IS NOT NULL AND backfilled_at IS NOT NULL
ORDER BY deactivated_at DESC LIMIT 1;

-- name: retire
UPDATE pgsynapse.model_versions SET status = 'retired', traffic_percent = 0, retired_at = now()
WHERE id = %(version)s AND status IN ('candidate', 'rejected')
RETURNING id;

-- name: delete_version_embeddings
DELETE FROM pgsynapse.embeddings WHERE model_version_id = %(version)s;

-- name: set_traffic
UPDATE pgsynapse.model_versions SET traffic_percent = %(traffic)s
WHERE id = %(version)s AND status = 'candidate'
RETURNING id;

-- name: backfill_progress
SELECT v.id, v.name, v.status, v.traffic_percent, v.backfilled_at,
       (SELECT count(*) FROM pgsynapse.embeddings e WHERE e.model_version_id = v.id) AS embedded,
       (SELECT count(*) FROM pgsynapse.chunks) AS chunks
FROM pgsynapse.model_versions v
WHERE v.status IN ('active', 'candidate')
ORDER BY v.id;

-- name: ab_report
WITH q AS (
    SELECT model_version_id AS version, count(*) AS questions,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_ms
    FROM pgsynapse.questions
    WHERE model_version_id IS NOT NULL AND status IN ('answered', 'blocked')
    GROUP BY model_version_id
), f AS (
    SELECT qq.model_version_id AS version, count(*) AS rated,
           count(*) FILTER (WHERE coalesce(fb.helpful, fb.rating >= 4)) AS helpful
    FROM pgsynapse.feedback fb JOIN pgsynapse.questions qq ON qq.id = fb.question_id
    WHERE qq.model_version_id IS NOT NULL
    GROUP BY qq.model_version_id
)
SELECT v.id AS version, v.name, v.status, v.traffic_percent::float8 AS traffic_percent,
       coalesce(q.questions, 0) AS questions, coalesce(f.rated, 0) AS rated, coalesce(f.helpful, 0) AS helpful,
       q.p50_ms, q.p95_ms
FROM pgsynapse.model_versions v
LEFT JOIN q ON q.version = v.id
LEFT JOIN f ON f.version = v.id
WHERE v.status IN ('active', 'candidate') OR q.questions IS NOT NULL
ORDER BY v.id;
