-- Questions about the data (migration 0016): the sql_answer handler and the schema context of its prompts.

-- name: load_data_questions
-- A question over max_question_chars comes without its text: it fails from its length. A blank session_id is no
-- session, any other is the session as written, spaces included (load_questions in answers.sql).
SELECT id, CASE WHEN btrim(session_id) <> '' THEN session_id END AS session_id, target_schema, allowed_tables,
       text_hash, length(text) AS chars, CASE WHEN length(text) <= %(max_chars)s THEN text END AS text
FROM pgsynapse.data_questions WHERE id = ANY(%(ids)s) AND status = 'pending';

-- name: data_session_history
-- Earlier answered turns of a session, newest first: (question, sql) pairs for the prompt.
SELECT id, text, sql FROM pgsynapse.data_questions
WHERE session_id = %(session)s AND id < %(before)s AND status = 'answered' AND sql IS NOT NULL
  AND length(text) <= %(max_chars)s
ORDER BY id DESC LIMIT %(limit)s;

-- name: readable_tables
-- The tables and views of the question's scope that the reader role may SELECT: every one of a schema
-- (names NULL), or the named ones, each with the schema and table it names as pgsynapse.textsql.names reads it
-- (scope_parameters: quoted names unquoted; NULL for one that is not a name). Unknown names come back with oid NULL.
WITH wanted AS (
    SELECT n AS name, s AS nspname, r AS relname
    FROM unnest(%(names)s::text[], %(schemas)s::text[], %(relnames)s::text[]) AS w(n, s, r)
)
SELECT c.oid::int AS oid, ns.nspname AS schema, c.relname AS name, c.relkind::text AS kind,
       pg_catalog.obj_description(c.oid, 'pg_class') AS comment,
       pg_catalog.has_table_privilege(%(role)s, c.oid, 'SELECT')
           AND pg_catalog.has_schema_privilege(%(role)s, ns.oid, 'USAGE') AS readable,
       NULL::text AS asked
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace ns ON ns.oid = c.relnamespace
WHERE %(names)s::text[] IS NULL AND ns.nspname = %(schema)s AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
  AND NOT c.relispartition
UNION ALL
SELECT c.oid::int, w.nspname, w.relname, c.relkind::text, pg_catalog.obj_description(c.oid, 'pg_class'),
       coalesce(pg_catalog.has_table_privilege(%(role)s, c.oid, 'SELECT')
           AND pg_catalog.has_schema_privilege(%(role)s, ns.oid, 'USAGE'), false),
       w.name
FROM wanted w
LEFT JOIN pg_catalog.pg_namespace ns ON ns.nspname = w.nspname
LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = ns.oid AND c.relname = w.relname
    AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
ORDER BY 2, 3;

-- name: schema_exists
SELECT EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = %(schema)s) AS found;

-- name: table_columns
SELECT a.attrelid::int AS oid, a.attname AS name, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type,
       a.attnotnull AS not_null, pg_catalog.col_description(a.attrelid, a.attnum) AS comment
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = ANY(%(oids)s::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum;

-- name: table_keys
-- Primary keys and foreign keys: (table, kind, its columns, the referenced table and columns).
SELECT con.conrelid::int AS oid, con.contype::text AS kind,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.i) AS columns,
       fns.nspname AS ref_schema, fc.relname AS ref_table,
       ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.i) AS ref_columns
FROM pg_catalog.pg_constraint con
LEFT JOIN pg_catalog.pg_class fc ON fc.oid = con.confrelid
LEFT JOIN pg_catalog.pg_namespace fns ON fns.oid = fc.relnamespace
WHERE con.conrelid = ANY(%(oids)s::oid[]) AND con.contype IN ('p', 'f')
ORDER BY con.conrelid, con.contype DESC, con.conname;

