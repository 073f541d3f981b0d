-- pgsynapse 0003: the inference cache (query embeddings, answers) and a per-batch inference log.

-- One row per (model version, operation, normalised input). A hit never crosses versions: the version is
-- part of the key, and the rows of a version go with it.
CREATE TABLE IF NOT EXISTS pgsynapse.inference_cache (
    model_version_id int NOT NULL REFERENCES pgsynapse.model_versions (id) ON DELETE CASCADE,
    op               text NOT NULL,            -- 'query_embedding', 'answer', ...
    input_hash       bytea NOT NULL,           -- sha256 of the runtime and the normalised input
    embedding        vector,                   -- op = 'query_embedding'
    output           jsonb,                    -- other ops
    hit_count        bigint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_hit_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_version_id, op, input_hash),
    CHECK (embedding IS NOT NULL OR output IS NOT NULL)
);
-- the cleanup's TTL and size bound walk this index
CREATE INDEX IF NOT EXISTS inference_cache_last_hit ON pgsynapse.inference_cache (last_hit_at);

CREATE TABLE IF NOT EXISTS pgsynapse.inference_log (
    id               bigserial PRIMARY KEY,
    model_version_id int REFERENCES pgsynapse.model_versions (id) ON DELETE SET NULL,
    op               text NOT NULL,
    batch_size       int NOT NULL,
    latency_ms       real NOT NULL,
    at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS inference_log_at ON pgsynapse.inference_log (at);

-- Bulk enqueue: one job row per large INSERT statement, expanded by the worker (see documents_v2.sql).
ALTER TABLE pgsynapse.jobs ADD COLUMN IF NOT EXISTS ref_ids bigint[];

-- pgsynapse:include documents_v2.sql
