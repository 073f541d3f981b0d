-- Named queries of the Python client (pgsynapse/client.py): what an application's own SQL does to ask and read.
-- Loaded by pgsynapse.queries.q(name, "client.sql").

-- name: ask
INSERT INTO pgsynapse.questions (session_id, text) VALUES (%(session)s, %(text)s) RETURNING id;

-- name: ask_data
INSERT INTO pgsynapse.data_questions (session_id, text, target_schema, allowed_tables)
VALUES (%(session)s, %(text)s, %(schema)s, %(tables)s) RETURNING id;

-- name: data_answer
SELECT id, status, sql, result, row_count, truncated, error, sql_model_id, latency_ms, session_id, guardrail
FROM pgsynapse.data_questions WHERE id = %(id)s;

-- name: answer
SELECT id, status, answer, sources, model_version_id, latency_ms, error, guardrail, session_id, flags, cached_from
FROM pgsynapse.questions WHERE id = %(id)s;

-- name: local_statement_timeout
-- The rest of a call's timeout for the INSERT that follows in the same transaction: PostgreSQL cancels it when
-- the time is up, so a timed-out ask wrote nothing.
SELECT set_config('statement_timeout', %(timeout)s, true);
