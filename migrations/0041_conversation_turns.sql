-- pgsynapse 0041: a session's turns (pgsynapse.conversations) are its questions: a question deleted or moved to
-- another session (an UPDATE of session_id) is counted down where it was, and up where it went, in session_id
-- order (triggers/questions_v9.sql). The counts the deletes and moves before left wrong are recounted below; a
-- session with no question left loses its row. The triggers replaced above hold off the writes of questions until
-- this commits, so the recount is exact. And feedback with a rating off the scale is refused as that, whatever its
-- helpful says (triggers/feedback_consistent_v2.sql). The v1 and earlier functions stay for a release that still
-- calls them.
-- pgsynapse:include questions_v9.sql
-- pgsynapse:include feedback_consistent_v2.sql

DELETE FROM pgsynapse.conversations c
WHERE NOT EXISTS (SELECT FROM pgsynapse.questions q WHERE q.session_id = c.session_id);

INSERT INTO pgsynapse.conversations AS c (session_id, turns, created_at, last_turn_at)
SELECT session_id, count(*), min(created_at), max(coalesce(asked_at, created_at))
FROM pgsynapse.questions WHERE btrim(session_id) <> '' GROUP BY session_id ORDER BY session_id
ON CONFLICT (session_id) DO UPDATE SET turns = excluded.turns WHERE c.turns <> excluded.turns;
