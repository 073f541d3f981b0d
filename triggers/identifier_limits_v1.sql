-- identifier limits v1: a session id over 1,000 bytes (the Client's limit, results.MAX_SESSION_BYTES) or a
-- document source over 2,000 bytes is refused when it is written, saying so. Both columns are indexed: a value
-- that did not compress under the btree's 2,704 bytes failed with "index row size ... exceeds btree version 4
-- maximum 2704" (a limit nobody wrote), and one under it was stored. A trigger, not a CHECK: a CHECK (even NOT
-- VALID) is checked on every new version of a row, so a longer id stored before this migration would refuse the
-- answer its job writes. This fires only when the column is written. TG_ARGV: the column, its limit in bytes, the
-- constraint name the error carries.

CREATE OR REPLACE FUNCTION pgsynapse.identifier_limits_v1() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    size int;
BEGIN
    -- each branch is prepared when it first runs: NEW has the column of its own table only
    IF TG_ARGV[0] = 'source' THEN
        size := octet_length(NEW.source);
    ELSE
        size := octet_length(NEW.session_id);
    END IF;
    -- called only for a value over the limit (the triggers' WHEN: a row within it costs no call)
    RAISE EXCEPTION '%.% is % bytes long (UTF-8): at most %', TG_TABLE_NAME, TG_ARGV[0],
        to_char(size, 'FM999,999,999,999'), to_char(TG_ARGV[1]::int, 'FM999,999,999')
        USING ERRCODE = 'check_violation', CONSTRAINT = TG_ARGV[2], TABLE = TG_TABLE_NAME, SCHEMA = TG_TABLE_SCHEMA,
              HINT = 'use a shorter value, or a hash of this one';
END $$;

REVOKE ALL ON FUNCTION pgsynapse.identifier_limits_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS session_id_length ON pgsynapse.questions;
CREATE TRIGGER session_id_length BEFORE INSERT OR UPDATE OF session_id ON pgsynapse.questions
    FOR EACH ROW WHEN (octet_length(NEW.session_id) > 1000) EXECUTE FUNCTION pgsynapse.identifier_limits_v1('session_id', '1000', 'questions_session_id_length');
DROP TRIGGER IF EXISTS session_id_length ON pgsynapse.data_questions;
CREATE TRIGGER session_id_length BEFORE INSERT OR UPDATE OF session_id ON pgsynapse.data_questions
    FOR EACH ROW WHEN (octet_length(NEW.session_id) > 1000) EXECUTE FUNCTION pgsynapse.identifier_limits_v1('session_id', '1000', 'data_questions_session_id_length');
DROP TRIGGER IF EXISTS source_length ON pgsynapse.documents;
CREATE TRIGGER source_length BEFORE INSERT OR UPDATE OF source ON pgsynapse.documents
    FOR EACH ROW WHEN (octet_length(NEW.source) > 2000) EXECUTE FUNCTION pgsynapse.identifier_limits_v1('source', '2000', 'documents_source_length');
