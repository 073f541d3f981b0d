-- documents v5: documents_enqueue_insert_v4, but a bulk INSERT whose first row's id is the key of a bulk job still
-- pending (ref_id = -id: the same rows deleted and loaded again before a worker took the first job) joins that job,
-- each row once. The statement failed on jobs_pending_dedup, and the application's load with it.
-- documents_enqueue_update_v4 is unchanged (triggers/documents_v4.sql).

CREATE OR REPLACE FUNCTION pgsynapse.documents_enqueue_insert_v5() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
    ids bigint[];
BEGIN
    SELECT array_agg(id) INTO ids FROM new_rows;
    n := coalesce(cardinality(ids), 0);
    IF n = 0 THEN
        RETURN NULL;
    END IF;
    IF n > pgsynapse.bulk_enqueue_rows() THEN
        INSERT INTO pgsynapse.jobs (kind, ref_id, ref_ids) VALUES ('embed', -ids[1], ids)
        ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO UPDATE
        SET ref_ids = ARRAY(SELECT DISTINCT u FROM unnest(jobs.ref_ids || excluded.ref_ids) AS u);
    ELSE
        INSERT INTO pgsynapse.jobs (kind, ref_id)
        SELECT 'embed', u FROM unnest(ids) AS u
        ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
    END IF;
    IF n > 0 THEN
        PERFORM pgsynapse.wake_v1('embed', n);
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.documents_enqueue_insert_v5() FROM PUBLIC;

DROP TRIGGER IF EXISTS documents_enqueue_insert ON pgsynapse.documents;
CREATE TRIGGER documents_enqueue_insert
    AFTER INSERT ON pgsynapse.documents
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.documents_enqueue_insert_v5();

DROP FUNCTION IF EXISTS pgsynapse.documents_enqueue_insert_v4();
