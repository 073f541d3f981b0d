-- pgsynapse 0001: documents, chunks, embeddings, model versions and the durable job queue.
CREATE EXTENSION IF NOT EXISTS vector;
CREATE SCHEMA IF NOT EXISTS pgsynapse;

CREATE TABLE pgsynapse.model_versions (
    id              serial PRIMARY KEY,
    name            text NOT NULL,
    kind            text NOT NULL DEFAULT 'embedding',
    base_version_id int REFERENCES pgsynapse.model_versions (id),
    -- NULL: the configured default model (PGSYNAPSE_MODEL_PATH, else the packaged all-MiniLM-L6-v2)
    artifact_path   text,
    runtime         text NOT NULL DEFAULT 'torch' CHECK (runtime IN ('torch', 'onnx', 'onnx-int8')),
    dim             int NOT NULL CHECK (dim > 0),
    metrics         jsonb NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'candidate'
                    CHECK (status IN ('training', 'candidate', 'rejected', 'active', 'retired')),
    traffic_percent numeric(5, 2) NOT NULL DEFAULT 0 CHECK (traffic_percent BETWEEN 0 AND 100),
    created_at      timestamptz NOT NULL DEFAULT now(),
    activated_at    timestamptz
);
CREATE UNIQUE INDEX model_versions_one_active ON pgsynapse.model_versions ((true)) WHERE status = 'active';

INSERT INTO pgsynapse.model_versions (id, name, artifact_path, runtime, dim, status, traffic_percent, activated_at)
VALUES (1, 'all-MiniLM-L6-v2', NULL, 'torch', 384, 'active', 100, now());
SELECT setval('pgsynapse.model_versions_id_seq', 1);

CREATE TABLE pgsynapse.documents (
    id            bigserial PRIMARY KEY,
    source        text,
    title         text,
    body          text,
    metadata      jsonb NOT NULL DEFAULT '{}',
    -- what is embedded: an UPDATE that leaves this unchanged enqueues nothing
    content_hash  text GENERATED ALWAYS AS (md5(coalesce(title, '') || chr(30) || coalesce(body, ''))) STORED,
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'embedded', 'failed')),
    error         text,
    embedded_hash text,
    embedded_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX documents_source ON pgsynapse.documents (source);
CREATE INDEX documents_content_hash ON pgsynapse.documents (content_hash);

CREATE TABLE pgsynapse.chunks (
    id           bigserial PRIMARY KEY,
    document_id  bigint NOT NULL REFERENCES pgsynapse.documents (id) ON DELETE CASCADE,
    ord          int NOT NULL,
    text         text NOT NULL,
    token_count  int NOT NULL,
    char_start   int NOT NULL,
    char_end     int NOT NULL,
    content_hash text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (document_id, ord)
);

CREATE TABLE pgsynapse.embeddings (
    chunk_id         bigint NOT NULL REFERENCES pgsynapse.chunks (id) ON DELETE CASCADE,
    model_version_id int NOT NULL REFERENCES pgsynapse.model_versions (id),
    embedding        vector NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_version_id, chunk_id)
);
CREATE INDEX embeddings_chunk ON pgsynapse.embeddings (chunk_id);

-- One partial HNSW index per model version: versions coexist during an A/B test, a switch never DROPs.
CREATE FUNCTION pgsynapse.ensure_embedding_index(version int) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    d int;
BEGIN
    SELECT dim INTO STRICT d FROM pgsynapse.model_versions WHERE id = version;
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON pgsynapse.embeddings USING hnsw ((embedding::vector(%s)) vector_cosine_ops) '
        'WHERE model_version_id = %s',
        'embeddings_hnsw_v' || version, d, version);
END $$;
SELECT pgsynapse.ensure_embedding_index(1);

CREATE TABLE pgsynapse.jobs (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,
    ref_id      bigint NOT NULL,
    payload     jsonb NOT NULL DEFAULT '{}',
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts    int NOT NULL DEFAULT 0,
    run_after   timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz,
    worker      text,
    last_error  text,
    -- incremented by the writer in the transaction that completes the job: must end at exactly 1
    completions int NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz
);
-- dedup: at most one pending job per (kind, row)
CREATE UNIQUE INDEX jobs_pending_dedup ON pgsynapse.jobs (kind, ref_id) WHERE status = 'pending';
-- the claim query's index
CREATE INDEX jobs_claim ON pgsynapse.jobs (kind, run_after, id) WHERE status = 'pending';
CREATE INDEX jobs_running_lease ON pgsynapse.jobs (lease_until) WHERE status = 'running';
CREATE INDEX jobs_failed ON pgsynapse.jobs (kind) WHERE status = 'failed';

-- pgsynapse:include documents_v1.sql
