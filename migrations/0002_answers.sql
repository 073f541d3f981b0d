-- pgsynapse 0002: questions answered from the documents, per-session history, guardrails, hybrid search.

CREATE TABLE pgsynapse.questions (
    id               bigserial PRIMARY KEY,
    session_id       text,
    text             text NOT NULL CONSTRAINT questions_text_not_empty CHECK (length(btrim(text)) > 0),
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'answered', 'failed', 'blocked')),
    answer           text,
    -- [{"rank", "document_id", "chunk_id", "title", "source", "score", "passage"}, ...]
    sources          jsonb,
    model_version_id int REFERENCES pgsynapse.model_versions (id) ON DELETE SET NULL,
    -- what retrieval embedded: the question, with the session's previous turn for a follow-up
    retrieval_query  text,
    -- a guardrail rule that blocked or flagged the question or its answer
    guardrail        jsonb,
    answerer         text,
    latency_ms       double precision,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    answered_at      timestamptz
);
CREATE INDEX questions_session ON pgsynapse.questions (session_id, id) WHERE session_id IS NOT NULL;
CREATE INDEX questions_version ON pgsynapse.questions (model_version_id);

-- one row per session; its turns are the session's questions in id order
CREATE TABLE pgsynapse.conversations (
    session_id   text PRIMARY KEY,
    turns        int NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_turn_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pgsynapse.guardrail_rules (
    id         serial PRIMARY KEY,
    text       text NOT NULL CONSTRAINT guardrail_text_not_empty CHECK (length(btrim(text)) > 0),
    action     text NOT NULL CHECK (action IN ('block', 'flag')),
    -- cosine similarity at or above which a question or an answer matches the rule
    threshold  double precision NOT NULL DEFAULT 0.6 CHECK (threshold > 0 AND threshold <= 1),
    enabled    boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- hybrid retrieval: full-text ranks fused with vector ranks (reciprocal-rank fusion)
ALTER TABLE pgsynapse.chunks ADD COLUMN tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED;
CREATE INDEX chunks_tsv ON pgsynapse.chunks USING gin (tsv);

-- pgsynapse:include questions_v1.sql
