-- pgsynapse 0035: similar_images() says why it has nothing to compare. It said "no active image model" for a model
-- id that does not exist, and returned no row, without a word, for an image that does not exist or has no vector
-- (pending, failed) and under a retired model (whose vectors are gone). A caller's mistake (a model that does not
-- exist or is retired, an image that does not exist) is an error; an image with no vector yet, or failed, still
-- gives no row, with a NOTICE that says why: a LATERAL join over many images must not fail on one of them.
-- Otherwise as in migration 0015.
CREATE OR REPLACE FUNCTION pgsynapse.similar_images(image bigint, k int DEFAULT 10, model int DEFAULT NULL)
RETURNS TABLE (image_id bigint, document_id bigint, similarity double precision)
LANGUAGE plpgsql STABLE AS $$  -- the caller's rights and search_path (which finds pgvector's type, as for any query)
DECLARE
    m int;
    d int;
    model_status text;
    image_status text;
    image_error text;
BEGIN
    SELECT im.id, im.dim, im.status INTO m, d, model_status FROM pgsynapse.image_models im
    WHERE (model IS NULL AND im.status = 'active') OR im.id = model
    ORDER BY im.id = model DESC, im.kind = 'image' DESC
    LIMIT 1;
    IF m IS NULL AND model IS NOT NULL THEN
        RAISE EXCEPTION 'image model % does not exist (pgsynapse image-model list)', model;
    ELSIF m IS NULL THEN
        RAISE EXCEPTION 'no active image model (pgsynapse image-model add PATH)';
    ELSIF model_status = 'retired' THEN
        RAISE EXCEPTION 'image model % is retired: its vectors are gone; leave the model out for the active one', m;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgsynapse.image_embeddings WHERE model_id = m AND image_embeddings.image_id = image) THEN
        SELECT i.status, i.error INTO image_status, image_error FROM pgsynapse.images i WHERE i.id = image;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'image % does not exist', image;
        ELSIF image_status = 'failed' THEN
            RAISE NOTICE 'image % failed: %', image, image_error;
        ELSIF image_status = 'pending' THEN
            RAISE NOTICE 'image % has no vector yet (pending): the worker embeds it', image;
        ELSE  -- embedded by the active model, not yet by this candidate (its backfill)
            RAISE NOTICE 'image % has no vector of image model % yet: it is being backfilled', image, m;
        END IF;
        RETURN;
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
