"""Scale, tables at size (issue 21; run through bench/scale.py ``--part queue`` / ``--part vectors``).

* ``queue``: ``done`` finished jobs (half of them past a one-day retention) and ``pending`` due ones in
  ``pgsynapse.jobs``: the fill rate, the claim plan and claim latency at that size, the retention's cost (the
  worker's ``prune_done_jobs``, 10,000 rows a statement), then a churn of jobs claimed and completed with
  autovacuum off (the state before autovacuum reaches a large table: its default threshold is 20 % of the rows)
  and the same after a VACUUM: table and index sizes, dead tuples, claim latency.
* ``vectors``: ``n`` 384-d vectors of one version (synthetic, with a low-dimensional structure: ``_vectors``): the HNSW
  build's time and size (m 16, ef_construction 64, as pgsynapse builds it), kNN p50/p99 and recall@10 (against
  exact search) at ef_search 40/100/200, and retiring a version of ``n / 2`` rows from one table (DELETE, then
  the VACUUM that a retire's DELETE needs) against a table partitioned by version (DROP of its partition).
"""

from __future__ import annotations

import time

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from bench.common import emit, pct
from pgsynapse.queries import q

DIM = 384
CLAIM = {"kind": "embed", "limit": 32, "worker": "bench", "lease": 60}


def ms(values: list[float], p: float) -> float:
    """The ``p``th percentile of ``values`` (seconds) in milliseconds; 0 for none."""
    return round(pct(values, p) * 1000, 2) if values else 0.0


def _claim_latency(conn: psycopg.Connection, rounds: int) -> list[float]:
    """``rounds`` claims of 32 each completed at once, one connection: the seconds of each claim."""
    out = []
    for _ in range(rounds):
        s = time.perf_counter()
        with conn.transaction():
            ids = [r[0] for r in conn.execute(q("claim_jobs"), CLAIM).fetchall()]
        out.append(time.perf_counter() - s)
        with conn.transaction():
            conn.execute(q("complete_jobs"), {"ids": ids, "worker": "bench"})
    return out


def _sizes(conn: psycopg.Connection) -> dict[str, float]:
    row = conn.execute(
        "SELECT pg_relation_size('pgsynapse.jobs') / 1048576.0, pg_relation_size('pgsynapse.jobs_claim') / 1048576.0,"
        " pg_relation_size('pgsynapse.jobs_pending_dedup') / 1048576.0, pg_indexes_size('pgsynapse.jobs') / 1048576.0,"
        " (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'pgsynapse.jobs'::regclass)").fetchone()
    return {"heap_mb": round(row[0], 1), "claim_index_mb": round(row[1], 2), "dedup_index_mb": round(row[2], 2),
            "all_indexes_mb": round(row[3], 1), "dead_tuples": row[4]}


def _churn_state(conn: psycopg.Connection) -> dict[str, float]:
    """Sizes, dead tuples and the claim's p50 over 100 claims, now."""
    return {**_sizes(conn), "claim_p50_ms": ms(_claim_latency(conn, 100), 50)}


