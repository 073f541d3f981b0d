-- Named queries of the answer handler. Loaded by pgsynapse.queries.q(name, "answers.sql").

-- name: load_questions
-- A question over %(max_chars)s characters comes without its text (NULL): it fails from its length alone, and its
-- text is never fetched. text_hash is the write's stale-write guard (write_answer), and a failure's, over the
-- limit too (question_changed_since). A blank session_id ('' or spaces, as some apps write for none) is no
-- session: no history, no routing by it. Any other is the session as written, spaces around it included ('erin '
-- from a char(n) column): its history is read by it (session_history).
SELECT id, CASE WHEN btrim(session_id) <> '' THEN session_id END AS session_id, created_at, chars,
       CASE WHEN chars <= %(max_chars)s THEN text END AS text,
       md5(text) AS text_hash
FROM (SELECT id, session_id, created_at, text, length(text) AS chars
      FROM pgsynapse.questions WHERE id = ANY(%(ids)s) AND status = 'pending') q;

-- name: session_history
-- The turns of a session before a question, newest first (the caller keeps the last few, and checks them against
-- today's guardrail rules): answered ones, and ones still pending with their question alone (a follow-up sent
-- before the answer to the question before it came, or in the same statement, goes on from that question: another
-- batch or worker may be answering it; the text so far of a streamed answer is not its answer). Blocked and failed
-- ones are left out, and so is a text over the question limit.
SELECT id, text, CASE WHEN status = 'answered' THEN answer END AS answer FROM pgsynapse.questions
WHERE session_id = %(session)s AND id < %(before)s AND status IN ('answered', 'pending')
  AND length(text) <= %(max_chars)s
ORDER BY id DESC LIMIT %(limit)s;

-- name: routable_versions
-- The active version, and candidates that are fully backfilled, have a traffic share and are on their serving
-- runtime: version_routed_v1 (migration 0038), the one rule of which versions get sessions.
SELECT id, name, artifact_path, runtime, dim, status, traffic_percent
FROM pgsynapse.model_versions v
WHERE pgsynapse.version_routed_v1(v)
ORDER BY id;

-- name: vector_candidates
-- {dim} and {version} are integers formatted in by the caller: with a literal version the planner prunes to that
-- version's partition (migration 0019) and its HNSW index even under a generic (prepared) plan.
SELECT c.id AS chunk_id, c.document_id, d.title, d.source, c.text,
       1 - (e.embedding::vector({dim}) <=> %(query)s::vector({dim})) AS score
FROM pgsynapse.embeddings e
JOIN pgsynapse.chunks c ON c.id = e.chunk_id
JOIN pgsynapse.documents d ON d.id = c.document_id
WHERE e.model_version_id = {version}
ORDER BY e.embedding::vector({dim}) <=> %(query)s::vector({dim})
LIMIT %(k)s;

