-- model_versions: the owner-only DDL of the model registry, behind SECURITY DEFINER functions, so the worker and
-- admin roles (migration 0007) manage versions without owning the tables.
--
-- ensure_embedding_index (0001) keeps its name and signature (workers and `pgsynapse model export` call it) and
-- now runs with its owner's rights: CREATE INDEX needs the table's owner. pgvector's type and operator class are
-- qualified with the schema the extension lives in, since the fixed search_path leaves that schema out.
--
-- A version set to 'retired' loses its partial HNSW index in the same statement (`pgsynapse retire`): DROP INDEX
-- too is the owner's, and the index of a retired version serves nothing.

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
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.model_versions_retired_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    EXECUTE format('DROP INDEX IF EXISTS pgsynapse.%I', 'embeddings_hnsw_v' || NEW.id);
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.ensure_embedding_index(int), pgsynapse.model_versions_retired_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS model_versions_retired ON pgsynapse.model_versions;
CREATE TRIGGER model_versions_retired
    AFTER UPDATE OF status ON pgsynapse.model_versions
    FOR EACH ROW WHEN (NEW.status = 'retired' AND OLD.status IS DISTINCT FROM 'retired')
    EXECUTE FUNCTION pgsynapse.model_versions_retired_v1();
