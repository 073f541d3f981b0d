-- pgsynapse 0039: one definition of a question's verdict, which the A/B figures count: its latest feedback row
-- (by created_at, then id), helpful or a rating of 4 or 5, one per question (a user who clicks twice does not count
-- twice, so the rated questions are independent trials). Only feedback on the question's current answer, given
-- since it was last asked (asked_at, migration 0024; NULL: created_at): the rows from before an edit rated an
-- earlier answer, maybe another version's, to another text. Only questions a model version answered. learning.sql's
-- ab_report and ab_decisions and rankers.sql's ab_report_rankers each wrote it out before.
-- The DISTINCT ON list names, after question_id, the question's version and time (one value each per question: the
-- order within a question, and so the row kept, is created_at DESC, id DESC all the same): a filter on them
-- (ab_decisions' versions and window) is applied to the questions before the sort, as it was with the rule written
-- out, where on a column outside the list PostgreSQL would sort every feedback row first.
CREATE OR REPLACE VIEW pgsynapse.question_verdicts_v1 AS
SELECT DISTINCT ON (fb.question_id, qq.model_version_id, coalesce(qq.asked_at, qq.created_at))
       fb.question_id, qq.model_version_id AS version, coalesce(qq.asked_at, qq.created_at) AS asked, qq.ranker_id,
       coalesce(fb.helpful, fb.rating >= 4) AS helpful
FROM pgsynapse.feedback fb JOIN pgsynapse.questions qq ON qq.id = fb.question_id
WHERE qq.model_version_id IS NOT NULL AND fb.created_at >= coalesce(qq.asked_at, qq.created_at)
ORDER BY fb.question_id, qq.model_version_id, coalesce(qq.asked_at, qq.created_at), fb.created_at DESC, fb.id DESC;

GRANT SELECT ON pgsynapse.question_verdicts_v1 TO pgsynapse_app, pgsynapse_worker, pgsynapse_admin;
