-- pgsynapse 0022: a blank session_id ('' or spaces) is no session. The answer and SQL handlers read it as none
-- (a question with session_id '' was every other such question's follow-up, across users); the questions trigger
-- no longer counts it as a conversation, and the row it made before is dropped (pgsynapse keeps that table).
-- pgsynapse:include questions_v7.sql

DELETE FROM pgsynapse.conversations WHERE btrim(session_id) = '';
