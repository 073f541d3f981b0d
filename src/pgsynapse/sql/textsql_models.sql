-- The SQL model registry (pgsynapse.sql_models) and the SQL retrain's reads: pgsynapse.textsql.registry,
-- handlers/sql_retrain.py and pgsynapse.textsql.train.

-- name: sql_models
SELECT id, name, base_id, path, runtime, metrics, status, traffic_percent, created_at, activated_at, replaced_id
FROM pgsynapse.sql_models
ORDER BY id;

-- name: sql_model_by_id
SELECT id, name, base_id, path, runtime, metrics, status, traffic_percent, created_at, activated_at, replaced_id
FROM pgsynapse.sql_models
WHERE id = %(id)s;

-- name: active_sql_model
SELECT id, name, base_id, path, runtime, metrics, status, traffic_percent, created_at, activated_at, replaced_id
FROM pgsynapse.sql_models
WHERE status = 'active';

-- name: routable_sql_models
-- what learning.routing.choose_version routes on: the active model and the candidates that have traffic, in id
-- order (candidates take consecutive bucket ranges in that order)
SELECT id, name, base_id, path, runtime, status, traffic_percent
FROM pgsynapse.sql_models
WHERE status = 'active' OR (status = 'candidate' AND traffic_percent > 0)
ORDER BY id;

-- name: lock_sql_models
-- promote, rollback and traffic changes are serialised: at most one active model, candidates' traffic <= 100 %
LOCK TABLE pgsynapse.sql_models IN SHARE ROW EXCLUSIVE MODE;

-- name: add_sql_model
INSERT INTO pgsynapse.sql_models (name, base_id, path, runtime, metrics, status, traffic_percent)
VALUES (%(name)s, %(base_id)s, %(path)s, %(runtime)s, %(metrics)s, %(status)s, %(traffic)s)
RETURNING id, name, base_id, path, runtime, metrics, status, traffic_percent, created_at, activated_at, replaced_id;

-- name: candidate_traffic
-- the traffic the candidates other than %(id)s have (0 when none)
SELECT coalesce(sum(traffic_percent), 0)::float8 AS total
FROM pgsynapse.sql_models
WHERE status = 'candidate' AND id IS DISTINCT FROM %(id)s;

-- name: retire_active_sql_model
UPDATE pgsynapse.sql_models SET status = 'retired', traffic_percent = 0
WHERE status = 'active' AND id <> %(id)s
RETURNING id;

-- name: promote_sql_model
-- replaced_id: the model it replaces (NULL: the settings' model served), what a rollback returns to
UPDATE pgsynapse.sql_models
SET status = 'active', traffic_percent = 100, activated_at = now(), replaced_id = %(replaced)s
WHERE id = %(id)s
RETURNING id;

-- name: reactivate_sql_model
-- a rollback: the model active again keeps its own replaced_id, so the next rollback goes one further back
UPDATE pgsynapse.sql_models SET status = 'active', traffic_percent = 100, activated_at = now()
WHERE id = %(id)s
RETURNING id;

-- name: retire_sql_model
UPDATE pgsynapse.sql_models SET status = 'retired', traffic_percent = 0
WHERE id = %(id)s
RETURNING id;

-- name: set_sql_model_traffic
UPDATE pgsynapse.sql_models SET traffic_percent = %(traffic)s
WHERE id = %(id)s AND status = 'candidate'
RETURNING id;

-- name: new_sql_corrections
-- corrections no SQL retrain has used yet (the trigger on sql_corrections counts the same)
SELECT count(*) AS n
FROM pgsynapse.sql_corrections
WHERE trained_in_model IS NULL;

-- name: mark_sql_corrections_trained
-- the corrections a retrain saw (every one up to the last it read, whatever its verdict) are not new any more
UPDATE pgsynapse.sql_corrections SET trained_in_model = %(model)s
WHERE trained_in_model IS NULL AND id <= %(max_id)s;

-- name: sql_training_pairs
-- one training pair per corrected question (its latest correction): the target is the corrected SQL, or the
-- generated one when the correction approves it; the question's schema context rebuilds the prompt, and its
-- target schema and allowed tables are what the target and the models' statements are run against
SELECT DISTINCT ON (c.question_id)
       c.id AS correction_id, c.question_id, q.text AS question, q.schema_context, q.target_schema,
       q.allowed_tables, q.session_id, q.sql_model_id,
       coalesce(c.corrected_sql, q.sql) AS target_sql
FROM pgsynapse.sql_corrections c
JOIN pgsynapse.data_questions q ON q.id = c.question_id
WHERE c.corrected_sql IS NOT NULL OR (c.approved AND q.sql IS NOT NULL)
ORDER BY c.question_id, c.id DESC;
