-- model_versions v2: each model version that serves questions has two partial HNSW indexes, its embeddings'
-- (model_versions_v1) and now its answer cache entries' (migration 0011): the answer cache is looked up per version
-- like retrieval. ensure_embedding_index keeps its name and signature (workers, retrain and `pgsynapse model export`
-- call it) and creates both; a version set to 'retired' loses both in the same statement.

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
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON pgsynapse.embeddings USING hnsw ((embedding::%I.vector(%s)) %I.vector_cosine_ops) '
        'WHERE model_version_id = %s',
        'embeddings_hnsw_v' || version, vec, d, vec, version);
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON pgsynapse.answer_cache USING hnsw ((embedding::%I.vector(%s)) %I.vector_cosine_ops) '
        'WHERE model_version_id = %s',
        'answer_cache_hnsw_v' || version, vec, d, vec, version);
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.model_versions_retired_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    EXECUTE format('DROP INDEX IF EXISTS pgsynapse.%I', 'embeddings_hnsw_v' || NEW.id);
    EXECUTE format('DROP INDEX IF EXISTS pgsynapse.%I', 'answer_cache_hnsw_v' || NEW.id);
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.ensure_embedding_index(int), pgsynapse.model_versions_retired_v2() FROM PUBLIC;

DROP TRIGGER IF EXISTS model_versions_retired ON pgsynapse.model_versions;
CREATE TRIGGER model_versions_retired
    AFTER UPDATE OF status ON pgsynapse.model_versions
    FOR EACH ROW WHEN (NEW.status = 'retired' AND OLD.status IS DISTINCT FROM 'retired')
    EXECUTE FUNCTION pgsynapse.model_versions_retired_v2();
