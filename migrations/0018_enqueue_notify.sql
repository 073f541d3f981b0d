-- pgsynapse 0018: a switch for the enqueue triggers' NOTIFY (issue 21; bench/scale.py --part writes).
-- PostgreSQL serialises every commit that has sent a NOTIFY on one lock, held through the commit's WAL flush: with
-- 8 connections inserting one row per transaction the triggers' NOTIFY halves the commits per second (2,623 against
-- 4,791 with the same job insert and no NOTIFY) and at 32 it cuts them by 58 %. With notify_on_enqueue off the
-- triggers still queue every job but send no NOTIFY; the workers (enqueue_notify = false) then wake by polling every
-- quiet_poll_interval instead. Nothing can be lost either way: the job row is the durable record, the NOTIFY only
-- a wake-up. The default stays on (wake-ups in milliseconds, no polling).
CREATE TABLE IF NOT EXISTS pgsynapse.queue_settings (
    one               boolean PRIMARY KEY DEFAULT true CHECK (one),
    notify_on_enqueue boolean NOT NULL DEFAULT true
);
INSERT INTO pgsynapse.queue_settings DEFAULT VALUES ON CONFLICT DO NOTHING;
GRANT SELECT ON pgsynapse.queue_settings TO pgsynapse_worker, pgsynapse_admin;
GRANT UPDATE (notify_on_enqueue) ON pgsynapse.queue_settings TO pgsynapse_worker, pgsynapse_admin;

-- the one place an enqueue trigger wakes the workers: runs with its owner's rights (the table above is not the
-- application's to read), as every caller is an enqueue trigger that does too
CREATE OR REPLACE FUNCTION pgsynapse.wake_v1(kind text, n bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    IF coalesce((SELECT notify_on_enqueue FROM pgsynapse.queue_settings), true) THEN
        PERFORM pg_notify('pgsynapse_jobs', json_build_object('kind', kind, 'n', n)::text);
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgsynapse.wake_v1(text, bigint) FROM PUBLIC;

-- pgsynapse:include documents_v4.sql
-- pgsynapse:include questions_v6.sql
-- pgsynapse:include feedback_v3.sql
-- pgsynapse:include images_v2.sql
-- pgsynapse:include data_questions_v2.sql
