"""The safety check of generated SQL (textsql/safety.py), without a database: realistic analytics statements pass
with the tables they read, and every class of refusal is refused with its reason, also when the statement is built
to slip through (nested, quoted, hidden in a CTE, a cast or a window). The executor's tests run checked statements
as the read-only role against a real database."""

from __future__ import annotations

import pickle

import pytest

from pgsynapse.errors import InputError
from pgsynapse.textsql import safety
from pgsynapse.textsql.safety import ALLOWED_FUNCTIONS, MAX_SQL_CHARS, CheckedSQL, UnsafeSQL, check_sql

ALLOWED = {("public", "orders"), ("public", "customers"), ("public", "regions"), ("sales", "products")}
O, C, R, P = ("public", "orders"), ("public", "customers"), ("public", "regions"), ("sales", "products")


def check(sql: str, **kw) -> CheckedSQL:
    kw.setdefault("allowed", ALLOWED)
    return check_sql(sql, **kw)


def refused(sql: str, reason: str, **kw) -> str:
    with pytest.raises(UnsafeSQL) as info:
        check(sql, **kw)
    assert info.value.reason == reason, str(info.value)
    assert str(info.value).startswith("refused: ")
    return str(info.value)


# (statement, the tables it reads): Spider-like questions over an orders schema
REALISTIC = [
    ("SELECT count(*) FROM orders", {O}),
    ("SELECT r.name, count(*) AS late FROM orders o JOIN regions r ON r.id = o.region_id WHERE o.shipped_at > "
     "o.due_at AND o.created_at >= date_trunc('week', now()) - interval '1 week' GROUP BY r.name ORDER BY late DESC",
     {O, R}),
    ("SELECT customer_id, sum(amount) FROM orders GROUP BY customer_id HAVING sum(amount) > 100 ORDER BY 2 DESC "
     "LIMIT 10", {O}),
    ("SELECT name FROM customers WHERE id IN (SELECT customer_id FROM orders WHERE status = 'late')", {C, O}),
    ("SELECT name FROM customers c WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.id)", {C, O}),
    ("SELECT country FROM customers INTERSECT SELECT name FROM regions", {C, R}),
    ("SELECT id FROM customers EXCEPT SELECT customer_id FROM orders", {C, O}),
    ("(SELECT country FROM customers) UNION ALL (SELECT name FROM regions) ORDER BY 1", {C, R}),
    ("SELECT id, amount, rank() OVER (PARTITION BY region_id ORDER BY amount DESC) AS rk FROM orders", {O}),
    ("SELECT extract(year FROM created_at) AS y, count(*) FROM orders GROUP BY 1 ORDER BY 1", {O}),
    ("SELECT CASE WHEN amount > 100 THEN 'big' WHEN amount > 10 THEN 'medium' ELSE 'small' END AS size, count(*) "
     "FROM orders GROUP BY size", {O}),
    ("SELECT name FROM customers WHERE name LIKE 'A%' OR email ILIKE '%@example.com' OR name NOT SIMILAR TO 'x%'",
     {C}),
    ("SELECT avg(total) FROM (SELECT customer_id, sum(amount) AS total FROM orders GROUP BY customer_id) AS t", {O}),
    ("SELECT name, (SELECT count(*) FROM orders o WHERE o.customer_id = c.id) AS n FROM customers c", {C, O}),
    ("WITH late AS (SELECT * FROM orders WHERE shipped_at > due_at) SELECT region_id, count(*) FROM late GROUP BY "
     "region_id", {O}),
    ("WITH RECURSIVE days(d) AS (SELECT date '2024-01-01' UNION ALL SELECT d + 1 FROM days WHERE d < "
     "date '2024-01-31') SELECT d, count(o.id) FROM days LEFT JOIN orders o ON o.created_at::date = d GROUP BY d",
     {O}),
    ("SELECT g.day, count(o.id) FROM generate_series(date '2024-01-01', date '2024-01-31', interval '1 day') AS "
     "g(day) LEFT JOIN orders o ON date_trunc('day', o.created_at) = g.day GROUP BY g.day ORDER BY g.day", {O}),
    ("SELECT c.name, l.amount FROM customers c CROSS JOIN LATERAL (SELECT amount FROM orders o WHERE o.customer_id "
     "= c.id ORDER BY created_at DESC LIMIT 1) AS l", {C, O}),
    ("SELECT p.name, p.price FROM sales.products p ORDER BY p.price DESC NULLS LAST LIMIT 5", {P}),
    ("SELECT coalesce(email, 'none'), nullif(status, ''), greatest(amount, 0), least(amount, 100) FROM orders "
     "JOIN customers ON customers.id = orders.customer_id", {O, C}),
    ("SELECT upper(name), length(name), substring(name FROM 1 FOR 3), trim(both ' ' FROM name), "
     "split_part(email, '@', 2), concat_ws(' ', name, country), position('a' IN name) FROM customers", {C}),
    ("SELECT to_char(created_at, 'YYYY-MM') AS month, round(avg(amount)::numeric, 2) FROM orders GROUP BY month "
     "ORDER BY month", {O}),
    ("SELECT json_agg(json_build_object('id', id, 'amount', amount)), jsonb_agg(status) FROM orders", {O}),
    ("SELECT attributes ->> 'color' AS color, count(*) FROM sales.products WHERE attributes ? 'color' AND "
     "attributes @> '{\"size\": \"L\"}' GROUP BY 1", {P}),
    ("SELECT count(*) FILTER (WHERE status = 'late') * 100.0 / nullif(count(*), 0) FROM orders", {O}),
    ("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY amount), mode() WITHIN GROUP (ORDER BY status) FROM "
     "orders", {O}),
    ("SELECT DISTINCT ON (customer_id) customer_id, amount FROM orders ORDER BY customer_id, created_at DESC", {O}),
    ("SELECT * FROM (VALUES (1, 'a'), (2, 'b')) AS v(id, label)", set()),
    ("SELECT count(*) FROM orders WHERE amount BETWEEN 10 AND 20 AND status IN ('new', 'late') AND shipped_at IS "
     "NULL AND (paid IS NOT TRUE)", {O}),
    ("SELECT region_id, status, sum(amount), grouping(region_id) FROM orders GROUP BY ROLLUP (region_id, status)",
     {O}),
    ("SELECT created_at::date, sum(amount) OVER (ORDER BY created_at ROWS BETWEEN 6 PRECEDING AND CURRENT ROW), "
     "lag(amount) OVER w, first_value(amount) OVER w FROM orders WINDOW w AS (ORDER BY created_at)", {O}),
    ("SELECT name FROM customers WHERE age(now(), signed_up_at) > interval '1 year' AND signed_up_at < "
     "current_date - 30 AND signed_up_at AT TIME ZONE 'UTC' < localtimestamp", {C}),
    ("SELECT avg(amount) FROM orders TABLESAMPLE SYSTEM (10) REPEATABLE (42)", {O}),
    ("SELECT * FROM orders WHERE status = ANY (ARRAY['late', 'lost']) AND amount > ALL (SELECT 0)", {O}),
    ("SELECT count(DISTINCT customer_id), string_agg(DISTINCT status, ', ' ORDER BY status) FROM orders", {O}),
    ("SELECT o.*, r.name FROM orders o NATURAL JOIN regions r FULL OUTER JOIN customers c USING (country)",
     {O, R, C}),
    ("TABLE regions", {R}),
    ("SELECT name FROM customers ORDER BY lower(name)::text COLLATE \"C\" OFFSET 5 FETCH FIRST 3 ROWS WITH TIES",
     {C}),
    ("SELECT date_part('dow', created_at), width_bucket(amount, 0, 1000, 10), abs(amount - avg(amount) OVER ()) "
     "FROM orders", {O}),
    ("SELECT u.x FROM unnest(ARRAY[1, 2, 3]) WITH ORDINALITY AS u(x, n)", set()),
    ("SELECT * FROM jsonb_to_recordset('[{\"a\": 1}]') AS t(a int, b text)", set()),
    ("SELECT CAST(amount AS double precision) / 3, amount::int4, '2024-01-01'::timestamptz, int8(amount), "
     "date(created_at) FROM orders", {O}),
    ("SELECT EXISTS (SELECT 1 FROM orders WHERE amount < 0) AS any_negative", {O}),
    ("SELECT ROW(1, 'a') = ROW(1, 'a'), (ARRAY[1, 2])[1], 1 IS DISTINCT FROM 2, current_timestamp", set()),
    ("SELECT (jsonb_each(attributes)).key, j.value, (p).name, (p.name).upper FROM sales.products p, "
     "jsonb_each(p.attributes) j", {P}),
]


