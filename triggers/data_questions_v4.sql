-- data questions v4: a correction that could never train is refused when it is written, and the retrain trigger
-- counts what trains. Before, sql_corrections took an approval of a question whose statement never ran (failed:
-- sql NULL; refused: a statement the check refused), a blank corrected_sql and a write such as 'DELETE FROM orders';
-- sql_corrections_enqueue_v2 counted each of them (and every correction of one question) towards
-- sql_retrain_min_corrections, and the retrain dropped them all.
--
-- sql_corrections_check_v1 (BEFORE, per row): corrected_sql must hold a statement that begins as a query does
-- (SELECT, WITH, VALUES, TABLE, or a parenthesis; comments before it aside); a full check (one statement, the
-- question's tables, plain functions) needs PostgreSQL's parser as the worker runs it: `pgsynapse sql-correct` does
-- it, and the retrain drops what fails it. An approval (corrected_sql NULL) needs an answered question. Existing
-- rows stay; only a write of these columns is checked (the retrain's UPDATE of trained_in_model is not).
--
-- sql_corrections_enqueue_v3: as v2, but counts the questions with an untrained correction that trains (a
-- statement that is not blank, or an approval of an answered question, given since the question was last asked):
-- one pair per question, as the retrain reads them (sql_training_pairs in src/pgsynapse/sql/textsql_models.sql).

CREATE OR REPLACE FUNCTION pgsynapse.sql_corrections_check_v1() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    rest text;
    before text;
    first_word text;
    question_status text;
BEGIN
    IF NEW.corrected_sql IS NOT NULL THEN
        IF NEW.corrected_sql !~ '[^[:space:]]' THEN
            RAISE EXCEPTION 'the correction of data question % has an empty statement: corrected_sql is empty or only '
                            'white space', NEW.question_id
                USING ERRCODE = 'check_violation', CONSTRAINT = 'sql_corrections_statement',
                      TABLE = TG_TABLE_NAME, SCHEMA = TG_TABLE_SCHEMA,
                      HINT = 'give the SELECT that answers the question, or approved = true with corrected_sql NULL '
                             'to approve the generated one';
        END IF;
        -- white space, parentheses and comments before the first word
        rest := NEW.corrected_sql;
        LOOP
            before := rest;
            rest := regexp_replace(rest, '^([[:space:](]+|--[^\n]*(\n|$)|/\*([^*]|\*+[^*/])*\*+/)', '');
            EXIT WHEN rest = before;
        END LOOP;
        first_word := lower(substring(rest FROM '^[[:alpha:]_]+'));
        IF first_word IS NULL OR first_word NOT IN ('select', 'with', 'values', 'table') THEN
            RAISE EXCEPTION 'the correction of data question % is not a SELECT: corrected_sql begins with %',
                NEW.question_id, CASE WHEN rest = '' THEN 'nothing but comments' ELSE quote_literal(left(rest, 20)) END
                USING ERRCODE = 'check_violation', CONSTRAINT = 'sql_corrections_statement',
                      TABLE = TG_TABLE_NAME, SCHEMA = TG_TABLE_SCHEMA,
                      HINT = 'a question is answered by one read-only SELECT, and the retrain drops any other '
                             'statement: give the SELECT that answers it';
        END IF;
    ELSIF NEW.approved THEN
        SELECT status INTO question_status FROM pgsynapse.data_questions WHERE id = NEW.question_id;
        IF FOUND AND question_status <> 'answered' THEN
            RAISE EXCEPTION 'data question % has no statement that ran to approve (it is %)', NEW.question_id,
                question_status
                USING ERRCODE = 'check_violation', CONSTRAINT = 'sql_corrections_approval',
                      TABLE = TG_TABLE_NAME, SCHEMA = TG_TABLE_SCHEMA,
                      HINT = 'give the right statement in corrected_sql';
        END IF;
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.sql_corrections_enqueue_v3() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    untrained bigint;
    threshold int;
BEGIN
    SELECT sql_retrain_min_corrections INTO threshold FROM pgsynapse.learning_settings;
    SELECT count(DISTINCT c.question_id) INTO untrained
    FROM pgsynapse.sql_corrections c
    JOIN pgsynapse.data_questions q ON q.id = c.question_id
    WHERE c.trained_in_model IS NULL AND c.created_at >= coalesce(q.asked_at, q.created_at)
      AND (c.corrected_sql ~ '[^[:space:]]' OR (c.corrected_sql IS NULL AND c.approved AND q.status = 'answered'));
    IF untrained >= coalesce(threshold, 50) THEN
        PERFORM pgsynapse.queue_one_v1('sql_retrain');  -- one at a time (triggers/feedback_v6.sql, migration 0032)
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.sql_corrections_check_v1(), pgsynapse.sql_corrections_enqueue_v3() FROM PUBLIC;

DROP TRIGGER IF EXISTS sql_corrections_check ON pgsynapse.sql_corrections;
CREATE TRIGGER sql_corrections_check
    BEFORE INSERT OR UPDATE OF question_id, corrected_sql, approved ON pgsynapse.sql_corrections
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.sql_corrections_check_v1();

DROP TRIGGER IF EXISTS sql_corrections_enqueue ON pgsynapse.sql_corrections;
CREATE TRIGGER sql_corrections_enqueue
    AFTER INSERT ON pgsynapse.sql_corrections
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.sql_corrections_enqueue_v3();
