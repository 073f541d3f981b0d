-- pgsynapse 0036: documents embedded before identical chunk texts of one document were stored once (the embed's
-- duplicate_chunks_dropped) still have their duplicates: hundreds of identical vectors of one document trap the
-- HNSW search among them and hide every other document from search and answers. Each such document gets an embed
-- job, as an edit would queue; the worker cuts it again and stores each text once (the passages cut again
-- unchanged keep their ids). A document that already has a pending embed job keeps that one; re-running queues
-- nothing new while the jobs are pending, and nothing once the documents are embedded again.
-- The scan reads every chunk once (md5 of each text, not the texts, is what is sorted): on a very large corpus
-- this migration takes as long as one such query.
WITH duplicated AS (
    SELECT document_id FROM pgsynapse.chunks
    GROUP BY document_id
    HAVING count(*) > count(DISTINCT md5(text))
), queued AS (
    INSERT INTO pgsynapse.jobs (kind, ref_id)
    SELECT 'embed', document_id FROM duplicated
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING
    RETURNING 1
)
SELECT pgsynapse.wake_v1('embed', count(*)) FROM queued HAVING count(*) > 0;