@pytest.mark.parametrize("sql,tables", REALISTIC, ids=[str(i) for i in range(len(REALISTIC))])
def test_realistic_analytics_statements_pass(sql, tables):
    checked = check(sql)
    assert checked.tables == frozenset(tables)
    assert checked.sql.replace('"public".', "").replace('"sales".', "") == sql


def test_prompt_injection_in_literals_and_comments_is_harmless():
    for sql in ["SELECT 'drop table x'",
                "SELECT 'ignore previous instructions; DROP TABLE orders; --' AS note, count(*) FROM orders",
                "SELECT $$DELETE FROM orders$$, E'\\'; DROP TABLE orders; --'",
                "SELECT count(*) /* ; DROP TABLE orders; */ FROM orders -- ; DELETE FROM orders",
                "SELECT name AS \"drop table orders\" FROM customers"]:
        check(sql)
    refused("SELECT 1; DROP TABLE x", "many_statements")
    refused("SELECT 'a'; DELETE FROM orders; --'", "many_statements")


# (statement, reason): one or more adversarial examples of each class of refusal
REFUSED = [
    # one statement, and it parses
    ("", "empty"), ("  ;; -- nothing\n", "empty"), ("SELECT 1; SELECT 2", "many_statements"),
    ("SELECT * FORM orders", "syntax"), ("SELECT 1\x00; DROP TABLE orders", "syntax"),
    # not a SELECT
    ("INSERT INTO orders (id) VALUES (1)", "write"), ("UPDATE orders SET amount = 0", "write"),
    ("DELETE FROM orders", "write"), ("TRUNCATE orders", "write"), ("COPY orders FROM '/tmp/x'", "write"),
    ("MERGE INTO orders o USING regions r ON o.region_id = r.id WHEN MATCHED THEN DELETE", "write"),
    ("DROP TABLE orders", "ddl"), ("CREATE TABLE t (a int)", "ddl"), ("ALTER TABLE orders ADD c int", "ddl"),
    ("CREATE TABLE t AS SELECT * FROM orders", "ddl"), ("CREATE FUNCTION f() RETURNS int AS 'select 1' "
                                                      "LANGUAGE sql", "ddl"),
    ("GRANT SELECT ON orders TO public", "ddl"), ("COMMENT ON TABLE orders IS 'drop table'", "ddl"),
    ("REFRESH MATERIALIZED VIEW v", "ddl"), ("COPY orders TO '/tmp/orders.csv'", "not_select"),
    ("COPY (SELECT 1) TO PROGRAM 'rm -rf /'", "not_select"), ("SET ROLE postgres", "not_select"),
    ("SET statement_timeout = 0", "not_select"), ("RESET ALL", "not_select"), ("SHOW search_path", "not_select"),
    ("CALL p()", "not_select"), ("DO $$BEGIN DELETE FROM orders; END$$", "not_select"),
    ("EXPLAIN SELECT 1", "not_select"), ("EXPLAIN ANALYZE DELETE FROM orders", "not_select"),
    ("LOCK TABLE orders", "not_select"), ("VACUUM orders", "not_select"), ("ANALYZE orders", "not_select"),
    ("LISTEN pgsynapse_jobs", "not_select"), ("NOTIFY pgsynapse_jobs", "not_select"),
    ("PREPARE p AS SELECT 1", "not_select"), ("EXECUTE p", "not_select"), ("LOAD 'evil'", "not_select"),
    ("DECLARE c CURSOR FOR SELECT * FROM orders", "not_select"), ("BEGIN", "not_select"),
    ("COMMIT", "not_select"), ("ROLLBACK", "not_select"), ("SAVEPOINT a", "not_select"),
    ("START TRANSACTION READ WRITE", "not_select"), ("CHECKPOINT", "not_select"),
    # a SELECT that writes or locks
    ("SELECT * INTO backup FROM orders", "select_into"),
    ("SELECT * FROM orders FOR UPDATE", "locking"), ("SELECT * FROM orders FOR SHARE SKIP LOCKED", "locking"),
    ("SELECT * FROM orders FOR KEY SHARE", "locking"), ("SELECT * FROM orders FOR NO KEY UPDATE NOWAIT", "locking"),
    ("SELECT * FROM (SELECT * FROM orders FOR UPDATE) s", "locking"),
    ("WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d", "write"),
    ("WITH a AS (SELECT 1), i AS (INSERT INTO orders (id) VALUES (1) RETURNING id) SELECT * FROM a", "write"),
    ("WITH u AS (UPDATE orders SET amount = 0 RETURNING 1) SELECT 1 UNION SELECT * FROM u", "write"),
    # tables
    ("SELECT * FROM salaries", "table"), ("SELECT * FROM public.salaries", "table"),
    ("SELECT * FROM secret.salaries", "schema"), ("SELECT * FROM orders, secret.salaries", "schema"),
    ("SELECT * FROM orders WHERE id IN (SELECT id FROM secret.salaries)", "schema"),
    ("SELECT (SELECT max(amount) FROM secret.salaries) FROM orders", "schema"),
    ("SELECT * FROM orders o JOIN LATERAL (SELECT * FROM secret.salaries s WHERE s.id = o.id) x ON true", "schema"),
    ("SELECT 1 UNION SELECT amount FROM secret.salaries", "schema"),
    ("SELECT * FROM orders ORDER BY (SELECT max(amount) FROM secret.salaries)", "schema"),
    ("SELECT count(*) OVER (PARTITION BY (SELECT 1 FROM secret.salaries LIMIT 1)) FROM orders", "schema"),
    ("SELECT * FROM secret.salaries TABLESAMPLE bernoulli (50)", "schema"),
    ("SELECT * FROM otherdb.public.orders", "table"),
    ("SELECT * FROM pg_class", "schema"), ("SELECT * FROM pg_catalog.pg_authid", "schema"),
    ("SELECT * FROM pg_shadow", "schema"), ("SELECT * FROM information_schema.tables", "schema"),
    ("SELECT * FROM pgsynapse.jobs", "schema"), ("SELECT * FROM pg_temp.orders", "schema"),
    ("SELECT * FROM pg_toast.pg_toast_1255", "schema"),
    # functions
    ("SELECT pg_read_file('/etc/passwd')", "function"), ("SELECT pg_catalog.pg_read_file('/etc/passwd')",
                                                        "function"),
    ("SELECT * FROM pg_ls_dir('.')", "function"), ("SELECT pg_sleep(10)", "function"),
    ("SELECT lo_import('/etc/passwd')", "function"), ("SELECT * FROM dblink('host=x', 'select 1') AS t(a int)",
                                                     "function"),
    ("SELECT current_setting('data_directory')", "function"), ("SELECT set_config('role', 'postgres', true)",
                                                             "function"),
    ("SELECT query_to_xml('select * from secret.salaries', true, true, '')", "function"),
    ("SELECT nextval('orders_id_seq')", "function"), ("SELECT setval('orders_id_seq', 1)", "function"),
    ("SELECT txid_current()", "function"), ("SELECT pg_advisory_lock(1)", "function"),
    ("SELECT pg_notify('pgsynapse_jobs', 'x')", "function"), ("SELECT pg_terminate_backend(1)", "function"),
    ("SELECT version()", "function"), ("SELECT current_user", "function"), ("SELECT session_user", "function"),
    ("SELECT current_schema", "function"), ("SELECT current_database()", "function"),
    ("SELECT has_table_privilege('secret.salaries', 'select')", "function"),
    ("SELECT public.evil(amount) FROM orders", "function"), ("SELECT evil(amount) FROM orders", "function"),
    ("SELECT sum(pg_column_size(o)) FROM orders o", "function"),
    ("SELECT * FROM orders ORDER BY pg_sleep(1)::text", "function"),
    ("SELECT * FROM orders GROUP BY id HAVING count(pg_sleep(1)) > 0", "function"),
    ("SELECT CAST(pg_read_file('x') AS int)", "function"),
    ("SELECT lag(amount) OVER (ORDER BY pg_backend_pid()) FROM orders", "function"),
    ("SELECT sum(amount) FILTER (WHERE pg_sleep(1) IS NULL) FROM orders", "function"),
    ("SELECT * FROM orders LIMIT (SELECT pg_sleep(1))::int", "function"),
    ("SELECT * FROM ROWS FROM (generate_series(1, 2), pg_ls_dir('.'))", "function"),
    ("WITH x AS (SELECT pg_read_file('x')) SELECT * FROM x", "function"),
    ("SELECT amount OPERATOR(secret.+) 1 FROM orders", "function"),
    ("SELECT * FROM orders ORDER BY amount USING OPERATOR(secret.<)", "function"),
    ("SELECT * FROM orders TABLESAMPLE evil_method (10)", "function"),
    ("SELECT xmlelement(name a, 'b')", "function"), ("SELECT xmlparse(document '<a/>')", "function"),
    ("SELECT * FROM XMLTABLE('/a' PASSING '<a/>' COLUMNS b int)", "function"),
    ("SELECT setseed(0.5)", "function"), ("SELECT system_user", "function"),
    ("SELECT collation for ('a')", "function"),
    # attribute notation: t.f and (expr).f call f(t) and f(expr) when f is no column
    ("SELECT o.pg_column_size FROM orders o", "function"), ("SELECT g.pg_sleep FROM generate_series(1, 3) g",
                                                           "function"),
    ("SELECT t.current_setting FROM unnest(ARRAY['data_directory']) t", "function"),
    ("SELECT g.pg_advisory_lock FROM generate_series(1, 1) g", "function"),
    ("SELECT (o.status).nextval FROM orders o", "function"), ("SELECT (c.email).ts_stat FROM customers c",
                                                             "function"),
    ("SELECT g.lo_get FROM generate_series(1, 9) g", "function"), ("SELECT (t.x).regclass FROM orders t",
                                                                  "function"),
    ("SELECT public.orders.pg_column_size FROM orders", "function"),
    # types that read the catalog
    ("SELECT 'secret.salaries'::regclass", "type"), ("SELECT CAST('pg_authid' AS pg_catalog.regclass)", "type"),
    ("SELECT 'now'::regproc", "type"), ("SELECT ARRAY['a']::regnamespace[]", "type"),
    ("SELECT * FROM orders WHERE tableoid = 16384", "system_column"),
    ("SELECT 'x=r/y'::aclitem", "type"), ("SELECT NULL::secret.salaries", "schema"),
    ("SELECT * FROM jsonb_to_recordset('[]') AS t(a regclass)", "type"),
    # system columns, parameters, others
    ("SELECT ctid, * FROM orders", "system_column"), ("SELECT o.xmin FROM orders o", "system_column"),
    ("SELECT count(*) FROM orders GROUP BY xmax", "system_column"),
    # (row).column reads a system column of the row's table as t.column does
    ("SELECT (o).ctid, (o).xmin FROM orders o", "system_column"),
    ("SELECT id FROM orders ORDER BY (orders.*).tableoid", "system_column"),
    ("SELECT * FROM orders WHERE id = $1", "parameter"),
    ("SELECT merge_action()", "unsupported"), ("SELECT 1 FROM orders WHERE amount = DEFAULT", "unsupported"),
]


