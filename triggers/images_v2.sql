-- images v2: images_enqueue_insert_v1, images_enqueue_update_v1, unchanged but for the wake-up: they call pgsynapse.wake_v1
-- (migration 0018), which sends the NOTIFY unless pgsynapse.queue_settings.notify_on_enqueue is off (the
-- workers then poll: docs/scaling.md, NOTIFY). The triggers are re-pointed at the new functions.

CREATE OR REPLACE FUNCTION pgsynapse.images_enqueue_insert_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO pgsynapse.jobs (kind, ref_id)
    SELECT 'embed_image', id FROM new_rows
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pgsynapse.wake_v1('embed_image', n);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.images_enqueue_update_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO pgsynapse.jobs (kind, ref_id)
    SELECT 'embed_image', nr.id
    FROM new_rows nr JOIN old_rows o ON o.id = nr.id
    WHERE nr.content_hash IS DISTINCT FROM o.content_hash
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pgsynapse.wake_v1('embed_image', n);
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.images_enqueue_insert_v2(), pgsynapse.images_enqueue_update_v2() FROM PUBLIC;

DROP TRIGGER IF EXISTS images_enqueue_insert ON pgsynapse.images;
CREATE TRIGGER images_enqueue_insert
    AFTER INSERT ON pgsynapse.images
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.images_enqueue_insert_v2();

DROP TRIGGER IF EXISTS images_enqueue_update ON pgsynapse.images;
CREATE TRIGGER images_enqueue_update
    AFTER UPDATE ON pgsynapse.images
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.images_enqueue_update_v2();
