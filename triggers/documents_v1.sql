-- documents: enqueue one `embed` job per inserted row or per row whose embedded text changed,
-- deduplicated among pending jobs, and wake the worker with one NOTIFY per statement.

CREATE FUNCTION pgsynapse.documents_enqueue_insert_v1() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO pgsynapse.jobs (kind, ref_id)
    SELECT 'embed', id FROM new_rows
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('pgsynapse_jobs', json_build_object('kind', 'embed', 'n', n)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION pgsynapse.documents_enqueue_update_v1() RETURNS trigger LANGUAGE plpgsql AS $$
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

-- a changed text puts the row back to pending; updated_at follows every change
CREATE FUNCTION pgsynapse.documents_touch_v1() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.title IS DISTINCT FROM OLD.title OR NEW.body IS DISTINCT FROM OLD.body THEN
        NEW.status := 'pending';
        NEW.error := NULL;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER documents_enqueue_insert
    AFTER INSERT ON pgsynapse.documents
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.documents_enqueue_insert_v1();

CREATE TRIGGER documents_enqueue_update
    AFTER UPDATE ON pgsynapse.documents
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.documents_enqueue_update_v1();

CREATE TRIGGER documents_touch
    BEFORE UPDATE OF title, body ON pgsynapse.documents
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.documents_touch_v1();
