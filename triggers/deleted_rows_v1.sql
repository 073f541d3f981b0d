-- deleted rows v1: a DELETE of documents, questions, images or data questions closes the failed jobs of the rows it
-- deleted (done, skip_reason 'its row was deleted'): nothing is left for them to do, and `pgsynapse status` listed
-- them as failed ("embed 1 InputError: ...") until `retry-failed` closed them. A pending job of a deleted row is left
-- to the worker, which finds its row gone (and a running one finishes as such). The job kind is the trigger's
-- argument. The lookup is the partial index jobs_failed_ref (kind, ref_id) WHERE status = 'failed' (migration 0040).

CREATE OR REPLACE FUNCTION pgsynapse.close_failed_jobs_of_deleted_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    UPDATE pgsynapse.jobs
    SET status = 'done', finished_at = now(), lease_until = NULL, skip_reason = 'its row was deleted'
    WHERE kind = TG_ARGV[0] AND status = 'failed' AND ref_id = ANY (ARRAY(SELECT id FROM old_rows));
    RETURN NULL;
END $$;

REVOKE ALL ON FUNCTION pgsynapse.close_failed_jobs_of_deleted_v1() FROM PUBLIC;

DROP TRIGGER IF EXISTS documents_close_failed_jobs ON pgsynapse.documents;
CREATE TRIGGER documents_close_failed_jobs
    AFTER DELETE ON pgsynapse.documents
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.close_failed_jobs_of_deleted_v1('embed');

DROP TRIGGER IF EXISTS questions_close_failed_jobs ON pgsynapse.questions;
CREATE TRIGGER questions_close_failed_jobs
    AFTER DELETE ON pgsynapse.questions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.close_failed_jobs_of_deleted_v1('answer');

DROP TRIGGER IF EXISTS images_close_failed_jobs ON pgsynapse.images;
CREATE TRIGGER images_close_failed_jobs
    AFTER DELETE ON pgsynapse.images
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.close_failed_jobs_of_deleted_v1('embed_image');

DROP TRIGGER IF EXISTS data_questions_close_failed_jobs ON pgsynapse.data_questions;
CREATE TRIGGER data_questions_close_failed_jobs
    AFTER DELETE ON pgsynapse.data_questions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.close_failed_jobs_of_deleted_v1('sql_answer');
