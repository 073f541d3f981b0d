-- pgsynapse 0013: the model registry's history, and candidates that wait for their runtime (issue 23, items 4, 5).
--
-- model_events: one row per change of a version's state or runtime, by a person (`pgsynapse promote`, `rollback`,
-- `retire`, `traffic`; actor 'cli') or by a worker (actor: its id). event is one of
--   promoted, rolled_back, retired, traffic_set                      (the registry commands)
--   auto_promoted, auto_rolled_back                                  (the worker's A/B decision, figures: the test)
--   runtime_switched, runtime_export_refused, runtime_export_failed  (the export to the configured runtime)
-- figures holds what the decision saw (A/B counts, z, p, alpha; or the export's agreement).
--
-- model_versions.runtime_pending: a version registered by the retrain job waits with it set until a worker has
-- exported it to its configured runtime (onnx-int8 by default) or recorded why it stays on torch; a candidate gets
-- no A/B traffic and cannot be promoted meanwhile, so the A/B test measures the runtime that ships and a promotion
-- needs no switch. Versions registered otherwise (and every version already there) are not pending.

CREATE TABLE IF NOT EXISTS pgsynapse.model_events (
    id               bigserial PRIMARY KEY,
    model_version_id int NOT NULL REFERENCES pgsynapse.model_versions (id) ON DELETE CASCADE,
    event            text NOT NULL,
    reason           text NOT NULL DEFAULT '',
    figures          jsonb NOT NULL DEFAULT '{}',
    actor            text,
    at               timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS model_events_version ON pgsynapse.model_events (model_version_id, at);
CREATE INDEX IF NOT EXISTS model_events_at ON pgsynapse.model_events (at);

ALTER TABLE pgsynapse.model_versions ADD COLUMN IF NOT EXISTS runtime_pending boolean NOT NULL DEFAULT false;

-- the registry commands (admin) and the worker write events; 0007's default privileges cover a table created by
-- the same owner, named here as well for a database migrated by another role since
GRANT SELECT, INSERT, UPDATE, DELETE ON pgsynapse.model_events TO pgsynapse_worker, pgsynapse_admin;
GRANT USAGE, SELECT ON SEQUENCE pgsynapse.model_events_id_seq TO pgsynapse_worker, pgsynapse_admin;
