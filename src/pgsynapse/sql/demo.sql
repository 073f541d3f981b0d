-- Named queries of `pgsynapse demo` (pgsynapse/demo.py). Loaded by pgsynapse.queries.q(name, "demo.sql").

-- name: demo_shop
-- the data question's table: created once, readable by the role generated SQL runs as (docs/operations.md)
CREATE SCHEMA IF NOT EXISTS demo_shop;
CREATE TABLE IF NOT EXISTS demo_shop.orders (
    id int PRIMARY KEY, region text NOT NULL, customer text NOT NULL, total numeric(10, 2) NOT NULL,
    ordered date NOT NULL, shipped date);
COMMENT ON TABLE demo_shop.orders IS 'customer orders';
COMMENT ON COLUMN demo_shop.orders.shipped IS 'NULL until the order ships';
INSERT INTO demo_shop.orders
SELECT g, (ARRAY['north', 'south', 'east', 'west'])[1 + g % 10 % 4], 'customer ' || (1 + g % 17), 10 + (g * 37) % 290,
       date '2026-10-01' + g % 60, CASE WHEN g % 7 <> 0 THEN date '2026-10-01' + g % 60 + 1 + g % 5 END
FROM generate_series(1, 200) g
ON CONFLICT DO NOTHING;
GRANT USAGE ON SCHEMA demo_shop TO pgsynapse_reader;
GRANT SELECT ON demo_shop.orders TO pgsynapse_reader;

-- name: demo_data_check
-- the data question's answer written by hand (one line: the demo prints it)
SELECT region, count(*) FROM demo_shop.orders WHERE shipped IS NOT NULL GROUP BY region ORDER BY 2 DESC, 1;

-- name: demo_insert_document
-- a page of the demo, unless that source already holds the same text (the demo runs again on the same database)
INSERT INTO pgsynapse.documents (source, title, body)
SELECT %(source)s, %(title)s, %(body)s
WHERE NOT EXISTS (SELECT 1 FROM pgsynapse.documents WHERE source = %(source)s
                  AND content_hash = md5(coalesce(%(title)s, '') || chr(30) || coalesce(%(body)s, '')));

-- name: demo_active_model
SELECT name, runtime, metrics FROM pgsynapse.model_versions WHERE status = 'active';

-- name: demo_embedded
SELECT count(*) FILTER (WHERE status <> 'pending') AS done, count(*) AS total,
       count(*) FILTER (WHERE status = 'failed') AS failed
FROM pgsynapse.documents WHERE source = ANY(%(sources)s);

-- name: demo_chunks
SELECT count(DISTINCT c.id) AS chunks
FROM pgsynapse.chunks c JOIN pgsynapse.documents d ON d.id = c.document_id
WHERE d.source = ANY(%(sources)s);
