-- Named queries of the answer handler. Loaded by pgsynapse.queries.q(name, "answers.sql").

-- name: load_questions
SELECT id, session_id, text, created_at FROM pgsynapse.questions WHERE id = ANY(%(ids)s) AND status = 'pending';

-- name: session_history
-- The turns of a session before a question, newest first (the caller keeps the last few).
SELECT id, text, answer FROM pgsynapse.questions
WHERE session_id = %(session)s AND id < %(before)s AND status = 'answered'
ORDER BY id DESC LIMIT %(limit)s;

-- name: routable_versions
-- The active version, and candidates that are fully backfilled and have a traffic share.
SELECT id, name, artifact_path, runtime, dim, status, traffic_percent
FROM pgsynapse.model_versions
WHERE status = 'active' OR (status = 'candidate' AND backfilled_at IS NOT NULL AND traffic_percent > 0)
ORDER BY id;

-- name: vector_candidates
SELECT c.id AS chunk_id, c.document_id, d.title, d.source, c.text,
       1 - (e.embedding::vector({dim}) <=> %(query)s::vector({dim})) AS score
FROM pgsynapse.embeddings e
JOIN pgsynapse.chunks c ON c.id = e.chunk_id
JOIN pgsynapse.documents d ON d.id = c.document_id
WHERE e.model_version_id = %(version)s
ORDER BY e.embedding::vector({dim}) <=> %(query)s::vector({dim})
LIMIT %(k)s;

-- name: text_candidates
-- Any of the question's words (OR): an AND of every word of a natural question rarely matches a passage.
SELECT c.id AS chunk_id, c.document_id, d.title, d.source, c.text, ts_rank_cd(c.tsv, qq.query) AS text_rank
FROM (SELECT replace(plainto_tsquery('english', %(text)s)::text, ' & ', ' | ')::tsquery AS query) qq,
     pgsynapse.chunks c
JOIN pgsynapse.documents d ON d.id = c.document_id
WHERE c.tsv @@ qq.query
ORDER BY text_rank DESC
LIMIT %(k)s;

-- name: chunk_vectors
SELECT chunk_id, embedding FROM pgsynapse.embeddings WHERE model_version_id = %(version)s AND chunk_id = ANY(%(ids)s);

-- name: guardrail_rules
SELECT id, text, action, threshold FROM pgsynapse.guardrail_rules WHERE enabled ORDER BY id;

-- name: write_answer
UPDATE pgsynapse.questions
SET status = %(status)s, answer = %(answer)s, sources = %(sources)s, model_version_id = %(version)s,
    retrieval_query = %(retrieval_query)s, guardrail = %(guardrail)s, answerer = %(answerer)s, error = NULL,
    answered_at = clock_timestamp(),
    latency_ms = extract(epoch FROM clock_timestamp() - created_at) * 1000
WHERE id = %(id)s;

-- name: fail_question
UPDATE pgsynapse.questions
SET status = 'failed', error = %(error)s, answered_at = clock_timestamp(),
    latency_ms = extract(epoch FROM clock_timestamp() - created_at) * 1000
WHERE id = %(id)s;

-- name: notify_answer
SELECT pg_notify('pgsynapse_answers', json_build_object('id', %(id)s::bigint, 'status', %(status)s::text)::text);
