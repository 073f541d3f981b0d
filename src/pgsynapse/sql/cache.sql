-- Named queries of the inference cache (migrations/0003_inference_cache.sql).

-- name: cache_hit_embedding
-- A hit counts itself and refreshes its recency in the same statement.
UPDATE pgsynapse.inference_cache
SET hit_count = hit_count + 1, last_hit_at = now()
WHERE model_version_id = %(version)s AND op = %(op)s AND input_hash = %(hash)s
RETURNING embedding, output, hit_count;

-- name: cache_hit_embeddings
-- Many texts at once: the hits count themselves; the missing hashes are simply not returned.
UPDATE pgsynapse.inference_cache
SET hit_count = hit_count + 1, last_hit_at = now()
WHERE model_version_id = %(version)s AND op = %(op)s AND input_hash = ANY(%(hashes)s)
RETURNING input_hash, embedding;

-- name: cache_put
INSERT INTO pgsynapse.inference_cache (model_version_id, op, input_hash, embedding, output)
VALUES (%(version)s, %(op)s, %(hash)s, %(embedding)s, %(output)s)
ON CONFLICT (model_version_id, op, input_hash) DO NOTHING;

-- name: cache_put_embeddings
-- Many query embeddings in one statement, never a pipeline (psycopg's executemany): a worker cut off mid-pipeline
-- would leave its rows uncommitted, and another worker's insert of the same key waiting on them, with no timeout.
INSERT INTO pgsynapse.inference_cache (model_version_id, op, input_hash, embedding)
SELECT %(version)s, %(op)s, h, e FROM unnest(%(hashes)b::bytea[], %(embeddings)b::vector[]) AS u (h, e)
ON CONFLICT (model_version_id, op, input_hash) DO NOTHING;

-- name: cache_expire
DELETE FROM pgsynapse.inference_cache WHERE last_hit_at < now() - make_interval(secs => %(ttl)s);

-- name: cache_bound
-- Keep the max_rows most recently hit rows.
DELETE FROM pgsynapse.inference_cache c
USING (SELECT model_version_id, op, input_hash FROM pgsynapse.inference_cache
       ORDER BY last_hit_at DESC OFFSET %(max_rows)s) old
WHERE c.model_version_id = old.model_version_id AND c.op = old.op AND c.input_hash = old.input_hash;
