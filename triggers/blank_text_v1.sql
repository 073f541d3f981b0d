-- blank text v1: a question, a data question or a guardrail rule whose text is nothing but white space (tabs and
-- line breaks too) is refused when it is written. The tables' CHECKs were length(btrim(text)) > 0, and btrim trims
-- spaces only; data questions had none. A trigger, not a CHECK: a CHECK (even NOT VALID) is checked on every new
-- version of a row, so a blank question from before this migration would refuse the status = 'failed' that its
-- job writes, and the job would retry for ever. This one fires only when a row is written with its text.
-- TG_ARGV: what the row is, in words; the constraint name the error carries.

CREATE OR REPLACE FUNCTION pgsynapse.blank_text_v1() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    -- called only for a blank text (the triggers' WHEN: a row of text costs no call)
    RAISE EXCEPTION '% needs text: the text written is empty or only white space (spaces, tabs, line breaks)',
        TG_ARGV[0]
        USING ERRCODE = 'check_violation', CONSTRAINT = TG_ARGV[1], TABLE = TG_TABLE_NAME, SCHEMA = TG_TABLE_SCHEMA;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.blank_text_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS blank_text ON pgsynapse.questions;
CREATE TRIGGER blank_text BEFORE INSERT OR UPDATE OF text ON pgsynapse.questions
    FOR EACH ROW WHEN (NEW.text !~ '[^[:space:]]') EXECUTE FUNCTION pgsynapse.blank_text_v1('a question', 'questions_text_not_empty');
DROP TRIGGER IF EXISTS blank_text ON pgsynapse.data_questions;
CREATE TRIGGER blank_text BEFORE INSERT OR UPDATE OF text ON pgsynapse.data_questions
    FOR EACH ROW WHEN (NEW.text !~ '[^[:space:]]') EXECUTE FUNCTION pgsynapse.blank_text_v1('a data question', 'data_questions_text_not_empty');
DROP TRIGGER IF EXISTS blank_text ON pgsynapse.guardrail_rules;
CREATE TRIGGER blank_text BEFORE INSERT OR UPDATE OF text ON pgsynapse.guardrail_rules
    FOR EACH ROW WHEN (NEW.text !~ '[^[:space:]]') EXECUTE FUNCTION pgsynapse.blank_text_v1('a guardrail rule', 'guardrail_text_not_empty');
