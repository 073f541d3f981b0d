-- truncated rows v1: a TRUNCATE of documents, questions, images or data questions (or one that cascades to them)
-- closes the failed jobs of its kind (done, skip_reason 'its row was deleted'), as a DELETE does (deleted_rows_v1):
-- a TRUNCATE fires no DELETE trigger, so `pgsynapse status` listed them as failed until `retry-failed` closed them.
-- After the TRUNCATE the table is empty, so every failed job of the kind had its row truncated. A pending job is left
-- to the worker, which finds its row gone, as after a DELETE (after TRUNCATE ... RESTART IDENTITY a new row of the
-- same id joins it: the INSERT's own job is deduplicated against it). The job kind is the trigger's argument; the
-- lookup is the partial index jobs_failed_ref (kind, ref_id) WHERE status = 'failed' (migration 0040).

CREATE OR REPLACE FUNCTION pgsynapse.close_failed_jobs_of_truncated_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    UPDATE pgsynapse.jobs
    SET status = 'done', finished_at = now(), lease_until = NULL, skip_reason = 'its row was deleted'
    WHERE kind = TG_ARGV[0] AND status = 'failed';
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.close_failed_jobs_of_truncated_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS documents_truncated_close_failed_jobs ON pgsynapse.documents;
CREATE TRIGGER documents_truncated_close_failed_jobs
    AFTER TRUNCATE ON pgsynapse.documents
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.close_failed_jobs_of_truncated_v1('embed');

DROP TRIGGER IF EXISTS questions_truncated_close_failed_jobs ON pgsynapse.questions;
CREATE TRIGGER questions_truncated_close_failed_jobs
    AFTER TRUNCATE ON pgsynapse.questions
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.close_failed_jobs_of_truncated_v1('answer');

DROP TRIGGER IF EXISTS images_truncated_close_failed_jobs ON pgsynapse.images;
CREATE TRIGGER images_truncated_close_failed_jobs
    AFTER TRUNCATE ON pgsynapse.images
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.close_failed_jobs_of_truncated_v1('embed_image');

DROP TRIGGER IF EXISTS data_questions_truncated_close_failed_jobs ON pgsynapse.data_questions;
CREATE TRIGGER data_questions_truncated_close_failed_jobs
    AFTER TRUNCATE ON pgsynapse.data_questions
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.close_failed_jobs_of_truncated_v1('sql_answer');
