-- pgsynapse 0011: the semantic answer cache (issue 18, item 4). A question whose embedding is within
-- answer_cache_threshold (cosine) of an earlier answered question, under the same model version, the same answerer
-- settings and the same guardrail rules, with no cited document changed since, is answered from that answer:
-- the row gets the original's answer and sources, answerer = 'cache' and cached_from = the original question's id.
--
-- One entry per answered question that may be served again (handlers/answer.py decides, src/pgsynapse/answer_cache.py
-- documents what is never cached). The entry holds its own copy of the answer: editing the original question (which
-- asks it again) leaves the entry an answer to the text it was asked with.
-- Invalidation: an UPDATE of a cited document's content or its DELETE removes the entry (triggers/answer_cache_v1.sql);
-- a lookup also compares the cited documents' content_hash with the one stored, so an entry written while its
-- document changed is never served. Entries are per model version (one partial HNSW index each, like embeddings'):
-- a retired version loses its index, and its entries are never looked up again.

ALTER TABLE pgsynapse.questions
    ADD COLUMN IF NOT EXISTS cached_from bigint REFERENCES pgsynapse.questions (id) ON DELETE SET NULL;
CREATE INDEX IF NOT EXISTS questions_cached_from ON pgsynapse.questions (cached_from) WHERE cached_from IS NOT NULL;

CREATE TABLE IF NOT EXISTS pgsynapse.answer_cache (
    question_id      bigint PRIMARY KEY REFERENCES pgsynapse.questions (id) ON DELETE CASCADE,
    model_version_id int NOT NULL REFERENCES pgsynapse.model_versions (id) ON DELETE CASCADE,
    -- what else shapes an answer: the answerer and its model, retrieval settings, the pgsynapse version
    settings_key     text NOT NULL,
    -- md5 of the enabled guardrail rules when it was answered: a rule change means another guardrail outcome
    rules_key        text NOT NULL,
    -- the question as answered, and its query embedding under model_version_id (the lookup's kNN key)
    question         text NOT NULL,
    embedding        vector NOT NULL,
    answer           text NOT NULL,
    sources          jsonb NOT NULL,
    -- the cited documents and their content_hash when answered (sorted by id, same length)
    document_ids     bigint[] NOT NULL,
    document_hashes  text[] NOT NULL,
    hit_count        bigint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_hit_at      timestamptz,
    CONSTRAINT answer_cache_hashes_match_documents CHECK (cardinality(document_ids) = cardinality(document_hashes))
);
-- the invalidation triggers' lookup: entries citing any of the changed documents
CREATE INDEX IF NOT EXISTS answer_cache_documents ON pgsynapse.answer_cache USING gin (document_ids);
CREATE INDEX IF NOT EXISTS answer_cache_version ON pgsynapse.answer_cache (model_version_id);

-- the "frequent questions" view: cached answers by how often they were served again
CREATE OR REPLACE VIEW pgsynapse.frequent_questions AS
SELECT c.question_id, c.question, c.answer, c.sources, c.model_version_id, c.hit_count, c.created_at,
       c.last_hit_at
FROM pgsynapse.answer_cache c
ORDER BY c.hit_count DESC, c.last_hit_at DESC NULLS LAST;

-- pgsynapse:include answer_cache_v1.sql

-- an edit that asks a question again clears flags (0010) and cached_from with the rest of the answer (questions v5
-- replaces v3)
DROP TRIGGER IF EXISTS questions_reask ON pgsynapse.questions;
DROP FUNCTION IF EXISTS pgsynapse.questions_reask_v3();
-- pgsynapse:include questions_v5.sql
-- pgsynapse:include model_versions_v2.sql

-- every version that may serve questions gets its answer cache index now (later ones: ensure_embedding_index)
SELECT pgsynapse.ensure_embedding_index(id) FROM pgsynapse.model_versions WHERE status <> 'retired'
    AND status <> 'rejected';

GRANT SELECT ON pgsynapse.frequent_questions TO pgsynapse_app, pgsynapse_worker, pgsynapse_admin;
