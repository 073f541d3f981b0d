-- documents v3: the enqueue functions of v2 (insert, with its bulk path) and v1 (update), now SECURITY DEFINER
-- with a fixed search_path. They run with their owner's rights, so an application (role pgsynapse_app, migration
-- 0007) needs no privilege on pgsynapse.jobs: it writes documents, the trigger queues the job. Every name is
-- schema-qualified and pg_temp comes last, so nothing the caller creates can stand in for what they call.
-- documents_touch_v1 stays: it only edits NEW, so it needs no rights of its own and runs as the caller.

CREATE OR REPLACE FUNCTION pgsynapse.documents_enqueue_insert_v3() RETURNS trigger
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
        PERFORM pg_notify('pgsynapse_jobs', json_build_object('kind', 'embed', 'n', n)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.documents_enqueue_update_v3() RETURNS trigger
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
        PERFORM pg_notify('pgsynapse_jobs', json_build_object('kind', 'embed', 'n', n)::text);
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.documents_enqueue_insert_v3(), pgsynapse.documents_enqueue_update_v3() FROM PUBLIC;

DROP TRIGGER IF EXISTS documents_enqueue_insert ON pgsynapse.documents;
CREATE TRIGGER documents_enqueue_insert
    AFTER INSERT ON pgsynapse.documents
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.documents_enqueue_insert_v3();

DROP TRIGGER IF EXISTS documents_enqueue_update ON pgsynapse.documents;
CREATE TRIGGER documents_enqueue_update
    AFTER UPDATE ON pgsynapse.documents
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.documents_enqueue_update_v3();
