-- A side registry: a table of models with the shape of pgsynapse.sql_models (migration 0016) or
-- pgsynapse.ranker_models (0020), managed by pgsynapse.sideregistry. {table} is the registry's table, formatted in
-- by the code (a constant of the module, never input).

-- name: models
SELECT id, name, base_id, path, runtime, metrics, status, traffic_percent, created_at, activated_at, replaced_id
FROM pgsynapse.{table}
ORDER BY id;

-- name: model_by_id
SELECT id, name, base_id, path, runtime, metrics, status, traffic_percent, created_at, activated_at, replaced_id
FROM pgsynapse.{table}
WHERE id = %(id)s;

-- name: model_at_path
-- a model registered (and not retired) with this path: the same model added twice
SELECT id, status
FROM pgsynapse.{table}
WHERE path = %(path)s AND status <> 'retired'
ORDER BY id
LIMIT 1;

-- name: active_model
SELECT id, name, base_id, path, runtime, metrics, status, traffic_percent, created_at, activated_at, replaced_id
FROM pgsynapse.{table}
WHERE status = 'active';

-- name: routable_models
-- what learning.routing.choose_version routes on: the active model and the candidates that have traffic, in id
-- order (candidates take consecutive bucket ranges in that order)
SELECT id, name, base_id, path, runtime, metrics, status, traffic_percent
FROM pgsynapse.{table}
WHERE status = 'active' OR (status = 'candidate' AND traffic_percent > 0)
ORDER BY id;

-- name: lock_models
-- promote, rollback and traffic changes are serialised: at most one active model, candidates' traffic <= 100 %
LOCK TABLE pgsynapse.{table} IN SHARE ROW EXCLUSIVE MODE;

-- name: add_model
INSERT INTO pgsynapse.{table} (name, base_id, path, runtime, metrics, status, traffic_percent)
VALUES (%(name)s, %(base_id)s, %(path)s, %(runtime)s, %(metrics)s, %(status)s, %(traffic)s)
RETURNING id, name, base_id, path, runtime, metrics, status, traffic_percent, created_at, activated_at, replaced_id;

-- name: candidate_traffic
-- the traffic the candidates other than %(id)s have (0 when none)
SELECT coalesce(sum(traffic_percent), 0)::float8 AS total
FROM pgsynapse.{table}
WHERE status = 'candidate' AND id IS DISTINCT FROM %(id)s;

-- name: retire_active_model
UPDATE pgsynapse.{table} SET status = 'retired', traffic_percent = 0
WHERE status = 'active' AND id <> %(id)s
RETURNING id;

-- name: promote_model
-- replaced_id: the model it replaces (NULL: none was active), what a rollback returns to
UPDATE pgsynapse.{table}
SET status = 'active', traffic_percent = 100, activated_at = now(), replaced_id = %(replaced)s
WHERE id = %(id)s
RETURNING id;

-- name: reactivate_model
-- a rollback: the model active again keeps its own replaced_id, so the next rollback goes one further back
UPDATE pgsynapse.{table} SET status = 'active', traffic_percent = 100, activated_at = now()
WHERE id = %(id)s
RETURNING id;

-- name: retire_model
UPDATE pgsynapse.{table} SET status = 'retired', traffic_percent = 0
WHERE id = %(id)s
RETURNING id;

-- name: set_model_traffic
UPDATE pgsynapse.{table} SET traffic_percent = %(traffic)s
WHERE id = %(id)s AND status = 'candidate'
RETURNING id;

-- name: update_model_path
-- the serving artifact of a model, once exported (the ranker's ONNX INT8 directory)
UPDATE pgsynapse.{table} SET path = %(path)s, runtime = %(runtime)s, metrics = metrics || %(metrics)s
WHERE id = %(id)s
RETURNING id;
