-- answer_cache v2: answer_cache v1 (triggers/answer_cache_v1.sql), but the entries citing a changed or deleted
-- document are locked in question_id order before they are deleted, as an answer write locks the entries it stores,
-- forgets or counts hits on (src/pgsynapse/sql/answer_cache.sql, lock_entries). The DELETE took them in the order it
-- found them: an edit that locked entry z, then waited for y, held by a write that then waited for z, was aborted
-- as a deadlock, and the application's UPDATE or DELETE with it.

CREATE OR REPLACE FUNCTION pgsynapse.answer_cache_forget_v2(changed bigint[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    PERFORM 1 FROM pgsynapse.answer_cache WHERE document_ids && changed ORDER BY question_id FOR UPDATE;
    DELETE FROM pgsynapse.answer_cache WHERE document_ids && changed;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.answer_cache_invalidate_update_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    changed bigint[];
BEGIN
    SELECT array_agg(nr.id) INTO changed
    FROM new_rows nr JOIN old_rows o ON o.id = nr.id
    WHERE nr.content_hash IS DISTINCT FROM o.content_hash;
    IF changed IS NOT NULL THEN
        PERFORM pgsynapse.answer_cache_forget_v2(changed);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.answer_cache_invalidate_delete_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    PERFORM pgsynapse.answer_cache_forget_v2((SELECT array_agg(id) FROM old_rows));
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.answer_cache_forget_v2(bigint[]), pgsynapse.answer_cache_invalidate_update_v2(),
    pgsynapse.answer_cache_invalidate_delete_v2() FROM PUBLIC;

DROP TRIGGER IF EXISTS documents_answer_cache_update ON pgsynapse.documents;
CREATE TRIGGER documents_answer_cache_update
    AFTER UPDATE ON pgsynapse.documents
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.answer_cache_invalidate_update_v2();

DROP TRIGGER IF EXISTS documents_answer_cache_delete ON pgsynapse.documents;
CREATE TRIGGER documents_answer_cache_delete
    AFTER DELETE ON pgsynapse.documents
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.answer_cache_invalidate_delete_v2();
