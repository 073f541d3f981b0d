-- compose's reader-login step (docker/compose.yaml), after `migrate` made the role: pgsynapse_reader logs in itself,
-- with the password psql is given (-v reader_password=...: SQL_READER_PASSWORD), and the worker runs generated
-- statements on that login (its sql_reader_url), where none can set its role back to the worker's
-- (docs/text-to-sql.md, "The reader's own login"). Each `docker compose up` runs it again: the password follows
-- SQL_READER_PASSWORD.
ALTER ROLE pgsynapse_reader LOGIN PASSWORD :'reader_password';
