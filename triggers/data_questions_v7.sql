-- data questions v7: the check of sql_corrections says what `pgsynapse sql-correct` says for the same refusal
-- (textsql/cli.py): an approval of a question that did not run said "data question 5 has no statement that ran to
-- approve (it is failed)", and a correction of a blocked one did not name its rule.
--
-- sql_corrections_check_v3: v2 (triggers/data_questions_v6.sql) with sql-correct's words: why the question has no
-- statement to approve (pending, refused, failed when it ran, or none could be made), and the rule that blocked it.
-- v2 stays for a release that still calls it. sql_corrections_enqueue_v4 (v6) is unchanged.

CREATE OR REPLACE FUNCTION pgsynapse.sql_corrections_check_v3() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
DECLARE
    rest text;
    before text;
    first_word text;
    question_status text;
    question_sql text;
    rule_id text;
BEGIN
    SELECT status, sql, guardrail ->> 'rule_id' INTO question_status, question_sql, rule_id
    FROM pgsynapse.data_questions WHERE id = NEW.question_id;
    IF question_status = 'blocked' THEN
        RAISE EXCEPTION 'data question % was blocked by %, so no statement was generated: a correction would teach '
                        'the model to answer what the rule blocks', NEW.question_id,
                        coalesce('guardrail rule ' || rule_id, 'a guardrail rule')
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
            RAISE EXCEPTION 'data question % cannot be approved: %, and an approval keeps a statement that ran as the '
                            'right answer to train on', NEW.question_id,
                CASE WHEN question_status = 'pending' THEN 'it is not answered yet (pending)'
                     WHEN question_status = 'refused' THEN 'its statement was refused by the safety check and never '
                                                          'ran (status refused, its error says why)'
                     WHEN question_sql IS NOT NULL THEN 'its statement failed when it ran (status failed, its error '
                                                        'says why)'
                     ELSE 'no statement could be made for it (status failed, its error says why)' END
                USING ERRCODE = 'check_violation', CONSTRAINT = 'sql_corrections_approval',
                      TABLE = TG_TABLE_NAME, SCHEMA = TG_TABLE_SCHEMA,
                      HINT = 'give the right statement in corrected_sql';
        END IF;
    END IF;
    RETURN NEW;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.sql_corrections_check_v3() FROM PUBLIC;

DROP TRIGGER IF EXISTS sql_corrections_check ON pgsynapse.sql_corrections;
CREATE TRIGGER sql_corrections_check
    BEFORE INSERT OR UPDATE OF question_id, corrected_sql, approved ON pgsynapse.sql_corrections
    FOR EACH ROW EXECUTE FUNCTION pgsynapse.sql_corrections_check_v3();