-- name: exact_candidates
-- The kNN of vector_candidates and search_chunks without their HNSW index: an exact scan of the version's vectors
-- (its ORDER BY is not the index's expression), run only when the index's nearest are all one vector
-- (retrieval.knn): hundreds of identical vectors (a crawl's boilerplate pages) leave the HNSW graph no edge out of
-- them, so no ef_search nor iterative scan reaches the other chunks. Its rows are those of both queries.
WITH nearest AS (SELECT chunk_id, embedding <=> %(query)s::vector AS distance FROM pgsynapse.embeddings
                 WHERE model_version_id = %(version)s ORDER BY distance LIMIT %(k)s)
SELECT c.id AS chunk_id, c.document_id, d.title, d.source, c.ord, c.text, 1 - n.distance AS score
FROM nearest n
JOIN pgsynapse.chunks c ON c.id = n.chunk_id
JOIN pgsynapse.documents d ON d.id = c.document_id
ORDER BY n.distance, c.id;

-- name: text_candidates
-- Full-text ranks. Any of the question's words (OR): a natural-language question rarely has all its words in one
-- chunk, which an AND query requires. Ranked by ts_rank (how many of the words a chunk has, how often), which
-- beat ts_rank_cd and websearch_to_tsquery (AND) on the docs corpus: see BENCHMARKS.md, bench/text_rank_variants.py.
-- The chunks ranked are bounded: the question's words select them from the rarest up, as long as the chunks they
-- are in add up to at most %(max_rows)s (the rarest word always selects), and all the words rank each selected
-- chunk. A word in many chunks still ranks, it only does not select. Unbounded, two chunks in five had one of the
-- words and ts_rank scored each (bench/fulltext_scale.py). How many chunks a word is in: the statistics ANALYZE
-- keeps for the tsv column (pg_stats.most_common_elems); a word too rare to be listed there counts 0. A lexeme is
-- quoted for tsquery input by hand: quote_literal's E'' form (for a backslash) is not tsquery syntax.
WITH words AS (SELECT DISTINCT lexeme FROM unnest(to_tsvector('english', %(text)s))),
freq AS (SELECT u.lexeme, u.f FROM pg_stats,
         unnest(most_common_elems::text::text[], most_common_elem_freqs) AS u(lexeme, f)
         WHERE schemaname = 'pgsynapse' AND tablename = 'chunks' AND attname = 'tsv' AND u.lexeme IS NOT NULL),
est AS (SELECT w.lexeme, coalesce(f.f, 0) * greatest(t.reltuples, 0) AS rows FROM words w
        LEFT JOIN freq f USING (lexeme), (SELECT reltuples FROM pg_class WHERE oid = 'pgsynapse.chunks'::regclass) t),
run AS (SELECT '''' || replace(replace(lexeme, '\', '\\'), '''', '''''') || '''' AS quoted,
               sum(rows) OVER (ORDER BY rows, lexeme) AS total, row_number() OVER (ORDER BY rows, lexeme) AS n
        FROM est),
qq AS (SELECT (SELECT string_agg(quoted, ' | ')::tsquery FROM run
               WHERE total <= %(max_rows)s OR n = 1) AS selects,
              replace(plainto_tsquery('english', %(text)s)::text, ' & ', ' | ')::tsquery AS query),
ranked AS (SELECT c.id, ts_rank(c.tsv, qq.query) AS text_rank FROM qq, pgsynapse.chunks c
           WHERE c.tsv @@ qq.selects AND c.tsv @@ qq.query ORDER BY text_rank DESC, c.id LIMIT %(k)s)
SELECT c.id AS chunk_id, c.document_id, d.title, d.source, c.ord, c.text, r.text_rank
FROM ranked r
JOIN pgsynapse.chunks c ON c.id = r.id
JOIN pgsynapse.documents d ON d.id = c.document_id
ORDER BY r.text_rank DESC, c.id;

-- name: chunk_scores
-- The cosine score of full-text hits that the kNN did not return (chunks without this version's embedding drop out).
SELECT chunk_id, 1 - (embedding <=> %(query)s::vector) AS score
FROM pgsynapse.embeddings WHERE model_version_id = %(version)s AND chunk_id = ANY(%(ids)s);

-- name: guardrail_rules
SELECT id, text, action, threshold FROM pgsynapse.guardrail_rules WHERE enabled ORDER BY id;

-- name: write_answer
-- The stale-write guard: no row updated (the caller reports the job superseded) when the question was edited
-- since it was loaded (its UPDATE queued a new job: triggers/questions_v3.sql), answered by another job, or deleted.
-- The UPDATE locks the row and re-checks this WHERE against a concurrent edit's committed version.
UPDATE pgsynapse.questions
SET status = %(status)s, answer = %(answer)s, sources = %(sources)s, model_version_id = %(version)s,
    retrieval_query = %(retrieval_query)s, guardrail = %(guardrail)s, answerer = %(answerer)s, error = NULL,
    flags = %(flags)s, ranker_id = %(ranker)s,
    answered_at = clock_timestamp(),
    latency_ms = extract(epoch FROM clock_timestamp() - coalesce(asked_at, created_at)) * 1000
WHERE id = %(id)s AND status = 'pending' AND md5(text) = %(text_hash)s;

-- name: fail_question
-- A job's final failure, unless the question was edited since (a pending job has its new text): then the row
-- stays pending for that job. A partial answer streamed into the row before the failure goes: it is no answer.
UPDATE pgsynapse.questions q
SET status = 'failed', error = %(error)s, answer = NULL, answered_at = clock_timestamp(),
    latency_ms = extract(epoch FROM clock_timestamp() - coalesce(asked_at, created_at)) * 1000
WHERE q.id = %(id)s
  AND NOT EXISTS (SELECT 1 FROM pgsynapse.jobs p WHERE p.kind = 'answer' AND p.ref_id = q.id AND p.status = 'pending');

-- name: withdraw_partial_answer
-- A job retried after an error (its backoff: minutes at the later attempts): the partial answer it streamed into
-- the row is no answer, and the retry streams its own from the start. Cleared, with a 'retrying' NOTIFY in the same
-- statement, so that whoever shows the pieces drops them; nothing when the row holds none.
WITH u AS (
    UPDATE pgsynapse.questions SET answer = NULL
    WHERE id = %(id)s AND status = 'pending' AND answer IS NOT NULL
    RETURNING id
)
SELECT pg_notify('pgsynapse_answers', json_build_object('id', u.id, 'status', 'retrying')::text) FROM u;

-- name: lock_question_rows
-- as lock_document_rows in queries.sql
SELECT id FROM pgsynapse.questions WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE;

-- name: question_changed_since
-- as document_changed_since in queries.sql: the text's md5, as load_questions reads it
SELECT md5(text) IS DISTINCT FROM %(hash)s AS changed FROM pgsynapse.questions WHERE id = %(id)s FOR UPDATE;

-- name: requeue_changed_questions
-- The questions of superseded jobs (handlers/base.py, requeue_changed) still pending: a new job, unless the
-- question has a newer job or a pending one (requeue_changed_documents in queries.sql).
INSERT INTO pgsynapse.jobs (kind, ref_id)
SELECT j.kind, j.ref_id FROM pgsynapse.jobs j JOIN pgsynapse.questions q ON q.id = j.ref_id
WHERE j.id = ANY(%(jobs)s) AND q.status = 'pending'
  AND NOT EXISTS (SELECT 1 FROM pgsynapse.jobs n WHERE n.kind = j.kind AND n.ref_id = j.ref_id AND n.id > j.id)
ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;

-- name: notify_answer
SELECT pg_notify('pgsynapse_answers', json_build_object('id', %(id)s::bigint, 'status', %(status)s::text)::text);

-- name: stream_answer
-- A partial answer while it is generated (handlers/answer_stream.py): the text so far, the status still 'pending',
-- and a 'streaming' NOTIFY in the same statement. The final write's stale-write guard: nothing is written (no row
-- returned) when the question was edited, deleted or answered meanwhile.
WITH u AS (
    UPDATE pgsynapse.questions SET answer = %(text)s
    WHERE id = %(id)s AND status = 'pending' AND md5(text) = %(text_hash)s
    RETURNING id
)
SELECT pg_notify('pgsynapse_answers', json_build_object(
           'id', u.id, 'status', 'streaming', 'seq', %(seq)s::int, 'offset', %(offset)s::int,
           'delta', %(delta)s::text)::text)
FROM u;

-- name: question_counts
-- `pgsynapse status`: the questions by status, and how many the semantic answer cache answered
SELECT count(*) FILTER (WHERE status = 'pending') AS pending, count(*) FILTER (WHERE status = 'answered') AS answered,
       count(*) FILTER (WHERE status = 'blocked') AS blocked, count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE answerer = 'cache') AS cached
FROM pgsynapse.questions;

-- name: question_for_feedback
-- `pgsynapse feedback` and Client.feedback: the answer being rated, the passages it cited, and which of those are
-- still there (an edit of a document replaces its chunks)
SELECT q.status, q.sources,
       ARRAY(SELECT c.id FROM pgsynapse.chunks c JOIN jsonb_array_elements(q.sources) s
             ON c.id = (s->>'chunk_id')::bigint) AS live_chunks
FROM pgsynapse.questions q WHERE q.id = %(question)s;

-- name: insert_feedback
-- the feedback trigger makes it a training example (one per question, its latest: triggers/feedback_v4.sql)
INSERT INTO pgsynapse.feedback (question_id, helpful, rating, chunk_id, comment)
VALUES (%(question)s, %(helpful)s, %(rating)s, %(chunk)s, %(comment)s)
RETURNING id;
