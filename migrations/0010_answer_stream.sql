-- pgsynapse 0010: generated answers, streamed and checked (issue 18, item 3).
-- questions.flags records what the answer's checks found, e.g. 'invalid_citations: [7] cited, passages 1, 2, 3, 4, 5
-- given' (flagged, or 'refused' too under citation_policy = refuse) or 'uncited'; empty when nothing was found.
-- While a generator writes, the row stays 'pending' with the text so far in `answer` (a 'streaming' NOTIFY on
-- pgsynapse_answers per write: docs/sql.md). Migration 0011's questions v5 clears flags (and cached_from) when an
-- edit asks a question again.

ALTER TABLE pgsynapse.questions ADD COLUMN IF NOT EXISTS flags text[] NOT NULL DEFAULT '{}';