-- name: write_data_answer
-- The stale-write guard: the question is still pending with the text the job read.
UPDATE pgsynapse.data_questions
SET status = %(status)s, sql = %(sql)s, result = %(result)s, row_count = %(row_count)s,
    truncated = %(truncated)s, error = %(error)s, schema_context = %(schema_context)s,
    sql_model_id = %(model)s, guardrail = %(guardrail)s, answered_at = now(),
    latency_ms = extract(epoch FROM clock_timestamp() - coalesce(asked_at, created_at)) * 1000
WHERE id = %(id)s AND status = 'pending' AND text_hash = %(text_hash)s
RETURNING id, status;

-- name: lock_data_question_rows
-- as lock_document_rows in queries.sql
SELECT id FROM pgsynapse.data_questions WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE;

-- name: data_question_changed_since
-- as document_changed_since in queries.sql
SELECT text_hash IS DISTINCT FROM %(hash)s AS changed FROM pgsynapse.data_questions WHERE id = %(id)s FOR UPDATE;

-- name: requeue_changed_data_questions
-- as requeue_changed_questions in answers.sql
INSERT INTO pgsynapse.jobs (kind, ref_id)
SELECT j.kind, j.ref_id FROM pgsynapse.jobs j JOIN pgsynapse.data_questions q ON q.id = j.ref_id
WHERE j.id = ANY(%(jobs)s) AND q.status = 'pending'
  AND NOT EXISTS (SELECT 1 FROM pgsynapse.jobs n WHERE n.kind = j.kind AND n.ref_id = j.ref_id AND n.id > j.id)
ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;

-- name: fail_data_question
UPDATE pgsynapse.data_questions SET status = 'failed', error = %(error)s, answered_at = now(),
    latency_ms = extract(epoch FROM clock_timestamp() - coalesce(asked_at, created_at)) * 1000
WHERE id = %(id)s AND status = 'pending'
RETURNING id;

-- name: notify_data_answer
SELECT pg_notify('pgsynapse_data_answers', json_build_object('id', %(id)s::bigint, 'status', %(status)s::text)::text);

-- name: data_question_counts
SELECT count(*) FILTER (WHERE status = 'pending') AS pending, count(*) FILTER (WHERE status = 'answered') AS answered,
       count(*) FILTER (WHERE status = 'refused') AS refused, count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'blocked') AS blocked
FROM pgsynapse.data_questions;

-- name: question_to_correct
-- `pgsynapse sql-correct`: what the statement was and whether it ran, and the scope a corrected one may read,
-- and the guardrail rule that blocked it
SELECT status, sql, target_schema, allowed_tables, guardrail ->> 'rule_id' AS rule
FROM pgsynapse.data_questions WHERE id = %(question)s;

-- name: correction_runner
-- `pgsynapse sql-correct` runs a corrected statement as the reader role, as the retrain will, when the user it
-- connects as may SET ROLE to it (a member: the worker, the admin, a superuser); else as that user
SELECT current_user::text AS "user",
       EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = %(role)s
               AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')) AS member;

-- name: insert_correction
-- `pgsynapse sql correct`: the right statement for a data question, or an approval of the generated one
INSERT INTO pgsynapse.sql_corrections (question_id, corrected_sql, approved)
VALUES (%(question)s, %(sql)s, %(approved)s) RETURNING id;

-- name: sample_rows
-- a few rows of a table for the schema prompt's sample values, run read-only as the reader role; {} are the
-- schema, the table (identifiers) and the row count, composed by the caller
SELECT * FROM {}.{} LIMIT {};

-- name: readonly_transaction
-- a data question's statement runs in its own transaction, read only whatever the statement is
SET TRANSACTION READ ONLY;

-- name: readonly_role
-- {} is the reader role (an identifier, composed by the caller)
SET LOCAL ROLE {};

