-- pgsynapse 0020: second-stage rankers (issue 20). Answers and `search` take the top candidates of the vector
-- search (and full text when hybrid) and a ranker orders them again: a cross-encoder trained from the feedback
-- and corpus pairs the retrain job uses (pgsynapse ranker train), run on ONNX Runtime INT8 by default. Rankers
-- have their own registry with the shape of sql_models (pgsynapse.sideregistry): no vectors, no dimension, no
-- backfill. No active ranker: the vector order stands (the state of every database before this migration).

CREATE TABLE IF NOT EXISTS pgsynapse.ranker_models (
    id              serial PRIMARY KEY,
    name            text NOT NULL,
    base_id         int REFERENCES pgsynapse.ranker_models (id),
    -- a cross-encoder directory (transformers sequence classification, one label), with model_int8.onnx for
    -- the onnx-int8 runtime; for runtime 'version', 'version:N': model version N's stored vectors rescore
    -- (ranking/rescore.py)
    path            text NOT NULL,
    runtime         text NOT NULL CHECK (runtime IN ('torch', 'onnx-int8', 'version')),
    metrics         jsonb NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'candidate' CHECK (status IN ('candidate', 'rejected', 'active', 'retired')),
    traffic_percent numeric(5, 2) NOT NULL DEFAULT 0 CHECK (traffic_percent BETWEEN 0 AND 100),
    created_at      timestamptz NOT NULL DEFAULT now(),
    activated_at    timestamptz,
    -- the ranker this one replaced when it was promoted: what `ranker rollback` returns to
    replaced_id     int REFERENCES pgsynapse.ranker_models (id)
);
CREATE UNIQUE INDEX IF NOT EXISTS ranker_models_one_active ON pgsynapse.ranker_models ((true)) WHERE status = 'active';

-- which ranker ordered an answer's passages (NULL: the vector order), for the A/B report of rankers
ALTER TABLE pgsynapse.questions
    ADD COLUMN IF NOT EXISTS ranker_id int REFERENCES pgsynapse.ranker_models (id);

GRANT SELECT ON pgsynapse.ranker_models TO pgsynapse_app;
