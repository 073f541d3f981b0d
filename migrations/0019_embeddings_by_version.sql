-- pgsynapse 0019: pgsynapse.embeddings partitioned by model version (issue 21; bench/scale.py --part vectors).
-- Retiring a version of 100,000 vectors took 0.91 s as a DELETE plus the VACUUM it needs (which also walks the
-- serving version's HNSW index) and left the table at twice its size; as a DROP TABLE of its partition, 0.11 s and
-- nothing left behind. Each version gets its partition pgsynapse.embeddings_v<id> and its HNSW index on it
-- (model_versions_v3.sql); queries name the version with a literal or a parameter, so the planner reads one
-- partition and its index, as it read the partial index before. The primary key (model_version_id, chunk_id)
-- already leads with the partition key. Upgrading copies every vector of the versions that are not retired once
-- (in this migration's transaction) and rebuilds their HNSW indexes. Idempotent: a partitioned table is left as is.

-- pgsynapse:include model_versions_v3.sql

DO $$
DECLARE
    v int;
BEGIN
    IF (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = 'pgsynapse.embeddings'::regclass) = 'p' THEN
        RETURN;
    END IF;
    LOCK TABLE pgsynapse.embeddings IN ACCESS EXCLUSIVE MODE;
    ALTER TABLE pgsynapse.embeddings RENAME TO embeddings_unpartitioned;
    ALTER INDEX pgsynapse.embeddings_pkey RENAME TO embeddings_unpartitioned_pkey;
    ALTER INDEX pgsynapse.embeddings_chunk RENAME TO embeddings_unpartitioned_chunk;
    FOR v IN SELECT id FROM pgsynapse.model_versions LOOP
        EXECUTE format('DROP INDEX IF EXISTS pgsynapse.%I', 'embeddings_hnsw_v' || v);
    END LOOP;
    CREATE TABLE pgsynapse.embeddings (
        chunk_id         bigint NOT NULL REFERENCES pgsynapse.chunks (id) ON DELETE CASCADE,
        model_version_id int NOT NULL REFERENCES pgsynapse.model_versions (id),
        embedding        vector NOT NULL,
        created_at       timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (model_version_id, chunk_id)
    ) PARTITION BY LIST (model_version_id);
    CREATE INDEX embeddings_chunk ON pgsynapse.embeddings (chunk_id);
    FOR v IN SELECT id FROM pgsynapse.model_versions WHERE status <> 'retired' ORDER BY id LOOP
        PERFORM pgsynapse.ensure_embedding_partition_v1(v);
        INSERT INTO pgsynapse.embeddings (chunk_id, model_version_id, embedding, created_at)
        SELECT chunk_id, model_version_id, embedding, created_at
        FROM pgsynapse.embeddings_unpartitioned WHERE model_version_id = v;
        PERFORM pgsynapse.ensure_embedding_index(v);
    END LOOP;
    DROP TABLE pgsynapse.embeddings_unpartitioned;  -- with the vectors of retired versions, if any were left
    GRANT SELECT ON pgsynapse.embeddings TO pgsynapse_app;
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgsynapse.embeddings TO pgsynapse_worker, pgsynapse_admin;
END $$;