@pytest.mark.parametrize("sql,reason", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_refusals(sql, reason):
    refused(sql, reason)


def test_unsafe_sql_is_an_input_error_with_a_specific_message():
    assert issubclass(UnsafeSQL, InputError)
    with pytest.raises(UnsafeSQL) as info:
        check("SELECT 1; SELECT 2")
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.reason, str(copy)) == ("many_statements", str(info.value))
    assert refused("DELETE FROM orders", "write") == "refused: the statement writes (DELETE)"
    assert refused("DROP TABLE orders", "ddl").endswith("(DROP TABLE)")
    assert refused("SELECT * FROM secret.salaries", "schema", allowed={O, R}) == (
        "refused: table secret.salaries is not allowed (allowed: public.orders, public.regions)")
    assert refused("SELECT pg_read_file('x')", "function") == "refused: function pg_read_file is not allowed"
    assert refused("SELECT * FROM pg_catalog.pg_authid", "schema") == (
        "refused: table pg_catalog.pg_authid is not allowed (system schema)")
    assert "WITH d" in refused("WITH d AS (DELETE FROM orders RETURNING *) SELECT 1", "write")
    assert "FOR UPDATE" in refused("SELECT * FROM orders FOR UPDATE", "locking")
    assert "FOR KEY SHARE" in refused("SELECT * FROM orders FOR KEY SHARE", "locking")
    assert "SET" in refused("SET ROLE postgres", "not_select")
    assert "EXPLAIN ANALYZE" in refused("EXPLAIN ANALYZE SELECT 1", "not_select")
    assert "at character" in refused("SELECT * FORM orders", "syntax")
    assert "2 statements" in refused("SELECT 1; SELECT 2;", "many_statements")
    assert "no table is allowed" in refused("SELECT * FROM orders", "table", allowed=())
    many = {("public", f"t{i:02}") for i in range(20)}
    assert refused("SELECT * FROM orders", "table", allowed=many).endswith("public.t07 and 12 more)")


