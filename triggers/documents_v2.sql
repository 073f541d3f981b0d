-- documents v2: the INSERT trigger of v1, plus a bulk path. A statement inserting more than
-- pgsynapse.bulk_enqueue_rows() rows records ONE job carrying every new id (ref_ids) instead of one job per
-- row, so a bulk load pays one row in the queue, not one per document (trigger overhead, issue 8). The worker
-- expands it into per-row jobs in its own short transaction before computing (listener/worker.py).
-- A bulk job's ref_id is minus its first id: unique among pending jobs, never a real document id.

CREATE OR REPLACE FUNCTION pgsynapse.bulk_enqueue_rows() RETURNS bigint LANGUAGE sql IMMUTABLE AS 'SELECT 10000::bigint';

CREATE OR REPLACE FUNCTION pgsynapse.documents_enqueue_insert_v2() RETURNS trigger LANGUAGE plpgsql AS $$
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

DROP TRIGGER IF EXISTS documents_enqueue_insert ON pgsynapse.documents;
CREATE TRIGGER documents_enqueue_insert
    AFTER INSERT ON pgsynapse.documents
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.documents_enqueue_insert_v2();
