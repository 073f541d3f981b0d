-- answer_cache v1: a cached answer dies with the content it cites. AFTER, per statement, on pgsynapse.documents:
-- an UPDATE that changes a document's content (content_hash: title or body) and a DELETE remove every answer cache
-- entry citing that document. SECURITY DEFINER with a fixed search_path: an application (pgsynapse_app) edits and
-- deletes documents without any privilege on the answer cache. A cache entry written concurrently (its answer
-- computed from the old content) is caught at lookup time instead: its stored content_hash differs.

CREATE OR REPLACE FUNCTION pgsynapse.answer_cache_invalidate_update_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    changed bigint[];
BEGIN
    SELECT array_agg(nr.id) INTO changed
    FROM new_rows nr JOIN old_rows o ON o.id = nr.id
    WHERE nr.content_hash IS DISTINCT FROM o.content_hash;
    IF changed IS NOT NULL THEN
        DELETE FROM pgsynapse.answer_cache WHERE document_ids && changed;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.answer_cache_invalidate_delete_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    DELETE FROM pgsynapse.answer_cache WHERE document_ids && (SELECT array_agg(id) FROM old_rows);
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.answer_cache_invalidate_update_v1(), pgsynapse.answer_cache_invalidate_delete_v1()
    FROM PUBLIC;

DROP TRIGGER IF EXISTS documents_answer_cache_update ON pgsynapse.documents;
CREATE TRIGGER documents_answer_cache_update
    AFTER UPDATE ON pgsynapse.documents
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.answer_cache_invalidate_update_v1();

DROP TRIGGER IF EXISTS documents_answer_cache_delete ON pgsynapse.documents;
CREATE TRIGGER documents_answer_cache_delete
    AFTER DELETE ON pgsynapse.documents
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.answer_cache_invalidate_delete_v1();