def test_too_long_and_too_deep():
    filler = "SELECT 1 -- " + "x" * MAX_SQL_CHARS
    assert "at most 20,000" in refused(filler, "too_long")
    check("SELECT 1", max_chars=8)
    refused("SELECT 1 ", "too_long", max_chars=8)
    refused("SELECT " + "(" * 10_000 + "1" + ")" * 10_000, "syntax", max_chars=30_000)  # the parser's own limit
    # deeper than Python's recursion limit: the walk is iterative, and the check still sees the function
    deep = "SELECT 1" + " + 1" * 3000
    check(deep)
    refused(deep + " + pg_backend_pid()", "function")
    nested = "SELECT " + "coalesce(" * 1500 + "pg_backend_pid()" + ")" * 1500
    refused(nested, "function")


def test_cte_names_are_not_tables_only_inside_their_scope():
    # a CTE named like a forbidden table is that CTE, where it is in scope
    assert check("WITH salaries AS (SELECT 1 AS a) SELECT * FROM salaries").tables == frozenset()
    assert check("WITH pg_class AS (SELECT 1 AS a) SELECT * FROM pg_class").tables == frozenset()
    # ... a later CTE of a non-recursive WITH sees the earlier ones, not itself nor later ones
    assert check("WITH a AS (SELECT * FROM orders), b AS (SELECT * FROM a) SELECT * FROM b").tables == {O}
    refused("WITH salaries AS (SELECT * FROM salaries) SELECT * FROM salaries", "table")
    refused("WITH a AS (SELECT * FROM salaries), salaries AS (SELECT 1) SELECT * FROM a", "table")
    # ... with RECURSIVE every CTE of the list is in scope in each of them
    assert check("WITH RECURSIVE salaries(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM salaries WHERE n < 3) "
                 "SELECT * FROM salaries").tables == frozenset()
    assert check("WITH RECURSIVE a AS (SELECT * FROM salaries), salaries AS (SELECT 1) "
                 "SELECT * FROM a").tables == frozenset()
    # ... outside its scope the name is the table again
    refused("SELECT * FROM (WITH salaries AS (SELECT 1 AS a) SELECT * FROM salaries) s, salaries", "table")
    refused("(WITH salaries AS (SELECT 1 AS a) SELECT a FROM salaries) UNION SELECT a FROM salaries", "table")
    refused("SELECT (WITH salaries AS (SELECT 1) SELECT 1), (SELECT count(*) FROM salaries)", "table")
    # ... and an outer CTE is in scope in subqueries, set operations and later CTEs
    assert check("WITH salaries AS (SELECT 1 AS a) SELECT * FROM orders WHERE id IN (SELECT a FROM salaries) "
                 "UNION SELECT * FROM orders, LATERAL (SELECT a FROM salaries) s").tables == {O}
    # a qualified name never names a CTE
    refused("WITH salaries AS (SELECT 1) SELECT * FROM secret.salaries", "schema")
    # a CTE's own SEARCH/CYCLE clauses and body are checked too
    refused("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < pg_backend_pid()) "
            "CYCLE n SET is_cycle USING path SELECT * FROM t", "function")


