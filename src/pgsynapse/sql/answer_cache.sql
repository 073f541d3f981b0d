-- Named queries of the semantic answer cache (migrations/0011_answer_cache.sql, src/pgsynapse/answer_cache.py).

-- name: lookup
-- {dim} and {version} are integers formatted in by the caller, so the inner kNN uses the version's partial HNSW
-- index (answer_cache_hnsw_vN). Of the %(k)s nearest entries, the most similar one that may be served: at or above
-- the threshold, same answerer settings and guardrail rules, young enough, and every cited document still there
-- with the content it had when answered (a concurrent edit whose trigger missed the entry is caught here) and every
-- cited chunk still there, and whose question is still answered as it was (an edit asks it again, its answer cleared:
-- its entry is stale until the new text's answer replaces it, for ever when that fails); most similar first (the
-- caller compares the questions' exact terms).
SELECT c.question_id, c.question, c.answer, c.sources, c.similarity
FROM (SELECT question_id, question, answer, sources, settings_key, rules_key, created_at, document_ids, document_hashes,
             1 - (embedding::vector({dim}) <=> %(query)s::vector({dim})) AS similarity
      FROM pgsynapse.answer_cache
      WHERE model_version_id = {version}
      ORDER BY embedding::vector({dim}) <=> %(query)s::vector({dim})
      LIMIT %(k)s) c
JOIN pgsynapse.questions o ON o.id = c.question_id AND o.status = 'answered' AND o.text = c.question
WHERE c.similarity >= %(threshold)s
  AND c.settings_key = %(settings_key)s AND c.rules_key = %(rules_key)s
  AND (%(max_age)s <= 0 OR c.created_at > now() - make_interval(secs => %(max_age)s))
  AND NOT EXISTS (SELECT 1 FROM unnest(c.document_ids, c.document_hashes) AS s(id, hash)
                  LEFT JOIN pgsynapse.documents d ON d.id = s.id
                  WHERE d.content_hash IS DISTINCT FROM s.hash)
  AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(c.sources) AS src
                  LEFT JOIN pgsynapse.chunks ch ON ch.id = (src ->> 'chunk_id')::bigint
                  WHERE ch.id IS NULL)
ORDER BY c.similarity DESC;

-- name: store
-- A fresh answer becomes an entry only while every cited document is embedded from its current content and every
-- cited chunk still exists: a document edited since retrieval is either waiting for its re-embedding
-- (content_hash <> embedded_hash) or re-chunked (its chunks have new ids), and then nothing is stored.
-- The question's text is the row's, as just written (the write's stale-write guard checked it).
INSERT INTO pgsynapse.answer_cache (question_id, model_version_id, settings_key, rules_key, question, embedding, answer,
                                    sources, document_ids, document_hashes)
SELECT %(id)s, %(version)s, %(settings_key)s, %(rules_key)s, (SELECT text FROM pgsynapse.questions WHERE id = %(id)s),
       %(embedding)s, %(answer)s, %(sources)s,
       array_agg(d.id ORDER BY d.id), array_agg(d.content_hash ORDER BY d.id)
FROM pgsynapse.documents d
WHERE d.id = ANY(%(documents)s::bigint[]) AND d.content_hash = d.embedded_hash
HAVING count(*) = cardinality(%(documents)s::bigint[])
   AND (SELECT count(*) FROM pgsynapse.chunks c WHERE c.id = ANY(%(chunks)s::bigint[]))
       = cardinality(%(chunks)s::bigint[])
ON CONFLICT (question_id) DO UPDATE
SET model_version_id = EXCLUDED.model_version_id, settings_key = EXCLUDED.settings_key,
    rules_key = EXCLUDED.rules_key, question = EXCLUDED.question, embedding = EXCLUDED.embedding, answer = EXCLUDED.answer,
    sources = EXCLUDED.sources, document_ids = EXCLUDED.document_ids, document_hashes = EXCLUDED.document_hashes,
    hit_count = 0, created_at = now(), last_hit_at = NULL;

-- name: forget
-- A question answered afresh that may not be served again (edited into a follow-up, flagged, not found, ...) takes
-- its earlier entry with it.
DELETE FROM pgsynapse.answer_cache WHERE question_id = %(id)s;

-- name: lock_entries
-- An answer write's entries (its questions' own, which it stores or forgets, and the entries its hits count), locked
-- in one order before it touches any (after its questions, handlers/answer.py): two workers writing hits on the
-- same entries in other orders would each wait for the other.
SELECT question_id FROM pgsynapse.answer_cache WHERE question_id = ANY(%(ids)s) ORDER BY question_id FOR UPDATE;

-- name: count_hit
UPDATE pgsynapse.answer_cache SET hit_count = hit_count + 1, last_hit_at = now() WHERE question_id = %(origin)s;

-- name: mark_origin
-- cached_from of a written answer: the original question's id for a cache hit, NULL for a fresh answer (an edited
-- question asked again may have been a hit before).
UPDATE pgsynapse.questions SET cached_from = %(origin)s
WHERE id = %(id)s AND cached_from IS DISTINCT FROM %(origin)s::bigint;

-- name: expire
DELETE FROM pgsynapse.answer_cache WHERE created_at < now() - make_interval(secs => %(max_age)s);

-- name: cache_counts
-- `pgsynapse status`: the entries held (of every version; a retired version's are never looked up again) and how many
-- times they were served
SELECT count(*) AS entries, coalesce(sum(hit_count), 0)::bigint AS hits FROM pgsynapse.answer_cache;
