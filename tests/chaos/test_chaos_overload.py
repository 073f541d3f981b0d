"""Overload: 100,000 queued jobs in front of a slow handler. The worker's memory stays bounded (it holds one
batch, not the queue), the claim query still uses its partial index, and ``pgsynapse status`` answers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from pgsynapse.queries import q
from tests.helpers import insert_docs, spawn_worker

FAULTY = [str(Path(__file__).with_name("faulty_worker.py"))]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _nth_batch(worker, n: int, start: int = 0) -> int:
    """Index just past the n-th ``batch_processed`` event from ``start``."""
    for _ in range(n):
        ev = worker.wait_event("batch_processed", start=start)
        start = worker.events.index(ev, start) + 1
    return start


def test_100k_backlog_bounded_memory_indexed_claim_and_responsive_status(db_url, full, record):
    n = 100_000
    batches = 200 if full else 50
    # one INSERT statement of 100k rows: one bulk job, expanded by the worker into 100k pending jobs
    insert_docs(db_url, [(f"Backlog {i}", f"Queued row {i} of the overload test.") for i in range(n)])
    worker = spawn_worker(db_url, entry=FAULTY, env={"CHAOS_SLOW_SECONDS": "0.05", "PGSYNAPSE_BATCH_SIZE": "32"})
    try:
        expanded = worker.wait_event("bulk_jobs_expanded")
        assert expanded["jobs"] == n, expanded
        at = _nth_batch(worker, 5)
        rss_early = _rss_mb(worker.proc.pid)
        at = _nth_batch(worker, batches, at)
        rss_late = _rss_mb(worker.proc.pid)
        with psycopg.connect(db_url, autocommit=True) as conn:
            pending = conn.execute("SELECT count(*) FROM pgsynapse.jobs WHERE status = 'pending'").fetchone()[0]
            plan = [r[0] for r in conn.execute(
                "EXPLAIN " + q("claim_jobs"), {"kind": "embed", "limit": 32, "worker": "w", "lease": 60})]
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "pgsynapse", "--database-url", db_url, "status", "--json"],
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        status_s = time.monotonic() - started
    finally:
        assert worker.stop() == 0
    assert pending > n * 0.9  # the backlog really was there while we looked
    assert any("jobs_claim" in line for line in plan), "\n".join(plan)
    assert rss_late <= rss_early * 1.5, (rss_early, rss_late)
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    embed = next(r for r in snap["jobs"] if r["kind"] == "embed")
    assert embed["pending"] > n * 0.9 and snap["documents_pending"] > n * 0.9
    record(jobs_queued=n, batches_observed=batches, pending_at_check=pending, rss_mb_early=round(rss_early),
           rss_mb_late=round(rss_late), claim_uses_index=True, status_seconds=round(status_s, 2))