def test_quoted_identifiers_match_the_catalog_name_exactly():
    mixed = {("public", "Orders"), ("Sales", "Products")}
    assert check('SELECT * FROM "Orders"', allowed=mixed).tables == {("public", "Orders")}
    assert check('SELECT * FROM public."Orders"', allowed=mixed).tables == {("public", "Orders")}
    assert check('SELECT * FROM "Sales"."Products"', allowed=mixed).tables == {("Sales", "Products")}
    refused("SELECT * FROM Orders", "table", allowed=mixed)  # folds to orders, another table
    refused("SELECT * FROM sales.products", "schema", allowed=mixed)
    assert 'public."Orders"' in refused('SELECT * FROM salaries', "table", allowed=mixed)
    lower = {("public", "orders")}
    assert check("SELECT * FROM ORDERS", allowed=lower).tables == {O}
    refused('SELECT * FROM "Orders"', "table", allowed=lower)
    refused('SELECT * FROM "orders "', "table", allowed=lower)
    refused('SELECT * FROM "pg_catalog"."pg_authid"', "schema", allowed=lower)


def test_search_path_resolution_and_qualified_text():
    two = {("sales", "products"), ("public", "products"), ("public", "orders")}
    assert check("SELECT * FROM products", allowed=two, search_path=("sales", "public")).tables == {P}
    assert check("SELECT * FROM products", allowed=two, search_path=("public", "sales")).tables == {
        ("public", "products")}
    # the first schema in which the name is allowed, and the text that runs names it
    got = check("SELECT * FROM orders JOIN products USING (id)", allowed=two, search_path=("sales", "public"))
    assert got.sql == 'SELECT * FROM "public".orders JOIN "sales".products USING (id)'
    refused("SELECT * FROM orders", "table", allowed=two, search_path=("sales",))
    # schemas named like keywords or with odd characters are quoted
    odd = {('my"schema', "t"), ("select", "u")}
    got = check("SELECT * FROM t, u", allowed=odd, search_path=('my"schema', "select"))
    assert got.sql == 'SELECT * FROM "my""schema".t, "select".u'
    assert got.tables == odd
    # an allowed table of a system schema stays refused, qualified or through the search_path
    refused("SELECT * FROM pg_authid", "schema", allowed={("pg_catalog", "pg_authid")},
            search_path=("pg_catalog",))
    refused("SELECT * FROM jobs", "schema", allowed={("pgsynapse", "jobs")}, search_path=("pgsynapse",))
    # a table named pg_something in an allowed schema is read when qualified (unqualified it is qualified too)
    assert check("SELECT * FROM public.pg_stats_daily", allowed={("public", "pg_stats_daily")}).tables == {
        ("public", "pg_stats_daily")}


