-- pgsynapse 0012: the retrain gate's canary set (issue 23, item 1). Questions built once from the corpus (not from
-- feedback), each about one document, frozen: the gate scores every candidate on the same questions. Built by the
-- first retrain (src/pgsynapse/learning/canary.py), never rebuilt automatically; `pgsynapse canary rebuild` replaces
-- it. Its documents feed no corpus-only training pairs (learning/train.py), so a candidate cannot learn them.

CREATE TABLE IF NOT EXISTS pgsynapse.canary_questions (
    id                  bigserial PRIMARY KEY,
    question            text NOT NULL CONSTRAINT canary_question_not_empty CHECK (btrim(question) <> ''),
    -- the page that answers it (page-level hit@k / reciprocal rank)
    document_id         bigint NOT NULL REFERENCES pgsynapse.documents (id) ON DELETE CASCADE,
    -- which part of the document it was built from
    origin              text NOT NULL CONSTRAINT canary_origin_known
                        CHECK (origin IN ('summary', 'parameter', 'heading', 'title')),
    -- the active version when the set was frozen
    frozen_with_version int REFERENCES pgsynapse.model_versions (id) ON DELETE SET NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS canary_questions_document ON pgsynapse.canary_questions (document_id);

-- the worker builds it; an operator may read and rebuild it (0007's default privileges say the same, explicitly here)
GRANT SELECT, INSERT, UPDATE, DELETE ON pgsynapse.canary_questions TO pgsynapse_worker, pgsynapse_admin;
GRANT USAGE, SELECT ON SEQUENCE pgsynapse.canary_questions_id_seq TO pgsynapse_worker, pgsynapse_admin;
