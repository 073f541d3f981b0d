-- Images (migration 0015): the embed_image handler, the image model registry and image search.

-- name: image_models_serving
-- Every model images are embedded with: the active one of each kind and the candidates being built.
SELECT id, name, kind, artifact_path, runtime, dim, status
FROM pgsynapse.image_models WHERE status IN ('active', 'candidate') ORDER BY id;

-- name: load_images
-- An image over max_image_bytes comes without its bytes: it fails from its length, its data never fetched.
-- embedded_by: the models whose vectors of this very content exist (an earlier job, claimed before the last
-- change and loaded after it, may have written them all: nothing left to do).
SELECT id, content_hash, path, mime_type, octet_length(data) AS bytes,
       CASE WHEN octet_length(data) <= %(max_bytes)s THEN data END AS data,
       CASE WHEN status = 'embedded' AND embedded_hash = content_hash THEN
           ARRAY(SELECT e.model_id FROM pgsynapse.image_embeddings e WHERE e.image_id = i.id) ELSE '{}' END AS embedded_by
FROM pgsynapse.images i WHERE id = ANY(%(ids)s);

-- name: lock_images
SELECT id, content_hash,
       CASE WHEN status = 'embedded' AND embedded_hash = content_hash THEN
           ARRAY(SELECT e.model_id FROM pgsynapse.image_embeddings e WHERE e.image_id = i.id) ELSE '{}' END AS embedded_by
FROM pgsynapse.images i WHERE id = ANY(%(ids)s) FOR UPDATE;

-- name: lock_image_rows
-- as lock_document_rows in queries.sql
SELECT id FROM pgsynapse.images WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE;

-- name: image_changed_since
-- as document_changed_since in queries.sql
SELECT content_hash IS DISTINCT FROM %(hash)s AS changed FROM pgsynapse.images WHERE id = %(id)s FOR UPDATE;

-- name: requeue_changed_images
-- as requeue_changed_documents in queries.sql
INSERT INTO pgsynapse.jobs (kind, ref_id)
SELECT j.kind, j.ref_id FROM pgsynapse.jobs j JOIN pgsynapse.images i ON i.id = j.ref_id
WHERE j.id = ANY(%(jobs)s) AND i.embedded_hash IS DISTINCT FROM i.content_hash
  AND NOT EXISTS (SELECT 1 FROM pgsynapse.jobs n WHERE n.kind = j.kind AND n.ref_id = j.ref_id AND n.id > j.id)
ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;

