-- documents v4: documents_enqueue_insert_v3, documents_enqueue_update_v3, unchanged but for the wake-up: they call pgsynapse.wake_v1
-- (migration 0018), which sends the NOTIFY unless pgsynapse.queue_settings.notify_on_enqueue is off (the
-- workers then poll: docs/scaling.md, NOTIFY). The triggers are re-pointed at the new functions.

CREATE OR REPLACE FUNCTION pgsynapse.documents_enqueue_insert_v4() RETURNS trigger
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
        INSERT INTO pgsynapse.jobs (kind, ref_id, ref_ids) VALUES ('embed', -ids[1], ids);
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

CREATE OR REPLACE FUNCTION pgsynapse.documents_enqueue_update_v4() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO pgsynapse.jobs (kind, ref_id)
    SELECT 'embed', nr.id
    FROM new_rows nr JOIN old_rows o ON o.id = nr.id
    WHERE nr.content_hash IS DISTINCT FROM o.content_hash
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pgsynapse.wake_v1('embed', n);
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.documents_enqueue_insert_v4(), pgsynapse.documents_enqueue_update_v4() FROM PUBLIC;

DROP TRIGGER IF EXISTS documents_enqueue_insert ON pgsynapse.documents;
CREATE TRIGGER documents_enqueue_insert
    AFTER INSERT ON pgsynapse.documents
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.documents_enqueue_insert_v4();

DROP TRIGGER IF EXISTS documents_enqueue_update ON pgsynapse.documents;
CREATE TRIGGER documents_enqueue_update
    AFTER UPDATE ON pgsynapse.documents
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.documents_enqueue_update_v4();
