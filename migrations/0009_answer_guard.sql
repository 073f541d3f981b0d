-- pgsynapse 0009: the answer's stale-write guard. An UPDATE of a question's text asks it again: the row goes back
-- to pending (answer cleared) and a new `answer` job is queued; a job still running on the old text finds another
-- text when it writes and is superseded (sql/answers.sql, write_answer), so an answer always answers the text
-- stored beside it.

-- pgsynapse:include questions_v3.sql