def test_the_text_that_runs_is_the_statement_alone():
    got = check("  -- the model's comment\n/* a note */ SELECT o.id, 'é;' FROM orders o -- last\n ;  -- after\n")
    assert got.sql == "SELECT o.id, 'é;' FROM \"public\".orders o"
    assert check("SELECT 1;").sql == "SELECT 1"
    assert check("select\n  count(*)\nfrom\n  orders\n;;").sql == 'select\n  count(*)\nfrom\n  "public".orders'
    # no space before a quoted name: the inserted schema is quoted, so it cannot glue to the keyword
    assert check('SELECT * FROM"orders"').sql == 'SELECT * FROM"public"."orders"'
    assert check("SELECT orders.id FROM orders").sql == 'SELECT orders.id FROM "public".orders'
    assert check("SELECT '😀𝔘', \"ü😀\".id FROM orders AS \"ü😀\"").sql == (
        "SELECT '😀𝔘', \"ü😀\".id FROM \"public\".orders AS \"ü😀\"")
    # a column named like a function that takes no argument or several is a column
    assert check("SELECT o.version, o.lastval, o.format_type, o.setval FROM orders o").tables == {O}
    assert check("SELECT * FROM ONLY orders").sql == 'SELECT * FROM ONLY "public".orders'
    # qualified names and CTE references are left as written
    sql = "WITH o AS (SELECT * FROM public.orders) SELECT * FROM o JOIN sales.products p ON p.id = o.id"
    assert check(sql).sql == sql
    # the text that runs is itself accepted, unchanged, with the same tables
    for sql, tables in REALISTIC:
        once = check(sql)
        twice = check(once.sql)
        assert twice.sql == once.sql and twice.tables == once.tables