-- name: lock_image_models_written
-- The models whose vectors a batch writes, locked against a retire until the write commits (retire deletes a
-- model's vectors: one written after it would stay for ever); a model retired since the batch loaded is not returned.
SELECT id FROM pgsynapse.image_models WHERE id = ANY(%(ids)s) AND status <> 'retired' ORDER BY id FOR SHARE;

-- name: delete_image_embeddings
DELETE FROM pgsynapse.image_embeddings WHERE image_id = ANY(%(ids)s);

-- name: insert_image_embeddings
-- One statement, never COPY FROM STDIN: see insert_chunks in queries.sql.
INSERT INTO pgsynapse.image_embeddings (image_id, model_id, embedding)
SELECT * FROM unnest(%(images)b::bigint[], %(models)b::int[], %(embeddings)b::vector[]);

-- name: mark_images_embedded
UPDATE pgsynapse.images i
SET status = 'embedded', error = NULL, embedded_hash = i.content_hash, embedded_at = now(),
    width = u.width, height = u.height, mime_type = coalesce(i.mime_type, u.mime_type)
FROM unnest(%(ids)s::bigint[], %(widths)s::int[], %(heights)s::int[], %(mimes)s::text[])
     AS u (id, width, height, mime_type)
WHERE i.id = u.id;

-- name: mark_image_failed
-- A job's final failure, unless the image was changed since (a pending job has its new content). The vectors and
-- dimensions of its earlier content go with it: searches and similar_images() must not find a picture the row
-- no longer holds.
WITH failed AS (
    UPDATE pgsynapse.images i SET status = 'failed', error = %(error)s, width = NULL, height = NULL
    WHERE i.id = %(id)s
      AND NOT EXISTS (SELECT 1 FROM pgsynapse.jobs p
                      WHERE p.kind = 'embed_image' AND p.ref_id = i.id AND p.status = 'pending')
    RETURNING i.id
), gone AS (
    DELETE FROM pgsynapse.image_embeddings e USING failed f WHERE e.image_id = f.id
)
SELECT id FROM failed;

-- name: notify_images
SELECT pg_notify('pgsynapse_images', json_build_object('id', i, 'status', %(status)s::text)::text)
FROM unnest(%(ids)s::bigint[]) AS i;

-- name: search_images
SELECT i.id AS image_id, i.caption, coalesce(i.path, i.source) AS source, i.mime_type, i.width, i.height, i.document_id,
       d.title AS document_title, 1 - (e.embedding::vector({dim}) <=> %(query)s::vector({dim})) AS score
FROM pgsynapse.image_embeddings e
JOIN pgsynapse.images i ON i.id = e.image_id
LEFT JOIN pgsynapse.documents d ON d.id = i.document_id
WHERE e.model_id = %(model)s
ORDER BY e.embedding::vector({dim}) <=> %(query)s::vector({dim})
LIMIT %(k)s;

-- name: active_image_model
-- The model a search uses: the active one of the kind asked for (clip before image when either will do).
SELECT id, name, kind, artifact_path, runtime, dim, status
FROM pgsynapse.image_models
WHERE status = 'active' AND kind = ANY(%(kinds)s)
ORDER BY array_position(%(kinds)s::text[], kind)
LIMIT 1;

-- name: image_model_by_id
SELECT id, name, kind, artifact_path, runtime, dim, status FROM pgsynapse.image_models WHERE id = %(id)s;

-- name: image_model_by_path
-- a model (not retired) registered with this path: the same model added twice
SELECT id, status FROM pgsynapse.image_models
WHERE artifact_path = %(path)s AND status <> 'retired'
ORDER BY id LIMIT 1;

-- name: insert_image_model
-- A model is active at once only when no active model serves the searches it would take over (there is nothing
-- to switch from): the first CLIP model, or the first image encoder while no CLIP model is active (an active CLIP
-- serves searches by example, which prefer an image encoder: a new one with no vector yet would find nothing).
-- Others are candidates until `image-model promote`, which waits for their vectors to be complete.
INSERT INTO pgsynapse.image_models (name, kind, artifact_path, runtime, dim, metrics, status, activated_at)
SELECT %(name)s, %(kind)s, %(path)s, %(runtime)s, %(dim)s, %(metrics)s, s.status,
       CASE WHEN s.status = 'active' THEN now() END
FROM (SELECT CASE WHEN EXISTS (SELECT 1 FROM pgsynapse.image_models
                               WHERE status = 'active' AND (kind = %(kind)s OR %(kind)s = 'image'))
                  THEN 'candidate' ELSE 'active' END AS status) s
RETURNING id, name, kind, artifact_path, runtime, dim, status;

-- name: enqueue_all_images
-- Every image not yet embedded by a model gets a job (a new model's backfill; deduplicated against pending jobs).
WITH todo AS (
    INSERT INTO pgsynapse.jobs (kind, ref_id)
    SELECT 'embed_image', i.id FROM pgsynapse.images i
    WHERE NOT EXISTS (SELECT 1 FROM pgsynapse.image_embeddings e WHERE e.image_id = i.id AND e.model_id = %(model)s)
      AND i.status <> 'failed'
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING
    RETURNING 1
), n AS (SELECT count(*) AS n FROM todo)
SELECT n, CASE WHEN n > 0 THEN pg_notify('pgsynapse_jobs', json_build_object('kind', 'embed_image', 'n', n)::text) END
FROM n;

-- name: image_model_progress
-- How far a model's vectors are: images it has embedded, of those that can be (failed rows are not counted).
SELECT count(*) FILTER (WHERE EXISTS (SELECT 1 FROM pgsynapse.image_embeddings e
                                      WHERE e.image_id = i.id AND e.model_id = %(model)s)) AS embedded,
       count(*) FILTER (WHERE i.status <> 'failed') AS total
FROM pgsynapse.images i;

-- name: list_image_models
SELECT m.id, m.name, m.kind, m.runtime, m.dim, m.status, m.artifact_path, m.created_at, m.activated_at,
       (SELECT count(*) FROM pgsynapse.image_embeddings e WHERE e.model_id = m.id) AS vectors
FROM pgsynapse.image_models m ORDER BY m.id;


-- name: retire_image_model
-- A candidate, or the active model of a kind with no candidate (images.registry.retire checks, under
-- lock_image_models): its kind then has no model, and with none left no image is embedded.
UPDATE pgsynapse.image_models SET status = 'retired', retired_at = now()
WHERE id = %(id)s AND status IN ('candidate', 'active')
RETURNING id;

-- name: delete_image_model_vectors
DELETE FROM pgsynapse.image_embeddings WHERE model_id = %(id)s;

-- name: image_counts
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'embedded') AS embedded,
       count(*) FILTER (WHERE status = 'failed') AS failed
FROM pgsynapse.images;

-- name: document_images
-- Images linked to documents (answers cite them beside the passages of those documents): the first %(per_document)s
-- of each document.
SELECT id, document_id, caption, mime_type, width, height, source
FROM (SELECT id, document_id, caption, mime_type, width, height, coalesce(path, source) AS source,
             row_number() OVER (PARTITION BY document_id ORDER BY id) AS n
      FROM pgsynapse.images
      WHERE document_id = ANY(%(ids)s) AND status = 'embedded') i
WHERE n <= %(per_document)s
ORDER BY document_id, id;

-- name: stored_images_by_hash
-- Ingest's idempotency check for images: the stored rows of these contents, with their source and document.
SELECT id, content_hash, source, document_id FROM pgsynapse.images WHERE content_hash = ANY(%(hashes)s) ORDER BY id;

-- name: delete_replaced_images
-- Ingest --replace: the pictures ingest stored from these image files before (the same source, beside the same
-- document or none) with a content no file of the run has now: the changed file's picture replaces them, as a
-- changed document's new content replaces its old. An application's image (another source, or none) stays.
DELETE FROM pgsynapse.images i
USING unnest(%(sources)s::text[], %(documents)s::bigint[]) AS f(source, document_id)
WHERE i.source = f.source AND i.document_id IS NOT DISTINCT FROM f.document_id AND i.content_hash IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM unnest(%(sources)s::text[], %(documents)s::bigint[], %(hashes)s::text[])
                      AS k(source, document_id, hash)
                  WHERE k.source = i.source AND k.document_id IS NOT DISTINCT FROM i.document_id
                    AND k.hash = i.content_hash);

