-- Named queries of `pgsynapse model export` and the worker's export of a version to the serving runtime
-- (pgsynapse/export/register.py). Loaded by pgsynapse.queries.q(name, "export.sql").

-- name: export_source
-- the version to export: %(version)s, or the active one when it is NULL
SELECT * FROM pgsynapse.model_versions
WHERE CASE WHEN %(version)s::int IS NULL THEN status = 'active' ELSE id = %(version)s::int END;

-- name: switch_runtime
-- the version itself moves to the exported runtime (its vectors are interchangeable: agreement passed); the torch
-- runtime and weights it is switched from are kept in its metrics (previous_*: what a rebuild on another host and
-- a retrain start from), also when an exported version is switched again (they still name the torch weights)
UPDATE pgsynapse.model_versions
SET runtime = %(runtime)s, artifact_path = %(path)s,
    metrics = metrics || CASE WHEN runtime = 'torch'
                              THEN jsonb_build_object('previous_runtime', runtime, 'previous_artifact_path', artifact_path)
                              ELSE '{}'::jsonb END
              || %(metrics)s::jsonb
WHERE id = %(id)s;

-- name: register_export
-- the export as a version of its own, side by side with its source: a candidate without traffic
INSERT INTO pgsynapse.model_versions (name, kind, base_version_id, artifact_path, runtime, dim, metrics, status,
                                      traffic_percent)
VALUES (%(name)s, 'embedding', %(base)s, %(path)s, %(runtime)s, %(dim)s, %(metrics)s::jsonb, 'candidate', 0)
RETURNING id;

-- name: export_lock
-- a transaction lock held for the whole export (one transaction): one worker exports a version, the others wait
-- and find it done; a transaction pooler keeps it on one server connection, and it ends with the transaction
-- (it holds back no VACUUM: it writes only at its end, and its statements leave no portal or snapshot behind)
SELECT pg_advisory_xact_lock(hashtext(%(lock)s));

-- name: export_idle_unbounded
-- the export's transaction waits on its client while it computes (minutes at a first start): a server-wide
-- idle_in_transaction_session_timeout shorter than that must not end it (its client gone ends it all the same)
SELECT set_config('idle_in_transaction_session_timeout', '0', true);

-- name: export_name
-- `pgsynapse model export --switch`'s connection named by the version it exports, once read (pgsynapse/db.py,
-- export_command_name): `pgsynapse status` reads it in pg_stat_activity; for its transaction only (a pooler's server
-- connection is named as its next client says)
SELECT set_config('application_name', %(name)s, true);

-- name: export_try_lock
-- the export lock at once, if no other worker holds it (else the caller says it waits, then takes export_lock)
SELECT pg_try_advisory_xact_lock(hashtext(%(lock)s)) AS locked;

-- name: record_export
UPDATE pgsynapse.model_versions
SET metrics = metrics || jsonb_build_object('runtime_export', %(record)s::jsonb)
WHERE id = %(version)s;

-- name: runtime_settled
-- the version may get A/B traffic now, on the runtime that will serve it
UPDATE pgsynapse.model_versions SET runtime_pending = false WHERE id = %(version)s;