-- name: readonly_limits
-- the statement's time limit and schema, and the server's bound on a client gone silent inside the transaction (a
-- network partition would otherwise leave it open, with its locks, until the server's TCP keepalive gave up)
SELECT pg_catalog.set_config('statement_timeout', %(statement_ms)s, true),
       pg_catalog.set_config('idle_in_transaction_session_timeout', %(silent_ms)s, true),
       pg_catalog.set_config('search_path', %(search_path)s, true);

-- name: readonly_limits_total
-- the same, and (PostgreSQL 17+) a bound on the whole transaction: it also ends one cut off inside a statement's
-- message, where the silent bound is not armed
SELECT pg_catalog.set_config('statement_timeout', %(statement_ms)s, true),
       pg_catalog.set_config('idle_in_transaction_session_timeout', %(silent_ms)s, true),
       pg_catalog.set_config('search_path', %(search_path)s, true),
       pg_catalog.set_config('transaction_timeout', %(total_ms)s, true);

-- name: readonly_client_check
-- the server ends the statement once its client is gone (a killed worker), not at its timeout (textsql/execute.py)
SELECT pg_catalog.set_config('client_connection_check_interval', %(ms)s, true);

-- name: attribute_functions
-- Attribute notation calls a function: t.f is f(t) when t has no column f. The functions of the statement's search
-- path (not pg_catalog, whose are refused by name: textsql/safety.py) that one of its names (%(names)s) would call
-- with one argument and that the role may execute: an operator's (a SECURITY DEFINER one, an extension's http_get)
-- is no plain function of the allow-list. A column of the same name is refused with it.
SELECT n.nspname AS schema, p.proname AS name
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE p.proname = ANY (%(names)s::text[]) AND p.prokind = 'f'
  AND n.nspname = ANY (pg_catalog.current_schemas(false)) AND n.nspname <> 'pg_catalog'
  AND p.pronargs >= 1 AND p.pronargs - p.pronargdefaults <= 1
  AND pg_catalog.has_function_privilege(p.oid, 'EXECUTE')
ORDER BY n.nspname, p.proname
LIMIT 1;

-- name: shadowing_functions
-- An allowed function called unqualified (%(names)s) resolves through the search path too: PostgreSQL calls a
-- function of the question's schema of the same name when its arguments match better (lower(o) calls a
-- lower(orders) rather than pg_catalog's lower(text)). One the role may execute that an operator created, not an
-- extension (citext's, PostGIS's overloads of text functions are plain), is not the allow-listed function.
SELECT n.nspname AS schema, p.proname AS name
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE p.proname = ANY (%(names)s::text[])
  AND n.nspname = ANY (pg_catalog.current_schemas(false)) AND n.nspname <> 'pg_catalog'
  AND pg_catalog.has_function_privilege(p.oid, 'EXECUTE')
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                  WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = p.oid AND d.deptype = 'e')
ORDER BY n.nspname, p.proname
LIMIT 1;

-- name: readonly_time_left
-- before each FETCH of a result after the first: the time the statement has left of its timeout
SELECT pg_catalog.set_config('statement_timeout', %(statement_ms)s, true);

