"""Scale, tables at size (issue 21; run through bench/scale.py ``--part queue`` / ``--part vectors``).

* ``queue``: ``done`` finished jobs (half of them past a one-day retention) and ``pending`` due ones in
  ``pgsynapse.jobs``: the fill rate, the claim plan and claim latency at that size, the retention's cost (the
  worker's housekeeping ``prune_done_jobs``, 10,000 rows a statement), then a churn of jobs claimed and completed with
  autovacuum off (the state before autovacuum reaches a large table: its default threshold is 20 % of the rows)
  and the same after a VACUUM: table and index sizes, dead tuples, claim latency.
* ``vectors``: ``n`` 384-d vectors of one version (synthetic, with a low-dimensional structure: ``_vectors``): the HNSW
  build's time and size (m 16, ef_construction 64, as pgsynapse builds it), kNN p50/p99 and recall@10 (against
  exact search) at ef_search 40/100/200, and retiring a version of ``n / 2`` rows from one table (DELETE, then
  the VACUUM that a retire's DELETE needs) against a table partitioned by version (DROP of its partition).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

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


CHUNK = 50_000  # vectors generated, loaded and searched exactly per chunk: 5 M x 384 never sits in the client


def _vectors(n: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """Unit vectors with structure, as embeddings have: a 24-d latent (mixed from 200 topics) spread into 384-d by
    one fixed random map, plus a little noise. (Isotropic noise around centres, tried first, makes every point of a
    cluster about as near as any other: a recall of 0.2 at any ef_search, which says nothing about real data.)
    The topics and the map are fixed; ``seed`` only draws the mix and the noise, so chunks drawn with their own
    seeds come from one distribution."""
    rng, fixed = np.random.default_rng(seed), np.random.default_rng(1234)
    topics = fixed.standard_normal((200, 24)).astype(np.float32)
    spread = fixed.standard_normal((24, DIM)).astype(np.float32)
    z = topics[rng.integers(0, 200, n)] + 0.5 * rng.standard_normal((n, 24)).astype(np.float32)
    x = z @ spread + 0.5 * rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _chunks(n: int, first: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Rows ``first`` .. ``n - 1`` of the data set, ``(first id, vectors)`` a chunk of ``CHUNK`` at a time (chunk
    ``i`` drawn with seed ``(0, i)``): the same rows whoever asks, without holding them all."""
    for i in range(first // CHUNK, -(-n // CHUNK)):
        lo = i * CHUNK
        start = max(lo, first)
        yield start, _vectors(CHUNK, (0, i))[start - lo:min(n, lo + CHUNK) - lo]


def _load(conn: psycopg.Connection, table: str, version: int, chunks: Iterable[tuple[int, np.ndarray]],
          on_chunk: Callable[[int, np.ndarray], None] | None = None) -> None:
    """COPY each chunk (a statement each), ``on_chunk`` called on it after."""
    for first_id, data in chunks:
        with conn.cursor().copy(f"COPY {table} (version, id, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "int8", "vector"])
            for i, v in enumerate(data):
                copy.write_row((version, first_id + i, v))
        if on_chunk:
            on_chunk(first_id, data)


class _TopK:
    """The exact top ``k`` (cosine: the vectors are unit) of each query, merged chunk by chunk."""

    def __init__(self, queries: np.ndarray, k: int = 10) -> None:
        self.queries, self.k = queries, k
        self.sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.ids = np.zeros((len(queries), k), dtype=np.int64)

    def add(self, first_id: int, data: np.ndarray) -> None:
        sims = np.concatenate([self.sims, self.queries @ data.T], axis=1)
        ids = np.concatenate([self.ids, np.broadcast_to(np.arange(first_id, first_id + len(data)), (len(self.queries), len(data)))], axis=1)
        top = np.argpartition(-sims, self.k - 1, axis=1)[:, :self.k]
        self.sims, self.ids = np.take_along_axis(sims, top, 1), np.take_along_axis(ids, top, 1)


class _ServerMemory:
    """Samples, every ``every`` s in a thread, the server's memory (the summed PSS of the postmaster's processes,
    shared memory counted once) and the index build's progress, printed to stderr; ``peak_mb`` after."""

    def __init__(self, conn: psycopg.Connection, url: str, every: float = 10.0) -> None:
        # not more often: reading smaps_rollup walks the page tables of the build's shared graph (every 2 s took
        # about 16 % of a core at 5 M vectors)
        backend = conn.info.backend_pid
        self.postmaster = _ppid(backend)
        self.url, self.every, self.peak_mb = url, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _ServerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _pss_mb(self) -> float:
        total = 0
        for pid in [self.postmaster, *_children(self.postmaster)]:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        return total / 1024

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as watch:
            last, wait = 0.0, 1.0  # the first sample soon: a small build ends within one interval
            while not self._stop.wait(wait):
                wait = self.every
                self.peak_mb = max(self.peak_mb, self._pss_mb())
                if time.monotonic() - last >= 60:
                    last = time.monotonic()
                    row = watch.execute("SELECT phase, tuples_done, tuples_total, blocks_done, blocks_total"
                                        " FROM pg_stat_progress_create_index").fetchone()
                    print(f"# {time.strftime('%H:%M:%S')} build {row} server pss {self._pss_mb():.0f} MB,"
                          f" peak {self.peak_mb:.0f} MB", file=sys.stderr, flush=True)


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0  # not a local server: no memory figures


def _children(ppid: int) -> list[int]:
    if not ppid:
        return []
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(int(p.name)) == ppid]


def vectors(url: str, n: int, maintenance_work_mem: str = "4GB", retire: int = 200_000) -> None:
    """The build and search at ``n`` vectors, then the retire comparison at ``retire`` rows (0: not run)."""
    queries = _vectors(200, 1)
    exact = _TopK(queries)
    notices: list[str] = []
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        register_vector(conn)
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute(f"SET maintenance_work_mem = '{maintenance_work_mem}'")
        conn.execute(f"CREATE TABLE bench_vec (version int NOT NULL, id bigint NOT NULL, embedding vector({DIM}) NOT NULL)")
        s = time.perf_counter()
        _load(conn, "bench_vec", 1, _chunks(n), exact.add)  # the exact top 10 of each query, as the chunks pass
        load_s = time.perf_counter() - s
        conn.execute("VACUUM ANALYZE bench_vec")
        with _ServerMemory(conn, url) as memory:
            s = time.perf_counter()
            conn.execute("CREATE INDEX bench_vec_hnsw ON bench_vec USING hnsw (embedding vector_cosine_ops)"
                         " WITH (m = 16, ef_construction = 64)")
            build_s = time.perf_counter() - s
        size = conn.execute("SELECT pg_relation_size('bench_vec_hnsw') / 1048576.0, pg_relation_size('bench_vec') / 1048576.0").fetchone()
        workers = conn.execute("SHOW max_parallel_maintenance_workers").fetchone()[0]
        emit("scale", "vectors_build", vectors=n, load_s=round(load_s, 1), build_s=round(build_s, 1),
             vectors_per_s=round(n / build_s), index_mb=round(size[0]), table_mb=round(size[1]),
             maintenance_work_mem=maintenance_work_mem, parallel_workers=workers,
             peak_server_pss_mb=round(memory.peak_mb), load1=round(os.getloadavg()[0], 2),
             graph_fits=not any("no longer fits" in m for m in notices), notices=" | ".join(notices))
        for ef in (40, 100, 200):
            conn.execute(f"SET hnsw.ef_search = {ef}")
            lat, hits = [], 0
            for qi, v in enumerate(queries):
                s = time.perf_counter()
                ids = [r[0] for r in conn.execute(
                    "SELECT id FROM bench_vec ORDER BY embedding <=> %s LIMIT 10", (v,)).fetchall()]
                lat.append(time.perf_counter() - s)
                hits += len(set(ids) & set(exact.ids[qi].tolist()))
            emit("scale", "vectors_search", vectors=n, ef_search=ef, p50_ms=ms(lat, 50), p99_ms=ms(lat, 99),
                 recall_at_10=round(hits / (10 * len(queries)), 3))
        conn.execute("RESET hnsw.ef_search")
        conn.execute("DROP TABLE bench_vec")
        if retire:
            _retire(conn, retire)


def _retire(conn: psycopg.Connection, n: int) -> None:
    """Retire a version of n/2 rows: one table with a partial index per version (as pgsynapse.embeddings was) against
    a table partitioned by version (as it is since migration 0019)."""
    half = n // 2
    conn.execute(f"CREATE TABLE bench_flat (version int NOT NULL, id bigint NOT NULL, embedding vector({DIM}) NOT NULL,"
                 " PRIMARY KEY (version, id))")
    _load(conn, "bench_flat", 1, _chunks(half))
    _load(conn, "bench_flat", 2, _chunks(n, half))
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
    _load(conn, "bench_part", 1, _chunks(half))
    _load(conn, "bench_part", 2, _chunks(n, half))
    for v in (1, 2):
        conn.execute(f"CREATE INDEX ON bench_part_v{v} USING hnsw (embedding vector_cosine_ops)")
    s = time.perf_counter()
    conn.execute("DROP TABLE bench_part_v1")
    drop_s = time.perf_counter() - s
    emit("scale", "vectors_retire", layout="partitioned by version", rows=half, seconds=round(drop_s, 2),
         delete_s=round(drop_s, 2), vacuum_s=0.0,
         heap_mb_after=round(conn.execute("SELECT pg_relation_size('bench_part_v2') / 1048576.0").fetchone()[0]))
    conn.execute("DROP TABLE bench_part")
