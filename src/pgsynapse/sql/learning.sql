-- Named queries of the learning loop. Loaded by pgsynapse.queries.q(name, "learning.sql").

-- name: feedback_progress
-- `pgsynapse status`: the feedback so far, and how near the next automatic retrain is (the feedback trigger queues
-- one when the untrained examples that stand reach retrain_min_feedback); `pgsynapse retrain` and the retrain job:
-- whether there is any example to learn from. Examples: one per question, its latest feedback's (superseded_by,
-- migration 0021), with a positive passage
SELECT (SELECT count(*) FROM pgsynapse.feedback) AS rows,
       (SELECT count(DISTINCT question_id) FROM pgsynapse.feedback) AS questions,
       te.untrained, te.examples,
       (SELECT retrain_min_feedback FROM pgsynapse.learning_settings) AS retrain_min_feedback
FROM (SELECT count(*) FILTER (WHERE trained_in_version IS NULL) AS untrained, count(*) AS examples
      FROM pgsynapse.training_examples WHERE positive_chunk_id IS NOT NULL AND superseded_by IS NULL) te;

-- name: feedback_progress_readable
-- whether this role may read feedback_progress's tables: `pgsynapse feedback` as an application role
-- (pgsynapse_app) records the row without it
SELECT pg_catalog.has_table_privilege('pgsynapse.training_examples', 'SELECT')
       AND pg_catalog.has_table_privilege('pgsynapse.learning_settings', 'SELECT') AS readable;

