-- pgsynapse 0038: one definition of which model versions serve traffic. The active version, and a candidate that
-- is fully backfilled (backfilled_at), has a traffic share and is on its serving runtime (not runtime_pending:
-- migration 0013). answers.sql's routable_versions (the answer path's routing), and learning.sql's ab_in_progress,
-- ab_decisions and lock_candidate (the A/B test's candidates: the routed ones) each wrote it out before.
-- LANGUAGE sql, one expression, IMMUTABLE (it reads its argument alone), neither STRICT nor SECURITY DEFINER: the
-- planner inlines it, so the queries that call it keep the plans they had with the rule written out.
CREATE OR REPLACE FUNCTION pgsynapse.version_routed_v1(v pgsynapse.model_versions) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT v.status = 'active'
        OR (v.status = 'candidate' AND v.backfilled_at IS NOT NULL AND v.traffic_percent > 0 AND NOT v.runtime_pending)
$$;
REVOKE ALL ON FUNCTION pgsynapse.version_routed_v1(pgsynapse.model_versions) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgsynapse.version_routed_v1(pgsynapse.model_versions)
    TO pgsynapse_app, pgsynapse_worker, pgsynapse_admin;
