-- Named queries of the retrain gate's canary set (migration 0012). Loaded by q(name, "canary.sql").

-- name: lock_canary
-- one builder at a time (two workers' first retrains): the second waits, then finds the set built
LOCK TABLE pgsynapse.canary_questions IN SHARE ROW EXCLUSIVE MODE;

-- name: canary_exists
-- built: the set has questions; rebuilt: an operator has rebuilt it (`pgsynapse canary rebuild`: a canary_rebuilt
-- model event), so an empty set was asked for (--size 0, or a corpus that gave none) and no retrain builds one
SELECT EXISTS (SELECT 1 FROM pgsynapse.canary_questions) AS built,
       EXISTS (SELECT 1 FROM pgsynapse.model_events WHERE event = 'canary_rebuilt') AS rebuilt;

-- name: last_canary_rebuild
SELECT figures, at FROM pgsynapse.model_events WHERE event = 'canary_rebuilt' ORDER BY at DESC, id DESC LIMIT 1;

-- name: canary_sources
-- the documents a canary set may be built from: all of them (the trainer scores the questions whose document has
-- chunks, so one still being embedded counts once it is)
SELECT d.id, coalesce(d.source, '') AS source, coalesce(d.title, '') AS title, coalesce(d.body, '') AS body
FROM pgsynapse.documents d
ORDER BY d.id;

-- name: insert_canary
INSERT INTO pgsynapse.canary_questions (question, document_id, origin, frozen_with_version)
VALUES (%(question)s, %(document_id)s, %(origin)s, %(version)s);

-- name: delete_canary
DELETE FROM pgsynapse.canary_questions;

-- name: canary_questions
-- what the trainer scores (and whose documents its corpus pairs leave out)
SELECT question, document_id FROM pgsynapse.canary_questions ORDER BY id;

-- name: canary_summary
SELECT origin, count(*) AS n, min(frozen_with_version) AS version, min(created_at) AS created_at
FROM pgsynapse.canary_questions GROUP BY origin ORDER BY origin;