-- name: feedback_examples
-- what the retrain trains on: one example per question, its latest feedback's, with a passage that still exists;
-- oldest first (the gate's hold-out is grouped, not a time slice: learning/holdout.py)
SELECT te.id, te.query, te.positive_chunk_id, te.negative_chunk_ids, te.created_at
FROM pgsynapse.training_examples te JOIN pgsynapse.chunks c ON c.id = te.positive_chunk_id
WHERE te.superseded_by IS NULL
ORDER BY te.created_at, te.id;

-- name: register_version
-- runtime_pending: no A/B traffic and no promotion until a worker has exported it to its configured runtime (or
-- recorded why it stays on torch): the A/B test measures the runtime that ships (migration 0013). A version the
-- gate rejected never serves, so none waits for an export.
-- passage_version_id: a query encoder searches that version's chunk vectors (migration 0014)
INSERT INTO pgsynapse.model_versions (name, kind, base_version_id, passage_version_id, artifact_path, runtime, dim,
                                      metrics, status, runtime_pending)
VALUES (%(name)s, 'embedding', %(base)s, %(passage)s, %(path)s, 'torch', %(dim)s, %(metrics)s, %(status)s,
        %(status)s = 'candidate')
RETURNING id;

-- name: insert_retrain_event
-- the retrain job's verdict in the registry's history: `registered` (passed the gate: a candidate, to be
-- backfilled) or `rejected`, the gate's reasons, by the worker that claimed the job
INSERT INTO pgsynapse.model_events (model_version_id, event, reason, figures, actor)
VALUES (%(version)s, %(event)s, %(reason)s, %(figures)s, (SELECT worker FROM pgsynapse.jobs WHERE id = %(job)s));

-- name: add_version
-- `pgsynapse model add`: any local model, of any dimension, as a candidate whose backfill starts now (created_at
-- is the backfill's start: status's ETA). runtime_pending when it is on torch and the workers serve another runtime.
INSERT INTO pgsynapse.model_versions (name, kind, artifact_path, runtime, dim, metrics, status, runtime_pending)
VALUES (%(name)s, 'embedding', %(path)s, %(runtime)s, %(dim)s, %(metrics)s, 'candidate', %(pending)s)
RETURNING id, name, artifact_path, runtime, dim, status, runtime_pending;

-- name: version_by_path
-- a version (not retired) of the model at %(path)s: served from it, added from it (`model add`, then exported to
-- the serving runtime), or serving the default model (%(default)s: the path is the configured or packaged one),
-- with no path of its own or none before its export
SELECT id, status FROM pgsynapse.model_versions
WHERE status <> 'retired'
  AND (artifact_path = %(path)s OR metrics->>'added_from' = %(path)s
       OR metrics->>'previous_artifact_path' = %(path)s
       OR (%(default)s AND (artifact_path IS NULL OR metrics->'previous_artifact_path' = 'null'::jsonb)))
ORDER BY id LIMIT 1;

-- name: list_versions
SELECT id, name, status, runtime, dim, traffic_percent, runtime_pending, backfilled_at
FROM pgsynapse.model_versions ORDER BY id;

-- name: other_candidates_traffic
-- `pgsynapse traffic`: the shares the other candidates hold (their ranges of sessions come first, in id order)
SELECT id, traffic_percent::float8 AS traffic_percent FROM pgsynapse.model_versions
WHERE status = 'candidate' AND id <> %(version)s AND traffic_percent > 0 ORDER BY id;

-- name: failed_backfill
SELECT last_error FROM pgsynapse.jobs
WHERE kind = 'backfill' AND ref_id = %(version)s AND status = 'failed'
ORDER BY id DESC LIMIT 1;

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
-- Chunks without an embedding of this version, in id order after the cursor %(after)s (the last chunk id of the
-- previous batch, carried in the next job's payload): each step reads only what is ahead of it, not the chunks
-- already done (from 0 every step, a backfill of n chunks would cost O(n^2 / batch)). A crashed backfill resumes
-- at its job's cursor; the last step re-reads from 0 for a chunk behind the cursor that an embed job wrote
-- without this version's vector.
SELECT c.id, d.title, c.text
FROM pgsynapse.chunks c JOIN pgsynapse.documents d ON d.id = c.document_id
WHERE c.id > %(after)s
  AND NOT EXISTS (SELECT 1 FROM pgsynapse.embeddings e WHERE e.model_version_id = %(version)s AND e.chunk_id = c.id)
ORDER BY c.id
LIMIT %(limit)s;

-- name: version_by_id
SELECT id, name, artifact_path, runtime, dim, status, traffic_percent, backfilled_at, metrics, passage_version_id,
       runtime_pending
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
-- ON CONFLICT: a resumed backfill never writes a duplicate. One statement, never a pipeline (psycopg's
-- executemany): see insert_chunks in queries.sql.
INSERT INTO pgsynapse.embeddings (chunk_id, model_version_id, embedding)
SELECT c, %(version)s, e FROM unnest(%(chunks)b::bigint[], %(embeddings)b::vector[]) AS u (c, e)
ON CONFLICT DO NOTHING;

-- name: notify_backfilled
SELECT pg_notify('pgsynapse_models', json_build_object('backfilled', %(version)s::int)::text);

-- name: traffic_set_by_hand
-- The share a person gave the version with `pgsynapse traffic` (its latest traffic_set event), if any: at the end of
-- its backfill it wins over the share its backfill job asked for when the version was registered.
SELECT (figures->>'traffic_percent')::float8 AS traffic_percent FROM pgsynapse.model_events
WHERE model_version_id = %(version)s AND event = 'traffic_set'
ORDER BY at DESC, id DESC LIMIT 1;

-- name: finish_backfill
-- A candidate takes its share of sessions, %(traffic)s: handlers.backfill.finish_backfill caps what it asked at
-- what the other candidates leave (learning.routing.share_left); the share it took.
UPDATE pgsynapse.model_versions v
SET backfilled_at = now(),
    traffic_percent = CASE WHEN v.status = 'candidate' THEN %(traffic)s ELSE v.traffic_percent END
WHERE v.id = %(version)s AND v.backfilled_at IS NULL
RETURNING v.traffic_percent::float8 AS traffic_percent;

-- name: demote_active
-- a candidate at 0 % again: the figures of its last A/B look (the test that promoted it) are not a test of its own
-- any more (a share given later starts a new one: ab_decisions); the model event of its promotion keeps them
UPDATE pgsynapse.model_versions SET status = 'candidate', traffic_percent = 0, deactivated_at = now(),
       metrics = metrics - 'ab'
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

-- name: reject_candidate
-- auto-rollback: a candidate significantly worse in its A/B test stops serving (retire deletes its vectors later)
UPDATE pgsynapse.model_versions SET status = 'rejected', traffic_percent = 0, deactivated_at = now()
WHERE id = %(version)s AND status = 'candidate'
RETURNING id;

-- name: version_rankers
-- the rankers (not retired) that rescore with a model version's stored vectors: path version:N (ranking/rescore.py)
SELECT id, status, path FROM pgsynapse.ranker_models
WHERE runtime = 'version' AND status <> 'retired'
ORDER BY id;

-- name: retire
UPDATE pgsynapse.model_versions SET status = 'retired', traffic_percent = 0, retired_at = now()
WHERE id = %(version)s AND status IN ('candidate', 'rejected')
RETURNING id;

-- name: unused_model_files
-- The model directories of retired versions, and of candidates their gate rejected (registered before a rejected
-- candidate's weights were deleted at once, or by a worker stopped in between), that pgsynapse made (a retrain's or
-- a distillation's candidate: a gate in its metrics; a runtime export: `export`) and that no version still in
-- service needs: not its files (the same artifact, or the torch directory an export replaced) and not its weights
-- (a query-side version encodes new documents with its passage version's model; a retrain and an export start
-- from their base version's). A model a user added by path is never listed: its files are the user's. A candidate
-- its A/B test rejected (its gate passed) keeps its files until it is retired: it can still be searched.
SELECT r.id, r.status, f.path
FROM pgsynapse.model_versions r
CROSS JOIN LATERAL (VALUES (CASE WHEN r.metrics ?| array['gate', 'export'] THEN r.artifact_path END),
                           (CASE WHEN r.metrics ? 'gate' THEN r.metrics->>'previous_artifact_path' END)) f(path)
WHERE (r.status = 'retired' OR (r.status = 'rejected' AND r.metrics->'gate'->>'passed' = 'false'))
  AND f.path IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM pgsynapse.model_versions l
                  WHERE l.status <> 'retired' AND l.id <> r.id
                    AND (r.id IN (l.passage_version_id, l.base_version_id)
                         OR f.path IN (l.artifact_path, l.metrics->>'previous_artifact_path')))
ORDER BY r.id;

-- name: count_version_embeddings
-- a version's vectors (its partition of pgsynapse.embeddings, dropped when it is retired: migration 0019)
SELECT count(*) AS n FROM pgsynapse.embeddings WHERE model_version_id = %(version)s;

-- name: version_has_vectors
-- whether a version has stored any chunk vector (a teacher to distil from must have)
SELECT EXISTS (SELECT 1 FROM pgsynapse.embeddings WHERE model_version_id = %(version)s) AS stored;

-- name: set_traffic
UPDATE pgsynapse.model_versions SET traffic_percent = %(traffic)s
WHERE id = %(version)s AND status = 'candidate'
RETURNING id;

-- name: backfill_progress
SELECT v.id, v.name, v.status, v.traffic_percent, v.backfilled_at,
       extract(epoch FROM now() - v.created_at)::float8 AS backfill_seconds,
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
), rated AS (
    -- one verdict per question, its latest feedback row on its current answer (question_verdicts_v1, migration 0039)
    SELECT version, helpful FROM pgsynapse.question_verdicts_v1
), f AS (
    SELECT version, count(*) AS rated, count(*) FILTER (WHERE helpful) AS helpful FROM rated GROUP BY version
)
SELECT v.id AS version, v.name, v.status, v.traffic_percent::float8 AS traffic_percent,
       coalesce(q.questions, 0) AS questions, coalesce(f.rated, 0) AS rated, coalesce(f.helpful, 0) AS helpful,
       q.p50_ms, q.p95_ms
FROM pgsynapse.model_versions v
LEFT JOIN q ON q.version = v.id
LEFT JOIN f ON f.version = v.id
WHERE v.status IN ('active', 'candidate') OR q.questions IS NOT NULL
ORDER BY v.id;


-- name: insert_model_event
INSERT INTO pgsynapse.model_events (model_version_id, event, reason, figures, actor)
VALUES (%(version)s, %(event)s, %(reason)s, %(figures)s, %(actor)s);

-- name: recent_model_events
SELECT id, model_version_id AS version, event, reason, figures, actor, at
FROM pgsynapse.model_events ORDER BY at DESC, id DESC LIMIT %(limit)s;

-- name: ab_in_progress
-- Is any candidate in an A/B test, routed (version_routed_v1, migration 0038)? (the worker's cheap check before it
-- evaluates one)
SELECT EXISTS (
    SELECT 1 FROM pgsynapse.model_versions v WHERE v.status = 'candidate' AND pgsynapse.version_routed_v1(v)
) AS running;

-- name: ab_decisions
-- Each candidate in an A/B test against the active version over the same period: the rated questions (one verdict
-- each, on the current answer, as in ab_report) routed to either since the candidate's first question was asked.
-- Sessions are split at random by a hash, so the two are compared on the same users' time, not on the active
-- version's history. A question's time is when it was last asked (asked_at; NULL: created_at): an old question
-- edited today and answered by the candidate starts its window today, not on the day the row was made. A version
-- that was active before (promoted, then rolled back, and given a share again) starts a new window: only its
-- questions since it left the active status count, never the figures it was promoted on.
WITH active AS (
    SELECT id FROM pgsynapse.model_versions WHERE status = 'active'
), cand AS (
    SELECT v.id, (SELECT min(coalesce(qq.asked_at, qq.created_at)) FROM pgsynapse.questions qq
                  WHERE qq.model_version_id = v.id
                    AND coalesce(qq.asked_at, qq.created_at) >= coalesce(v.deactivated_at, '-infinity')) AS since
    FROM pgsynapse.model_versions v
    WHERE v.status = 'candidate' AND pgsynapse.version_routed_v1(v)
), rated AS (
    -- an array, not IN (a join): the view's DISTINCT ON then takes the filter to the questions before its sort
    SELECT version, asked, helpful FROM pgsynapse.question_verdicts_v1
    WHERE version = ANY (ARRAY(SELECT id FROM cand UNION ALL SELECT id FROM active))
      AND asked >= (SELECT min(since) FROM cand)
)
SELECT c.id AS version, a.id AS active, c.since,
       count(*) FILTER (WHERE r.version = c.id) AS cand_rated,
       count(*) FILTER (WHERE r.version = c.id AND r.helpful) AS cand_helpful,
       count(*) FILTER (WHERE r.version = a.id) AS active_rated,
       count(*) FILTER (WHERE r.version = a.id AND r.helpful) AS active_helpful
FROM cand c CROSS JOIN active a
LEFT JOIN rated r ON r.version IN (c.id, a.id) AND r.asked >= c.since
WHERE c.since IS NOT NULL
GROUP BY c.id, a.id, c.since
ORDER BY c.id;

-- name: lock_candidate
-- The decision's re-check under the row lock: still a candidate in its A/B test, routed as ab_decisions found it
-- (another worker or a person may have acted meanwhile)
SELECT id FROM pgsynapse.model_versions v
WHERE id = %(version)s AND status = 'candidate' AND pgsynapse.version_routed_v1(v)
FOR UPDATE;

-- name: record_ab_look
-- The figures of the latest look at a candidate's A/B test (shown by `status`; the decision itself is a model event)
UPDATE pgsynapse.model_versions
SET metrics = coalesce(metrics, '{}'::jsonb) || jsonb_build_object('ab', %(figures)s::jsonb)
WHERE id = %(version)s;

-- name: stored_vectors
-- a version's stored chunk vectors, as text (the trainers parse them without pgvector's adapter)
SELECT chunk_id, embedding::text
FROM pgsynapse.embeddings
WHERE model_version_id = %(version)s;

-- name: lock_model_versions
-- promote, add, auto-promote: one change of the versions' statuses at a time (reads still go on)
LOCK TABLE pgsynapse.model_versions IN SHARE ROW EXCLUSIVE MODE;

-- name: ensure_embedding_index
-- a version's partial HNSW index, before its vectors are written (migration 0019)
SELECT pgsynapse.ensure_embedding_index(%(version)s);

-- name: notify_models
-- tell the workers a version changed: %(change)s is active, rejected or runtime (they reload the serving versions)
SELECT pg_notify('pgsynapse_models', json_build_object(%(change)s::text, %(version)s::int)::text);

-- name: try_decision_lock
-- auto-promotion's look: one worker at a time decides, the others skip this round
SELECT pg_try_advisory_xact_lock(hashtext(%(lock)s)) AS got;

-- name: queue_retrain
-- `pgsynapse retrain`: one retrain (or sql_retrain) at a time, as the triggers queue them: none is queued while
-- one is pending or running (NULL then)
WITH j AS (INSERT INTO pgsynapse.jobs (kind, ref_id, payload)
           SELECT %(kind)s, 0, %(payload)s
           WHERE NOT EXISTS (SELECT 1 FROM pgsynapse.jobs WHERE kind = %(kind)s AND status = 'running')
           ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING RETURNING id)
SELECT id, pg_notify('pgsynapse_jobs', json_build_object('kind', %(kind)s::text, 'n', 1)::text) FROM j;

-- name: upgrade_pending_retrain
-- the flags a command asked for (`{"force": true}`, `{"now": true}`), added to the retrain (or sql_retrain) pending
-- that kept it from queueing one (the threshold's, queued without them): the id when it took one it lacked
UPDATE pgsynapse.jobs SET payload = payload || %(flags)s
WHERE kind = %(kind)s AND status = 'pending' AND NOT payload @> %(flags)s
RETURNING id;

-- name: unfinished_retrain
-- the retrain (or sql_retrain) pending or running that kept `pgsynapse retrain` from queueing one (the one its
-- `--wait` waits for), and whether it is forced; no row when it ended meanwhile
SELECT id, status, coalesce((payload ->> 'force')::boolean, false) AS forced
FROM pgsynapse.jobs WHERE kind = %(kind)s AND status IN ('pending', 'running')
ORDER BY id DESC LIMIT 1;

-- name: job_state
SELECT status, last_error, skip_reason FROM pgsynapse.jobs WHERE id = %(job)s;

-- name: retrain_version
-- the version a retrain job registered: its `registered` or `rejected` event names the job (insert_retrain_event),
-- so a retrain that ran meanwhile (queued before this one, or a distillation) is never taken for it
SELECT v.id, v.status, v.metrics FROM pgsynapse.model_events e
JOIN pgsynapse.model_versions v ON v.id = e.model_version_id
WHERE e.event IN ('registered', 'rejected') AND e.figures->>'job' = %(job)s::text
ORDER BY e.id LIMIT 1;

-- name: set_retrain_min_feedback
UPDATE pgsynapse.learning_settings SET retrain_min_feedback = %(n)s;

-- name: set_sql_retrain_min_corrections
UPDATE pgsynapse.learning_settings SET sql_retrain_min_corrections = %(n)s;

-- name: runtime_export_requested
-- the runtime an export of this version was last asked for (tried once per version and runtime)
SELECT metrics->'runtime_export'->>'requested' AS requested FROM pgsynapse.model_versions WHERE id = %(version)s;

-- name: train_chunks
SELECT c.id, c.document_id, d.title, c.text
FROM pgsynapse.chunks c JOIN pgsynapse.documents d ON d.id = c.document_id
ORDER BY c.id;

-- name: train_documents
-- the documents with chunks, whole: the corpus pairs come from their titles and headings
SELECT id, coalesce(title, ''), coalesce(body, '') FROM pgsynapse.documents
WHERE EXISTS (SELECT 1 FROM pgsynapse.chunks c WHERE c.document_id = documents.id);

-- name: distill_chunks
-- every chunk with the teacher's stored vector of it
SELECT c.id, c.document_id, d.title, c.text, e.embedding
FROM pgsynapse.chunks c
JOIN pgsynapse.documents d ON d.id = c.document_id
JOIN pgsynapse.embeddings e ON e.chunk_id = c.id AND e.model_version_id = %(version)s
ORDER BY c.id;

-- name: distill_feedback
SELECT DISTINCT ON (te.query) te.query, c.document_id
FROM pgsynapse.training_examples te JOIN pgsynapse.chunks c ON c.id = te.positive_chunk_id
ORDER BY te.query, te.id;

-- name: distill_questions
-- questions asked that no feedback example holds: the student learns the teacher's vectors of them too
SELECT DISTINCT text FROM pgsynapse.questions
WHERE text <> '' AND text NOT IN (SELECT query FROM pgsynapse.training_examples)
ORDER BY 1 LIMIT %(limit)s;
