-- images: one `embed_image` job per inserted row or per row whose content changed, deduplicated among pending
-- jobs, and one NOTIFY per statement. SECURITY DEFINER with a fixed search_path, as documents_v3: an application
-- (pgsynapse_app) writes images, the trigger queues the job.

CREATE OR REPLACE FUNCTION pgsynapse.images_enqueue_insert_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO pgsynapse.jobs (kind, ref_id)
    SELECT 'embed_image', id FROM new_rows
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('pgsynapse_jobs', json_build_object('kind', 'embed_image', 'n', n)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.images_enqueue_update_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO pgsynapse.jobs (kind, ref_id)
    SELECT 'embed_image', nr.id
    FROM new_rows nr JOIN old_rows o ON o.id = nr.id
    WHERE nr.content_hash IS DISTINCT FROM o.content_hash
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('pgsynapse_jobs', json_build_object('kind', 'embed_image', 'n', n)::text);
    END IF;
    RETURN NULL;
END $$;

-- The owner-only DDL of the image registry, as model_versions_v1.sql does it for text versions: the worker and
-- admin roles add and retire image models without owning the tables.
CREATE OR REPLACE FUNCTION pgsynapse.ensure_image_index(model int) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    d int;
    vec name;
BEGIN
    SELECT dim INTO STRICT d FROM pgsynapse.image_models WHERE id = model;
    SELECT n.nspname INTO STRICT vec
    FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'vector';
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON pgsynapse.image_embeddings USING hnsw ((embedding::%I.vector(%s)) %I.vector_cosine_ops) '
        'WHERE model_id = %s',
        'image_embeddings_hnsw_m' || model, vec, d, vec, model);
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.image_models_retired_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    EXECUTE format('DROP INDEX IF EXISTS pgsynapse.%I', 'image_embeddings_hnsw_m' || NEW.id);
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.ensure_image_index(int), pgsynapse.image_models_retired_v1() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgsynapse.ensure_image_index(int) TO pgsynapse_worker, pgsynapse_admin;

DROP TRIGGER IF EXISTS image_models_retired ON pgsynapse.image_models;
CREATE TRIGGER image_models_retired
    AFTER UPDATE OF status ON pgsynapse.image_models
    FOR EACH ROW WHEN (NEW.status = 'retired' AND OLD.status IS DISTINCT FROM 'retired')
    EXECUTE FUNCTION pgsynapse.image_models_retired_v1();

-- new content puts the row back to pending; updated_at follows every change
CREATE OR REPLACE FUNCTION pgsynapse.images_touch_v1() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.data IS DISTINCT FROM OLD.data OR NEW.path IS DISTINCT FROM OLD.path THEN
        NEW.status := 'pending';
        NEW.error := NULL;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.images_enqueue_insert_v1(), pgsynapse.images_enqueue_update_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS images_enqueue_insert ON pgsynapse.images;
CREATE TRIGGER images_enqueue_insert
    AFTER INSERT ON pgsynapse.images
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.images_enqueue_insert_v1();

DROP TRIGGER IF EXISTS images_enqueue_update ON pgsynapse.images;
CREATE TRIGGER images_enqueue_update
    AFTER UPDATE ON pgsynapse.images
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.images_enqueue_update_v1();

DROP TRIGGER IF EXISTS images_touch ON pgsynapse.images;
CREATE TRIGGER images_touch
    BEFORE UPDATE ON pgsynapse.images
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.images_touch_v1();
