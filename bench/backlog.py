"""Backlog: N pending documents (100k by default) inserted before the worker starts; the worker (a separate
process) drains them while its RSS is sampled. Flat memory: peak RSS within 1.5x of the RSS after the first
1,000 documents. Also EXPLAIN of the claim query with the full backlog (an index scan on jobs_claim).

    python -m bench.backlog [--quick] [--docs 100000] [--runtime onnx-int8]
"""

from __future__ import annotations

import time

import psycopg

from bench.common import (
    add_runtime_option, database, emit, machine, parser, rss_of, run_benchmark, set_runtime, spawn_worker, stop, table)
from pgsynapse.queries import q

INSERT = (
    "INSERT INTO pgsynapse.documents (source, title, body)"
    " SELECT 'backlog-' || g, 'Note ' || g,"
    " 'Row ' || g || ' of the backlog is a short note about topic ' || (g %% 97) || ' written in plain words.'"
    " FROM generate_series(%s::int, %s::int) g"
)


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--docs", type=int, default=0, help="pending documents (default 100000, --quick 5000)")
    add_runtime_option(p)
    p.add_argument("--max-seconds", type=float, default=0, help="stop sampling after this long (a partial drain is reported)")
    args = p.parse_args()
    n = args.docs or (5_000 if args.quick else 100_000)
    emit("backlog", "machine", **machine())
    with database(args.database_url) as url, psycopg.connect(url, autocommit=True) as conn:
        set_runtime(url, args.runtime)
        # statements of 10,000 rows: one job per row (a larger statement would record one bulk job, see
        # triggers/documents_v2.sql), so the claim query faces n pending jobs
        for start in range(1, n + 1, 10_000):
            conn.execute(INSERT, (start, min(n, start + 9_999)))
        conn.execute("ANALYZE pgsynapse.jobs")
        plan = [r[0] for r in conn.execute(
            "EXPLAIN " + q("claim_jobs"), {"kind": "embed", "limit": 32, "worker": "w", "lease": 60})]
        index_scan = any("jobs_claim" in line for line in plan)
        emit("backlog", "claim_plan", pending=n, uses_jobs_claim=index_scan,
             scan=next((ln.strip() for ln in plan if "Scan" in ln), ""))
        env = {"PGSYNAPSE_TORCH_THREADS": str(args.threads), "PGSYNAPSE_ONNX_THREADS": str(args.threads),
               "PGSYNAPSE_BATCH_SIZE": "64"}
        worker = spawn_worker(url, env)
        samples: list[tuple[float, int, int]] = []
        started = time.perf_counter()
        try:
            while True:
                done = conn.execute("SELECT count(*) FROM pgsynapse.documents WHERE status <> 'pending'").fetchone()[0]
                samples.append((time.perf_counter() - started, done, rss_of(worker.pid)))
                if done >= n or (args.max_seconds and time.perf_counter() - started > args.max_seconds):
                    break
                if worker.poll() is not None:
                    raise RuntimeError("worker exited")
                time.sleep(0.5)
        finally:
            stop(worker)
        elapsed = time.perf_counter() - started
        after_1k = next(r for _, d, r in samples if d >= min(1000, n))
        peak = max(r for _, _, r in samples)
        curve = [(round(t, 1), d, round(r / 2**20, 1)) for t, d, r in samples[:: max(1, len(samples) // 12)]]
        emit("backlog", "drain", docs=n, drained=samples[-1][1], seconds=round(elapsed, 1), docs_per_s=round(samples[-1][1] / elapsed, 1),
             rss_after_1k_mb=round(after_1k / 2**20, 1), peak_rss_mb=round(peak / 2**20, 1),
             ratio=round(peak / after_1k, 3), target=1.5, passed=peak / after_1k <= 1.5)
        emit("backlog", "rss_curve", points=curve)
    table()


if __name__ == "__main__":
    run_benchmark(main)
