-- The chaos suite's write audit (test instrumentation, never shipped): one row per chunk, embedding and answer
-- written, so a scenario counts writes per row. A unique constraint refuses a second row with the same key; it
-- cannot see a row deleted and written again (a job done twice), which this log does.
CREATE TABLE IF NOT EXISTS public.chaos_writes (
    what text NOT NULL,       -- chunk | embedding | answer
    key  text NOT NULL,       -- chunk: document/ord/content_hash; embedding: chunk/version; answer: question
    at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE OR REPLACE FUNCTION public.chaos_audit_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'chunks' THEN
        INSERT INTO public.chaos_writes (what, key)
        SELECT 'chunk', concat_ws('/', document_id, ord, content_hash) FROM new_rows;
    ELSE
        INSERT INTO public.chaos_writes (what, key)
        SELECT 'embedding', concat_ws('/', chunk_id, model_version_id) FROM new_rows;
    END IF;
    RETURN NULL;
END $$;

-- an answer is written when answered_at is set (each write sets it anew)
CREATE OR REPLACE FUNCTION public.chaos_audit_answer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.chaos_writes (what, key)
    SELECT 'answer', n.id::text FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE n.status = 'answered' AND n.answered_at IS DISTINCT FROM o.answered_at;
    RETURN NULL;
END $$;

-- an image vector: keyed by the image content it was computed from (a changed image is embedded again, legitimately)
CREATE OR REPLACE FUNCTION public.chaos_audit_image() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.chaos_writes (what, key)
    SELECT 'image_embedding', concat_ws('/', n.image_id, n.model_id, i.content_hash)
    FROM new_rows n JOIN pgsynapse.images i ON i.id = n.image_id;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER chaos_audit_image_embeddings AFTER INSERT ON pgsynapse.image_embeddings
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION public.chaos_audit_image();
CREATE OR REPLACE TRIGGER chaos_audit_chunks AFTER INSERT ON pgsynapse.chunks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION public.chaos_audit_insert();
CREATE OR REPLACE TRIGGER chaos_audit_embeddings AFTER INSERT ON pgsynapse.embeddings
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION public.chaos_audit_insert();
CREATE OR REPLACE TRIGGER chaos_audit_answers AFTER UPDATE ON pgsynapse.questions
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION public.chaos_audit_answer();
