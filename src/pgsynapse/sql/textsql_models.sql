-- The SQL retrain's reads: handlers/sql_retrain.py and pgsynapse.textsql.train. The SQL model registry's own
-- queries (pgsynapse.sql_models) are side_models.sql's, run by pgsynapse.sideregistry.

-- A correction trains when it has a statement (not blank), or approves a statement that ran (the question was
-- answered), and was given since the question was last asked (asked_at, migration 0024; NULL: created_at): one
-- given before an edit was for the old text and statement, and its question is not blocked (a guardrail rule matched
-- it: migration 0042). One pair per question. The counts below, sql_training_pairs and the trigger on
-- sql_corrections (triggers/data_questions_v6.sql) count the same.

-- name: new_sql_corrections
-- questions with a correction no SQL retrain has used yet
SELECT count(DISTINCT c.question_id) AS n
FROM pgsynapse.sql_corrections c
JOIN pgsynapse.data_questions q ON q.id = c.question_id
WHERE c.trained_in_model IS NULL AND c.created_at >= coalesce(q.asked_at, q.created_at) AND q.status <> 'blocked'
  AND (c.corrected_sql ~ '[^[:space:]]' OR (c.corrected_sql IS NULL AND c.approved AND q.status = 'answered'));

-- name: sql_corrections_count
-- `pgsynapse sql-model retrain` refuses to queue a retrain with nothing to learn from
SELECT count(DISTINCT c.question_id) AS n
FROM pgsynapse.sql_corrections c
JOIN pgsynapse.data_questions q ON q.id = c.question_id
WHERE c.created_at >= coalesce(q.asked_at, q.created_at) AND q.status <> 'blocked'
  AND (c.corrected_sql ~ '[^[:space:]]' OR (c.corrected_sql IS NULL AND c.approved AND q.status = 'answered'));

-- name: sql_model_of_job
-- the SQL model a sql_retrain job registered: its metrics name the job (handlers/sql_retrain.py), so a model
-- another sql_retrain registered meanwhile is never taken for it
SELECT id, name, base_id, path, runtime, metrics, status, traffic_percent
FROM pgsynapse.sql_models
WHERE metrics ? 'gate' AND metrics->>'job' = %(job)s::text
ORDER BY id
LIMIT 1;

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
       q.allowed_tables, CASE WHEN btrim(q.session_id) <> '' THEN q.session_id END AS session_id,  -- blank: none
       q.sql_model_id,
       coalesce(c.corrected_sql, q.sql) AS target_sql
FROM pgsynapse.sql_corrections c
JOIN pgsynapse.data_questions q ON q.id = c.question_id
WHERE c.created_at >= coalesce(q.asked_at, q.created_at) AND q.status <> 'blocked'
  AND (c.corrected_sql ~ '[^[:space:]]' OR (c.corrected_sql IS NULL AND c.approved AND q.status = 'answered'))
ORDER BY c.question_id, c.id DESC;