-- name: readonly_measured_rows
-- A checked statement ({statement}, composed by the caller) with, first, the bytes of its rows so far as JSON (the
-- running sum of each row's values as PostgreSQL writes them as JSON, an array with ", " between them, and the ", "
-- before the row: what the result keeps of it, textsql/execute.py), then its columns only while that is at most the
-- byte limit ({max_bytes}), else NULLs. No FETCH brings much more than the limit, whatever rows come before: a
-- row's values, however wide (up to 1 GB), leave the server only when the rows so far with it fit. The statement's
-- rows keep their order (an ORDER BY keeps the statement a subquery scan; the window has no ORDER BY of its own,
-- so it sums them in that order, and a lateral join is a nested loop over it in that order), their names and their
-- types (the row is a whole-row value, (pgsynapse_row.*)::record, even when the statement has a column of that
-- name); the new line ends a comment the statement could end with.
SELECT pgsynapse_measured.bytes, pgsynapse_sent.*
FROM (
    SELECT (pgsynapse_row.*)::record AS pgsynapse_row,
           pg_catalog.sum(pgsynapse_size.bytes) OVER (ROWS UNBOUNDED PRECEDING) AS bytes
    FROM (
{statement}
    ) AS pgsynapse_row
    CROSS JOIN LATERAL (
        SELECT coalesce(pg_catalog.sum(pg_catalog.octet_length(pgsynapse_value.value::pg_catalog.text) + 2), 2) + 2
                   AS bytes
        FROM pg_catalog.json_each(pg_catalog.to_json(pgsynapse_row.*)) AS pgsynapse_value
    ) AS pgsynapse_size
) AS pgsynapse_measured
LEFT JOIN LATERAL (SELECT (pgsynapse_measured.pgsynapse_row).* WHERE pgsynapse_measured.bytes <= {max_bytes})
    AS pgsynapse_sent ON true;

-- name: type_names
SELECT oid::int, pg_catalog.format_type(oid, NULL) FROM pg_catalog.pg_type WHERE oid = ANY(%(oids)s);

-- name: reader_login
-- textsql/reader.py: who sql_reader_url logs in as, whether a superuser, whether a member of the reader role, and
-- the other roles it is a member of (a generated statement could SET ROLE to any of them)
SELECT r.rolname::text AS login, r.rolsuper AS superuser,
       EXISTS (SELECT FROM pg_catalog.pg_roles m WHERE m.rolname = %(role)s
               AND pg_catalog.pg_has_role(r.oid, m.oid, 'MEMBER')) AS member,
       ARRAY(SELECT m.rolname::text FROM pg_catalog.pg_roles m
             WHERE m.oid <> r.oid AND m.rolname <> %(role)s AND pg_catalog.pg_has_role(r.oid, m.oid, 'MEMBER')
             ORDER BY m.rolname) AS others
FROM pg_catalog.pg_roles r WHERE r.rolname = session_user;

-- name: reader_can_log_in
SELECT rolcanlogin AS can FROM pg_catalog.pg_roles WHERE rolname = %(role)s;

-- name: reader_set_password
-- `pgsynapse reader-login` (textsql/reader.py set_password): {} the role (an identifier), {} the SCRAM-SHA-256 verifier
-- computed by the client (a literal: ALTER ROLE takes no parameters), never the password itself
ALTER ROLE {} LOGIN PASSWORD {};

-- name: reader_allow_login
-- the embedded server (pgsynapse's own, reached only through its private socket): the reader role logs in itself,
-- so a statement cannot set its role back to the worker's (textsql/reader.py); {} is the role (an identifier)
ALTER ROLE {} LOGIN;

-- name: readonly_unreadable_tables
-- after a run refused for a privilege (SQLSTATE 42501): which of the statement's tables (schemas %(schemas)s, names
-- %(names)s, in pairs) the reader role may not read (no SELECT on it, or no USAGE on its schema). None: the refusal
-- was about something else (setting the role, a function), which no GRANT on a table fixes
SELECT pg_catalog.format('%%I.%%I', n.nspname, c.relname) AS name
FROM unnest(%(schemas)s::text[], %(names)s::text[]) AS t (schema_name, table_name)
JOIN pg_catalog.pg_namespace n ON n.nspname = t.schema_name
JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = t.table_name
WHERE NOT (pg_catalog.has_schema_privilege(%(role)s, n.oid, 'USAGE')
           AND pg_catalog.has_table_privilege(%(role)s, c.oid, 'SELECT'))
ORDER BY 1;

-- name: readonly_release_locks
-- after each run, its transaction rolled back: a session advisory lock a statement took (pg_advisory_lock) outlives
-- the rollback; the connection holds none of its own (execute.run_readonly)
SELECT pg_catalog.pg_advisory_unlock_all();
