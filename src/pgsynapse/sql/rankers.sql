-- The ranker trainer's reads (pgsynapse.ranking.train): the same examples and chunks the retrain job reads. The
-- registry's own queries (pgsynapse.ranker_models) are side_models.sql's, run by pgsynapse.sideregistry.

-- name: ranker_examples
-- feedback's training examples, oldest first: the question and the chunk its helpful page was marked by
SELECT te.query, te.positive_chunk_id
FROM pgsynapse.training_examples te
JOIN pgsynapse.chunks c ON c.id = te.positive_chunk_id
ORDER BY te.created_at, te.id;

-- name: ranker_chunks
SELECT c.id, c.document_id, d.title, c.text
FROM pgsynapse.chunks c
JOIN pgsynapse.documents d ON d.id = c.document_id
ORDER BY c.id;

-- name: ranker_documents
-- the documents with chunks, for the corpus pairs (titles, headings, parameter entries)
SELECT id, coalesce(title, ''), coalesce(body, '')
FROM pgsynapse.documents
WHERE EXISTS (SELECT 1 FROM pgsynapse.chunks c WHERE c.document_id = documents.id);

-- name: ranker_vectors
SELECT chunk_id, embedding::text
FROM pgsynapse.embeddings
WHERE model_version_id = %(version)s;
