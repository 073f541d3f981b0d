-- pgsynapse 0015: images embedded by trigger (issue 22). An image row (bytes, or a path under the worker's
-- image_roots) queues an `embed_image` job; the worker decodes it with the pixel cap checked before decoding, and
-- embeds it with every non-retired image model. Image models have their own registry (image_models): they share
-- none of the text versions' machinery (query encoders, backfill, A/B routing of questions, retrain), and a text
-- query that forgot a kind filter could otherwise pick an image model (docs/architecture.md).

CREATE TABLE IF NOT EXISTS pgsynapse.image_models (
    id            serial PRIMARY KEY,
    name          text NOT NULL,
    -- clip: an image tower and a text tower in one space (text -> image search); image: an image encoder only
    kind          text NOT NULL CHECK (kind IN ('clip', 'image')),
    artifact_path text NOT NULL,
    runtime       text NOT NULL DEFAULT 'torch' CHECK (runtime IN ('torch', 'onnx')),
    dim           int NOT NULL CHECK (dim > 0),
    metrics       jsonb NOT NULL DEFAULT '{}',
    -- candidate: embedded (images get its vectors), not searched by default; active: searched; retired: dropped
    status        text NOT NULL DEFAULT 'candidate' CHECK (status IN ('candidate', 'active', 'retired')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    activated_at  timestamptz,
    retired_at    timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS image_models_one_active ON pgsynapse.image_models (kind) WHERE status = 'active';

CREATE TABLE IF NOT EXISTS pgsynapse.images (
    id            bigserial PRIMARY KEY,
    -- exactly one of: the encoded bytes (png, jpeg, webp, gif, bmp, tiff), or a file path the worker may read
    data          bytea,
    path          text,
    -- where it came from (pgsynapse ingest: the file's path relative to the ingested directory)
    source        text,
    mime_type     text,
    caption       text,
    document_id   bigint REFERENCES pgsynapse.documents (id) ON DELETE SET NULL,
    metadata      jsonb NOT NULL DEFAULT '{}',
    -- what is embedded: an UPDATE that leaves this unchanged enqueues nothing (a path row: the path, not the file)
    content_hash  text GENERATED ALWAYS AS (
                      CASE WHEN data IS NOT NULL THEN md5(data) ELSE 'path:' || md5(path) END) STORED,
    width         int,
    height        int,
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'embedded', 'failed')),
    error         text,
    embedded_hash text,
    embedded_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT images_need_data_or_path CHECK ((data IS NULL) <> (path IS NULL))
);
CREATE INDEX IF NOT EXISTS images_document ON pgsynapse.images (document_id) WHERE document_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS pgsynapse.image_embeddings (
    image_id   bigint NOT NULL REFERENCES pgsynapse.images (id) ON DELETE CASCADE,
    model_id   int NOT NULL REFERENCES pgsynapse.image_models (id),
    embedding  vector NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, image_id)
);
CREATE INDEX IF NOT EXISTS image_embeddings_image ON pgsynapse.image_embeddings (image_id);

-- One partial HNSW index per image model, as for text versions (ensure_image_index, images_v1.sql): models
-- coexist, a switch never DROPs; a retired model's index is dropped by a trigger.

-- The images most like one image, by the active model of the kind asked (image, else clip), through that model's
-- HNSW index: SELECT d.title, s.* FROM pgsynapse.similar_images(42) s JOIN pgsynapse.documents d ON d.id = s.document_id
CREATE OR REPLACE FUNCTION pgsynapse.similar_images(image bigint, k int DEFAULT 10, model int DEFAULT NULL)
RETURNS TABLE (image_id bigint, document_id bigint, similarity double precision)
LANGUAGE plpgsql STABLE AS $$  -- the caller's rights and search_path (which finds pgvector's type, as for any query)
DECLARE
    m int;
    d int;
BEGIN
    SELECT im.id, im.dim INTO m, d FROM pgsynapse.image_models im
    WHERE (model IS NULL AND im.status = 'active') OR im.id = model
    ORDER BY im.id = model DESC, im.kind = 'image' DESC
    LIMIT 1;
    IF m IS NULL THEN
        RAISE EXCEPTION 'no active image model (pgsynapse image-model add PATH)';
    END IF;
    RETURN QUERY EXECUTE format(
        'SELECT e.image_id, i.document_id, 1 - (e.embedding::vector(%1$s) <=> q.embedding::vector(%1$s))'
        ' FROM pgsynapse.image_embeddings q'
        ' JOIN pgsynapse.image_embeddings e ON e.model_id = q.model_id AND e.image_id <> q.image_id'
        ' JOIN pgsynapse.images i ON i.id = e.image_id'
        ' WHERE q.model_id = $1 AND q.image_id = $2'
        ' ORDER BY e.embedding::vector(%1$s) <=> q.embedding::vector(%1$s) LIMIT $3', d)
    USING m, image, k;
END $$;
GRANT EXECUTE ON FUNCTION pgsynapse.similar_images(bigint, int, int) TO pgsynapse_app, pgsynapse_worker, pgsynapse_admin;

-- pgsynapse:include images_v1.sql

-- An application writes images as it writes documents (only the columns it owns) and reads the results.
GRANT SELECT, DELETE ON pgsynapse.images TO pgsynapse_app;
GRANT INSERT (data, path, source, mime_type, caption, document_id, metadata),
      UPDATE (data, path, source, mime_type, caption, document_id, metadata) ON pgsynapse.images TO pgsynapse_app;
GRANT USAGE ON SEQUENCE pgsynapse.images_id_seq TO pgsynapse_app;
GRANT SELECT ON pgsynapse.image_embeddings, pgsynapse.image_models TO pgsynapse_app;
