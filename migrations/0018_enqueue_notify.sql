-- pgsynapse 0018: a switch for the enqueue triggers' NOTIFY (issue 21; bench/scale.py --part writes).
-- PostgreSQL serialises every commit that has sent a NOTIFY on one lock, held through the commit's WAL flush: with
-- 8 connections inserting one row per transaction the triggers' NOTIFY cuts the commits per second by 54 % (2,924
-- against 6,367 with the same job insert and no NOTIFY), with 32 by 54 % too (2,747 against 5,937; BENCHMARKS.md).
-- With notify_on_enqueue off (`pgsynapse queue-notify off`) the triggers still queue every job but send no NOTIFY;
-- idle workers then find jobs by polling every quiet_poll_interval instead. Nothing can be lost either way: the job row is the durable record, the NOTIFY only
-- a wake-up. The default stays on (wake-ups in milliseconds, no polling).
CREATE TABLE IF NOT EXISTS pgsynapse.queue_settings (
    one               boolean PRIMARY KEY DEFAULT true CHECK (one),
    notify_on_enqueue boolean NOT NULL DEFAULT true
);
INSERT INTO pgsynapse.queue_settings DEFAULT VALUES ON CONFLICT DO NOTHING;
GRANT SELECT ON pgsynapse.queue_settings TO pgsynapse_worker, pgsynapse_admin;
GRANT UPDATE (notify_on_enqueue) ON pgsynapse.queue_settings TO pgsynapse_worker, pgsynapse_admin;

-- the one place an enqueue trigger wakes the workers. Its only callers are the enqueue trigger functions, which run
-- with their owner's rights and a fixed search_path (SECURITY DEFINER ... SET search_path): this one needs neither
-- of its own (PUBLIC may not call it), and without them a call costs less (no search_path switch per statement)
CREATE OR REPLACE FUNCTION pgsynapse.wake_v1(kind text, n bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce((SELECT s.notify_on_enqueue FROM pgsynapse.queue_settings s), true) THEN
        PERFORM pg_catalog.pg_notify('pgsynapse_jobs', json_build_object('kind', kind, 'n', n)::text);
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgsynapse.wake_v1(text, bigint) FROM PUBLIC;

-- pgsynapse:include documents_v4.sql
-- pgsynapse:include questions_v6.sql
-- pgsynapse:include feedback_v3.sql
-- pgsynapse:include images_v2.sql
-- pgsynapse:include data_questions_v2.sql
