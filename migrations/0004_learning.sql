-- pgsynapse 0004: feedback, training examples, retraining, backfill and A/B rollout of model versions.

CREATE TABLE pgsynapse.feedback (
    id          bigserial PRIMARY KEY,
    question_id bigint NOT NULL
                CONSTRAINT feedback_question_must_exist REFERENCES pgsynapse.questions (id) ON DELETE CASCADE,
    helpful     boolean,
    rating      smallint CONSTRAINT feedback_rating_between_1_and_5 CHECK (rating BETWEEN 1 AND 5),
    -- the passage the user found helpful (optional; else the answer's top cited source)
    chunk_id    bigint CONSTRAINT feedback_chunk_must_exist REFERENCES pgsynapse.chunks (id) ON DELETE SET NULL,
    comment     text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT feedback_needs_helpful_or_rating CHECK (helpful IS NOT NULL OR rating IS NOT NULL)
);
CREATE INDEX feedback_question ON pgsynapse.feedback (question_id);

-- One row per feedback: the question, its positive passage and the negatives an unhelpful answer gave.
CREATE TABLE pgsynapse.training_examples (
    id                 bigserial PRIMARY KEY,
    feedback_id        bigint UNIQUE REFERENCES pgsynapse.feedback (id) ON DELETE CASCADE,
    question_id        bigint,
    query              text NOT NULL,
    positive_chunk_id  bigint REFERENCES pgsynapse.chunks (id) ON DELETE SET NULL,
    negative_chunk_ids bigint[] NOT NULL DEFAULT '{}',
    created_at         timestamptz NOT NULL DEFAULT now(),
    trained_in_version int REFERENCES pgsynapse.model_versions (id) ON DELETE SET NULL
);
CREATE INDEX training_examples_untrained ON pgsynapse.training_examples (created_at) WHERE trained_in_version IS NULL;

-- Learning knobs the trigger needs; the worker writes PGSYNAPSE_RETRAIN_MIN_FEEDBACK here at start.
CREATE TABLE pgsynapse.learning_settings (
    id                   boolean PRIMARY KEY DEFAULT true CHECK (id),
    retrain_min_feedback int NOT NULL DEFAULT 200 CHECK (retrain_min_feedback > 0)
);
INSERT INTO pgsynapse.learning_settings DEFAULT VALUES;

ALTER TABLE pgsynapse.model_versions
    ADD COLUMN backfilled_at   timestamptz,
    ADD COLUMN deactivated_at  timestamptz,
    ADD COLUMN retired_at      timestamptz;
-- the active version has every chunk embedded by the embed jobs themselves
UPDATE pgsynapse.model_versions SET backfilled_at = coalesce(activated_at, created_at) WHERE status = 'active';

-- pgsynapse:include feedback_v1.sql