def queue(url: str, done: int, pending: int) -> None:
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        conn.execute("ALTER TABLE pgsynapse.jobs SET (autovacuum_enabled = false)")  # each phase vacuums itself
        s = time.perf_counter()
        for start in range(1, done + 1, 1_000_000):
            # finished over the last two days, one row per 17 ms: the older half is past a one-day retention
            conn.execute(
                "INSERT INTO pgsynapse.jobs (kind, ref_id, status, attempts, completions, created_at, started_at,"
                " finished_at) SELECT 'embed', g, 'done', 1, 1, t, t, t FROM generate_series(%s::bigint, %s::bigint) g,"
                " LATERAL (SELECT now() - interval '2 days' + (g * 172800.0 / %s) * interval '1 second') AS x(t)",
                (start, min(done, start + 999_999), done))
        conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id) SELECT 'embed', g FROM generate_series(%s::bigint, %s::bigint) g",
                     (done + 1, done + pending))
        fill = time.perf_counter() - s
        conn.execute("VACUUM ANALYZE pgsynapse.jobs")
        emit("scale", "queue_fill", done=done, pending=pending, seconds=round(fill, 1),
             rows_per_s=round((done + pending) / fill), **_sizes(conn))

        with conn.transaction():
            plan = [r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + q("claim_jobs"), CLAIM)]
            raise psycopg.Rollback()  # the plan's claim is not kept
        lat = _claim_latency(conn, 300)
        emit("scale", "queue_claim", done=done, pending=pending, claim_p50_ms=ms(lat, 50), claim_p99_ms=ms(lat, 99),
             plan=" | ".join(line.strip() for line in plan if "Scan" in line or "Execution" in line))

        # retention: the worker's own statement, 10,000 rows each, until a statement deletes fewer
        s, removed, statements, slowest = time.perf_counter(), 0, 0, 0.0
        while True:
            t = time.perf_counter()
            n = conn.execute(q("prune_done_jobs"), {"retention": 86_400, "limit": 10_000}).rowcount
            slowest = max(slowest, time.perf_counter() - t)
            removed, statements = removed + n, statements + 1
            if n < 10_000:
                break
        prune = time.perf_counter() - s
        emit("scale", "queue_retention", removed=removed, statements=statements, seconds=round(prune, 1),
             rows_per_s=round(removed / prune) if prune else 0, slowest_statement_ms=round(slowest * 1000, 1))

        # churn: new jobs queued, claimed and completed, no vacuum in between (as before autovacuum comes)
        conn.execute("VACUUM ANALYZE pgsynapse.jobs")
        before = _churn_state(conn)
        churn = min(pending, 200_000)
        s = time.perf_counter()
        base = done + pending + 1
        for start in range(0, churn, 10_000):
            conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id) SELECT 'embed', g FROM generate_series(%s::bigint, %s::bigint) g",
                         (base + start, base + start + 9_999))
            with conn.transaction():
                ids = [r[0] for r in conn.execute(q("claim_jobs"), {**CLAIM, "limit": 10_000}).fetchall()]
                conn.execute(q("complete_jobs"), {"ids": ids, "worker": "bench"})
        churn_s = time.perf_counter() - s
        after = _churn_state(conn)
        s = time.perf_counter()
        conn.execute("VACUUM pgsynapse.jobs")
        vacuum_s = time.perf_counter() - s
        vacuumed = _churn_state(conn)
        conn.execute("ALTER TABLE pgsynapse.jobs RESET (autovacuum_enabled)")
        for name, figures in (("before", before), ("after_churn", after), ("after_vacuum", vacuumed)):
            emit("scale", "queue_churn", state=name, churned_jobs=churn, churn_s=round(churn_s, 1),
                 vacuum_s=round(vacuum_s, 1) if name == "after_vacuum" else "", **figures)