def test_the_allow_list_holds_no_dangerous_function():
    prefixes = ("pg_", "dblink", "lo_", "txid", "current_", "has_", "to_reg", "query_to", "table_to", "cursor_to",
                "schema_to", "database_to", "xml", "ts_stat")
    named = {"nextval", "currval", "lastval", "setval", "set_config", "setseed", "version", "obj_description"}
    bad = [f for f in ALLOWED_FUNCTIONS
           if f.startswith(prefixes) or f in named or any(w in f for w in ("file", "advisory", "sleep"))]
    assert bad == []
    assert {"count", "sum", "avg", "rank", "date_trunc", "extract", "to_char", "round",
            "jsonb_build_object", "generate_series", "unnest", "string_agg", "lower"} <= ALLOWED_FUNCTIONS


def test_the_text_that_runs_is_checked_again(monkeypatch):
    # the guard behind the in-place qualification: a text that would run with an unqualified table is refused
    monkeypatch.setattr(safety, "_qualify", lambda sql, start, end, refs: sql[start:end])
    refused("SELECT * FROM orders", "unsupported")
    monkeypatch.setattr(safety, "_qualify", lambda sql, start, end, refs: 'SELECT * FROM "public".regions')
    refused("SELECT * FROM orders", "unsupported")


@pytest.mark.parametrize("sql,hint", [
    ("SELECT month(o.shipped) FROM orders o",
     "month() is not PostgreSQL's (MySQL); PostgreSQL writes EXTRACT(MONTH FROM x)"),
    ("SELECT ifnull(o.total, 0) FROM orders o",
     "ifnull() is not PostgreSQL's (MySQL); PostgreSQL writes coalesce(x, y)"),
    ("SELECT group_concat(o.region) FROM orders o", "PostgreSQL writes string_agg(x, ',')"),
    ("SELECT strftime('%Y', o.shipped) FROM orders o",
     "strftime() is not PostgreSQL's (SQLite); PostgreSQL writes to_char(x, 'YYYY')"),
])
def test_another_databases_function_is_refused_naming_postgresqls(sql, hint):
    # small models write MySQL's or SQLite's functions: the refusal says what PostgreSQL calls it, so the reader
    # (and a fix turn) knows the statement was not PostgreSQL rather than forbidden
    message = refused(sql, "function")
    assert message.startswith(f"refused: function {sql.split('(')[0].split()[-1]} is not allowed: "), message
    assert hint in message, message
    assert all(name not in ALLOWED_FUNCTIONS for name in safety.OTHER_DIALECTS)  # never a hint for an allowed one