-- name: link_image
-- Ingest: an image stored before its document was, linked to it now (its content is unchanged: nothing is queued).
UPDATE pgsynapse.images SET document_id = %(document_id)s WHERE id = %(id)s;

-- name: documents_by_source
-- The newest document of each source (an image is linked to the document it sits beside).
SELECT DISTINCT ON (source) source, id FROM pgsynapse.documents WHERE source = ANY(%(sources)s) ORDER BY source, id DESC;

-- name: copy_images
COPY pgsynapse.images (data, source, mime_type, document_id, metadata) FROM STDIN;

-- name: follow_images
SELECT count(*) FILTER (WHERE status = 'embedded') AS embedded, count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'pending') AS pending
FROM pgsynapse.images WHERE id = ANY(%(ids)s);

-- name: ensure_image_index
-- an image model's partial HNSW index, before its vectors are written
SELECT pgsynapse.ensure_image_index(%(model)s);

-- name: lock_image_models
-- add, promote and retire: one change of the image models at a time
LOCK TABLE pgsynapse.image_models IN SHARE ROW EXCLUSIVE MODE;

-- name: demote_active_image_model
UPDATE pgsynapse.image_models SET status = 'candidate' WHERE kind = %(kind)s AND status = 'active' RETURNING id;

-- name: activate_image_model
UPDATE pgsynapse.image_models SET status = 'active', activated_at = now() WHERE id = %(model)s;

-- name: sample_images
-- `pgsynapse image-model export`: embedded images of this database to check the export's agreement on
SELECT data FROM pgsynapse.images WHERE status = 'embedded' AND data IS NOT NULL ORDER BY id LIMIT %(limit)s;
