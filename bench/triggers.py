"""Trigger overhead: a 100k-row bulk INSERT into pgsynapse.documents with the enqueue trigger, divided by the same
INSERT with the trigger disabled (``ALTER TABLE ... DISABLE TRIGGER``, same table otherwise). Alternating runs,
medians, the table truncated before each run.

    python -m bench.triggers [--quick] [--rows 100000] [--reps 3]
"""

from __future__ import annotations

import time

import psycopg

from bench.common import database, emit, machine, median, parser, run_benchmark, table

INSERT = (
    "INSERT INTO pgsynapse.documents (source, title, body)"
    " SELECT 'bench-' || g, 'Document ' || g, repeat(md5(g::text) || ' ', 12) FROM generate_series(1, %s) g"
)


def run(conn: psycopg.Connection, rows: int, triggers: bool) -> float:
    conn.execute("TRUNCATE pgsynapse.documents, pgsynapse.jobs CASCADE")
    conn.execute("CHECKPOINT")
    action = "ENABLE" if triggers else "DISABLE"
    conn.execute(f"ALTER TABLE pgsynapse.documents {action} TRIGGER documents_enqueue_insert")
    started = time.perf_counter()
    conn.execute(INSERT, (rows,))
    elapsed = time.perf_counter() - started
    # documents enqueued: a bulk job (documents_v2.sql) carries many ids
    jobs = conn.execute("SELECT coalesce(sum(coalesce(cardinality(ref_ids), 1)), 0) FROM pgsynapse.jobs").fetchone()[0]
    assert jobs == (rows if triggers else 0), jobs
    return elapsed


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rows", type=int, default=0, help="rows per INSERT (default 100000, --quick 20000)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    rows = args.rows or (20_000 if args.quick else 100_000)
    emit("triggers", "machine", **machine())
    with database(args.database_url) as url, psycopg.connect(url, autocommit=True) as conn:
        run(conn, rows, True)  # warm the caches
        with_t, without = [], []
        for _ in range(args.reps):
            without.append(run(conn, rows, False))
            with_t.append(run(conn, rows, True))
        conn.execute("ALTER TABLE pgsynapse.documents ENABLE TRIGGER documents_enqueue_insert")
        ratio = median(with_t) / median(without)
        emit("triggers", "bulk_insert", rows=rows, reps=args.reps, with_triggers_s=round(median(with_t), 3),
             without_s=round(median(without), 3), all_with=[round(x, 3) for x in with_t],
             all_without=[round(x, 3) for x in without], ratio=round(ratio, 3), target=1.3, passed=ratio <= 1.3)
    table()


if __name__ == "__main__":
    run_benchmark(main)
