-- pgsynapse 0044: a TRUNCATE of questions (or one that cascades to them) leaves no session in
-- pgsynapse.conversations: it fires no DELETE trigger, so every session kept its turns though no question was left
-- (triggers/questions_v10.sql). The counts the truncates before left wrong are recounted below, as 0041 did: a
-- session with no question left loses its row. The lock taken below holds off the writes of questions until this
-- commits, so the recount is exact. Idempotent.
-- pgsynapse:include questions_v10.sql

LOCK TABLE pgsynapse.questions IN SHARE ROW EXCLUSIVE MODE;

DELETE FROM pgsynapse.conversations c
WHERE NOT EXISTS (SELECT FROM pgsynapse.questions q WHERE q.session_id = c.session_id);

INSERT INTO pgsynapse.conversations AS c (session_id, turns, created_at, last_turn_at)
SELECT session_id, count(*), min(created_at), max(coalesce(asked_at, created_at))
FROM pgsynapse.questions WHERE btrim(session_id) <> '' GROUP BY session_id ORDER BY session_id
ON CONFLICT (session_id) DO UPDATE SET turns = excluded.turns WHERE c.turns <> excluded.turns;
