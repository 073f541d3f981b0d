-- The ranker trainer's reads (pgsynapse.ranking.train): the same examples and chunks the retrain job reads. The
-- registry's own queries (pgsynapse.ranker_models) are side_models.sql's, run by pgsynapse.sideregistry.

-- name: ranker_examples
-- feedback's training examples, oldest first: the question and the chunk its helpful page was marked by (one per
-- question, its latest feedback's: learning.sql's feedback_examples)
SELECT te.query, te.positive_chunk_id
FROM pgsynapse.training_examples te
JOIN pgsynapse.chunks c ON c.id = te.positive_chunk_id
WHERE te.superseded_by IS NULL
ORDER BY te.created_at, te.id;

-- name: ranker_chunks
SELECT c.id, c.document_id, d.title, c.text
FROM pgsynapse.chunks c
JOIN pgsynapse.documents d ON d.id = c.document_id
ORDER BY c.id;

-- name: ranker_documents
-- the documents with chunks, for the corpus pairs (titles, headings, parameter entries)
SELECT id, coalesce(title, ''), coalesce(body, '')
FROM pgsynapse.documents
WHERE EXISTS (SELECT 1 FROM pgsynapse.chunks c WHERE c.document_id = documents.id);

-- name: ab_report_rankers
-- the rankers' A/B: per ranker (NULL: the vector order) answered questions, their latency, and the rated ones (one
-- verdict per question, its latest feedback row on its current answer: question_verdicts_v1, migration 0039, as
-- ab_report counts for versions); every active or candidate ranker and the vector order are listed, and any other
-- ranker that answered questions
WITH q AS (
    SELECT ranker_id, count(*) AS questions,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_ms
    FROM pgsynapse.questions
    WHERE model_version_id IS NOT NULL AND status IN ('answered', 'blocked')
    GROUP BY ranker_id
), rated AS (
    SELECT ranker_id, helpful FROM pgsynapse.question_verdicts_v1
), f AS (
    SELECT ranker_id, count(*) AS rated, count(*) FILTER (WHERE helpful) AS helpful FROM rated GROUP BY ranker_id
), r AS (
    SELECT id, name, status, traffic_percent::float8 AS traffic_percent FROM pgsynapse.ranker_models
    UNION ALL
    -- the vector order: what serves the sessions no ranker takes; none once a ranker is active, else the active
    -- one (abreport.ab_report gives it the share the candidates leave, as to an active ranker)
    SELECT NULL, 'vector order', status, CASE WHEN status = 'active' THEN 100 ELSE 0 END::float8
    FROM (SELECT CASE WHEN EXISTS (SELECT 1 FROM pgsynapse.ranker_models WHERE status = 'active') THEN 'none'
                      ELSE 'active' END AS status) vector_order
)
SELECT r.id AS ranker, r.name, r.status, r.traffic_percent,
       coalesce(q.questions, 0) AS questions, coalesce(f.rated, 0) AS rated, coalesce(f.helpful, 0) AS helpful,
       q.p50_ms, q.p95_ms
FROM r
LEFT JOIN q ON q.ranker_id IS NOT DISTINCT FROM r.id
LEFT JOIN f ON f.ranker_id IS NOT DISTINCT FROM r.id
WHERE r.status IN ('active', 'candidate') OR q.questions IS NOT NULL
ORDER BY r.id NULLS FIRST;

-- name: active_version_ranker
-- the active ranker when it is a model version rescoring (path 'version:N'): the retrain's teacher by default
SELECT id, path FROM pgsynapse.ranker_models WHERE status = 'active' AND runtime = 'version';
