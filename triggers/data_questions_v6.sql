-- data questions v6: a correction of a blocked data question (a guardrail rule matched it: no statement was
-- generated, data_questions_v5.sql) is refused when it is written, as `pgsynapse sql-correct` refuses it: it would
-- teach the model to answer what the rule blocks. Before, sql_corrections took one (a statement, or an approval:
-- "it is blocked" was the only refusal), and sql_corrections_enqueue_v3 counted it towards
-- sql_retrain_min_corrections, while the retrain dropped it (no schema context).
--
-- sql_corrections_check_v2: v1 (triggers/data_questions_v4.sql), and no correction of a blocked question.
-- sql_corrections_enqueue_v4: v3, without the questions that are blocked (a correction written before this
-- migration stays, and does not count). The v1 and v3 functions stay for a release that still calls them.

CREATE OR REPLACE FUNCTION pgsynapse.sql_corrections_check_v2() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    rest text;
    before text;
    first_word text;
    question_status text;
BEGIN
    SELECT status INTO question_status FROM pgsynapse.data_questions WHERE id = NEW.question_id;
    IF question_status = 'blocked' THEN
        RAISE EXCEPTION 'data question % was blocked by a guardrail rule: a correction would teach the model to '
                        'answer what the rule blocks', NEW.question_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'sql_corrections_blocked',
                  TABLE = TG_TABLE_NAME, SCHEMA = TG_TABLE_SCHEMA,
                  HINT = 'if the rule is wrong, change it (pgsynapse guardrail set or disable) and ask the question '
                         'again';
    END IF;
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
        IF question_status <> 'answered' THEN
            RAISE EXCEPTION 'data question % has no statement that ran to approve (it is %)', NEW.question_id,
                question_status
                USING ERRCODE = 'check_violation', CONSTRAINT = 'sql_corrections_approval',
                      TABLE = TG_TABLE_NAME, SCHEMA = TG_TABLE_SCHEMA,
                      HINT = 'give the right statement in corrected_sql';
        END IF;
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION pgsynapse.sql_corrections_enqueue_v4() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    untrained bigint;
    threshold int;
BEGIN
    SELECT sql_retrain_min_corrections INTO threshold FROM pgsynapse.learning_settings;
    SELECT count(DISTINCT c.question_id) INTO untrained
    FROM pgsynapse.sql_corrections c
    JOIN pgsynapse.data_questions q ON q.id = c.question_id
    WHERE c.trained_in_model IS NULL AND c.created_at >= coalesce(q.asked_at, q.created_at) AND q.status <> 'blocked'
      AND (c.corrected_sql ~ '[^[:space:]]' OR (c.corrected_sql IS NULL AND c.approved AND q.status = 'answered'));
    IF untrained >= coalesce(threshold, 50) THEN
        PERFORM pgsynapse.queue_one_v1('sql_retrain');  -- one at a time (triggers/feedback_v6.sql, migration 0032)
    END IF;
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.sql_corrections_check_v2(), pgsynapse.sql_corrections_enqueue_v4() FROM PUBLIC;

DROP TRIGGER IF EXISTS sql_corrections_check ON pgsynapse.sql_corrections;
CREATE TRIGGER sql_corrections_check
    BEFORE INSERT OR UPDATE OF question_id, corrected_sql, approved ON pgsynapse.sql_corrections
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.sql_corrections_check_v2();

DROP TRIGGER IF EXISTS sql_corrections_enqueue ON pgsynapse.sql_corrections;
CREATE TRIGGER sql_corrections_enqueue
    AFTER INSERT ON pgsynapse.sql_corrections
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.sql_corrections_enqueue_v4();
