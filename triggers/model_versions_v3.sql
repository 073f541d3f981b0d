-- model_versions v3: pgsynapse.embeddings is partitioned by model version (migration 0019). Each version has its
-- own partition, pgsynapse.embeddings_v<id>, created when the version is registered (and by
-- ensure_embedding_index for any version that predates this); its HNSW index belongs to the partition (no WHERE:
-- the partition holds one version). A version set to 'retired' loses its partition, vectors and index with it, in
-- the same statement: a DROP TABLE instead of a DELETE and the VACUUM after it (bench/scale.py --part vectors).
-- ensure_embedding_index keeps its name and signature (workers, retrain and `pgsynapse model export` call it).

CREATE OR REPLACE FUNCTION pgsynapse.ensure_embedding_partition_v1(version int) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    IF to_regclass(format('pgsynapse.%I', 'embeddings_v' || version)) IS NULL THEN
        -- created, then attached: ATTACH takes SHARE UPDATE EXCLUSIVE on pgsynapse.embeddings, which searches
        -- and writes of the other versions pass (CREATE TABLE ... PARTITION OF would wait for them and block them)
        EXECUTE format('CREATE TABLE pgsynapse.%I (LIKE pgsynapse.embeddings INCLUDING DEFAULTS)',
                       'embeddings_v' || version);
        EXECUTE format('ALTER TABLE pgsynapse.embeddings ATTACH PARTITION pgsynapse.%I FOR VALUES IN (%s)',
                       'embeddings_v' || version, version);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.ensure_embedding_index(version int) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    d int;
    vec name;
BEGIN
    SELECT dim INTO STRICT d FROM pgsynapse.model_versions WHERE id = version;
    SELECT n.nspname INTO STRICT vec
    FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'vector';
    PERFORM pgsynapse.ensure_embedding_partition_v1(version);
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON pgsynapse.%I USING hnsw ((embedding::%I.vector(%s)) %I.vector_cosine_ops)',
        'embeddings_hnsw_v' || version, 'embeddings_v' || version, vec, d, vec);
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON pgsynapse.answer_cache USING hnsw ((embedding::%I.vector(%s)) %I.vector_cosine_ops) '
        'WHERE model_version_id = %s',
        'answer_cache_hnsw_v' || version, vec, d, vec, version);
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.model_versions_registered_v3() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    PERFORM pgsynapse.ensure_embedding_partition_v1(NEW.id);
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.model_versions_retired_v3() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    EXECUTE format('DROP TABLE IF EXISTS pgsynapse.%I', 'embeddings_v' || NEW.id);
    EXECUTE format('DROP INDEX IF EXISTS pgsynapse.%I', 'answer_cache_hnsw_v' || NEW.id);
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.ensure_embedding_partition_v1(int), pgsynapse.ensure_embedding_index(int),
    pgsynapse.model_versions_registered_v3(), pgsynapse.model_versions_retired_v3() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgsynapse.ensure_embedding_index(int) TO pgsynapse_worker, pgsynapse_admin;

DROP TRIGGER IF EXISTS model_versions_registered ON pgsynapse.model_versions;
CREATE TRIGGER model_versions_registered
    AFTER INSERT ON pgsynapse.model_versions
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.model_versions_registered_v3();

DROP TRIGGER IF EXISTS model_versions_retired ON pgsynapse.model_versions;
CREATE TRIGGER model_versions_retired
    AFTER UPDATE OF status ON pgsynapse.model_versions
    FOR EACH ROW WHEN (NEW.status = 'retired' AND OLD.status IS DISTINCT FROM 'retired')
    EXECUTE FUNCTION pgsynapse.model_versions_retired_v3();