def _vectors(n: int, seed: int) -> np.ndarray:
    """Unit vectors with structure, as embeddings have: a 24-d latent (mixed from 200 topics) spread into 384-d by
    one fixed random map, plus a little noise. (Isotropic noise around centres, tried first, makes every point of a
    cluster about as near as any other: a recall of 0.2 at any ef_search, which says nothing about real data.)"""
    rng, fixed = np.random.default_rng(seed), np.random.default_rng(1234)
    topics = fixed.standard_normal((200, 24)).astype(np.float32)
    spread = fixed.standard_normal((24, DIM)).astype(np.float32)
    z = topics[rng.integers(0, 200, n)] + 0.5 * rng.standard_normal((n, 24)).astype(np.float32)
    x = z @ spread + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _load(conn: psycopg.Connection, table: str, version: int, data: np.ndarray, first_id: int) -> None:
    with conn.cursor().copy(f"COPY {table} (version, id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["int4", "int8", "vector"])
        for i, v in enumerate(data):
            copy.write_row((version, first_id + i, v))


def vectors(url: str, n: int) -> None:
    data = _vectors(n, 0)
    queries = _vectors(200, 1)
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        register_vector(conn)
        conn.execute("SET maintenance_work_mem = '4GB'")
        conn.execute(f"CREATE TABLE bench_vec (version int NOT NULL, id bigint NOT NULL, embedding vector({DIM}) NOT NULL)")
        s = time.perf_counter()
        _load(conn, "bench_vec", 1, data, 0)
        load_s = time.perf_counter() - s
        conn.execute("VACUUM ANALYZE bench_vec")
        s = time.perf_counter()
        conn.execute("CREATE INDEX bench_vec_hnsw ON bench_vec USING hnsw (embedding vector_cosine_ops)"
                     " WITH (m = 16, ef_construction = 64)")
        build_s = time.perf_counter() - s
        size = conn.execute("SELECT pg_relation_size('bench_vec_hnsw') / 1048576.0, pg_relation_size('bench_vec') / 1048576.0").fetchone()
        workers = conn.execute("SHOW max_parallel_maintenance_workers").fetchone()[0]
        emit("scale", "vectors_build", vectors=n, load_s=round(load_s, 1), build_s=round(build_s, 1),
             vectors_per_s=round(n / build_s), index_mb=round(size[0]), table_mb=round(size[1]),
             parallel_workers=workers)
        exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]
        for ef in (40, 100, 200):
            conn.execute(f"SET hnsw.ef_search = {ef}")
            lat, hits = [], 0
            for qi, v in enumerate(queries):
                s = time.perf_counter()
                ids = [r[0] for r in conn.execute(
                    "SELECT id FROM bench_vec ORDER BY embedding <=> %s LIMIT 10", (v,)).fetchall()]
                lat.append(time.perf_counter() - s)
                hits += len(set(ids) & set(exact[qi].tolist()))
            emit("scale", "vectors_search", vectors=n, ef_search=ef, p50_ms=ms(lat, 50), p99_ms=ms(lat, 99),
                 recall_at_10=round(hits / (10 * len(queries)), 3))
        conn.execute("RESET hnsw.ef_search")

        # retire a version of n/2 rows: one table with a partial index per version (as pgsynapse.embeddings) ...
        half = n // 2
        conn.execute("DROP TABLE bench_vec")
        conn.execute(f"CREATE TABLE bench_flat (version int NOT NULL, id bigint NOT NULL, embedding vector({DIM}) NOT NULL,"
                     " PRIMARY KEY (version, id))")
        _load(conn, "bench_flat", 1, data[:half], 0)
        _load(conn, "bench_flat", 2, data[half:], half)
        for v in (1, 2):
            conn.execute(f"CREATE INDEX bench_flat_hnsw_v{v} ON bench_flat USING hnsw (embedding vector_cosine_ops)"
                         f" WHERE version = {v}")
        conn.execute("VACUUM ANALYZE bench_flat")
        s = time.perf_counter()
        conn.execute("DROP INDEX bench_flat_hnsw_v1")
        conn.execute("DELETE FROM bench_flat WHERE version = 1")
        delete_s = time.perf_counter() - s
        s = time.perf_counter()
        conn.execute("VACUUM bench_flat")
        vacuum_s = time.perf_counter() - s
        emit("scale", "vectors_retire", layout="one table, partial index per version", rows=half,
             seconds=round(delete_s + vacuum_s, 2), delete_s=round(delete_s, 2), vacuum_s=round(vacuum_s, 2),
             heap_mb_after=round(conn.execute("SELECT pg_relation_size('bench_flat') / 1048576.0").fetchone()[0]))
        conn.execute("DROP TABLE bench_flat")
        # ... and partitioned by version
        conn.execute(f"CREATE TABLE bench_part (version int NOT NULL, id bigint NOT NULL, embedding vector({DIM}) NOT NULL,"
                     " PRIMARY KEY (version, id)) PARTITION BY LIST (version)")
        for v in (1, 2):
            conn.execute(f"CREATE TABLE bench_part_v{v} PARTITION OF bench_part FOR VALUES IN ({v})")
        _load(conn, "bench_part", 1, data[:half], 0)
        _load(conn, "bench_part", 2, data[half:], half)
        for v in (1, 2):
            conn.execute(f"CREATE INDEX ON bench_part_v{v} USING hnsw (embedding vector_cosine_ops)")
        s = time.perf_counter()
        conn.execute("DROP TABLE bench_part_v1")
        drop_s = time.perf_counter() - s
        emit("scale", "vectors_retire", layout="partitioned by version", rows=half, seconds=round(drop_s, 2),
             delete_s=round(drop_s, 2), vacuum_s=0.0,
             heap_mb_after=round(conn.execute("SELECT pg_relation_size('bench_part_v2') / 1048576.0").fetchone()[0]))
        conn.execute("DROP TABLE bench_part")
