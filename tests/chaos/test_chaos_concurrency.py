"""Three worker processes share one queue of 5,000 jobs (20,000 with ``--full``); one of them gets SIGTERM under
load and is replaced. Every job is done exactly once (``jobs.completions``, incremented by the handler's write
transaction, is 1 for every job), the terminated worker exits 0 after writing its in-flight batches and leaves
no job leased."""

from __future__ import annotations

import signal

import pytest

from tests.chaos.invariants import QUIET, assert_exactly_once
from tests.helpers import aconn, insert_docs, spawn_worker, wait_until

pytestmark = pytest.mark.anyio

ENV = {"PGSYNAPSE_BATCH_SIZE": "32"}


def _docs(n: int) -> list[tuple[str, str]]:
    return [(f"Job {i}", f"Row {i}: " + " ".join(f"t{(i * 31 + k) % 1009}" for k in range(12))) for i in range(n)]


async def test_three_workers_each_job_once_and_sigterm_under_load(db_url, full, record):
    n = 20_000 if full else 5_000
    workers = [spawn_worker(db_url, env=ENV) for _ in range(3)]
    conn = await aconn(db_url)
    try:
        docs = _docs(n)
        for i in range(0, n, 5_000):  # statements of 5,000 rows: one job per row (over 10,000, one bulk job)
            insert_docs(db_url, docs[i:i + 5_000])
        # under load: a fifth of the queue done, the three workers all busy
        await wait_until(conn, "SELECT count(*) >= %s FROM pgsynapse.documents WHERE status = 'embedded'", (n // 5,))
        victim = workers[0]
        victim.proc.send_signal(signal.SIGTERM)
        assert victim.proc.wait(120) == 0
        stopped = victim.wait_event("worker_stopped")
        leased = await (await conn.execute(
            "SELECT count(*) AS n FROM pgsynapse.jobs WHERE status = 'running' AND split_part(worker, ':', 2) = %s",
            (str(victim.proc.pid),))).fetchone()
        assert leased["n"] == 0  # its in-flight batches were written, nothing left leased
        workers.append(spawn_worker(db_url, env=ENV))
        await wait_until(conn, QUIET)
        result = assert_exactly_once(db_url)
        per_worker = await (await conn.execute(
            "SELECT split_part(worker, ':', 2) AS pid, count(*) AS n, sum(completions) AS completions"
            " FROM pgsynapse.jobs GROUP BY 1 ORDER BY 1")).fetchall()
        once = await (await conn.execute(
            "SELECT count(*) FILTER (WHERE completions = 1) AS once, count(*) AS jobs FROM pgsynapse.jobs")).fetchone()
    finally:
        codes = [w.stop() for w in workers[1:]]
        await conn.close()
    assert codes == [0, 0, 0]
    assert once["once"] == once["jobs"] == n  # each job done exactly once, none lost
    # the queue was really shared: all four processes took part
    assert len(per_worker) == 4 and all(r["n"] > 0 for r in per_worker), per_worker
    assert stopped["processed"]["embed"] == next(r["n"] for r in per_worker if r["pid"] == str(victim.proc.pid))
    t = result["totals"]
    record(workers=3, sigterm=1, jobs_checked=once["jobs"], completed_once=once["once"], documents=t["documents"],
           per_worker={r["pid"]: r["n"] for r in per_worker}, lost=result["lost"],
           duplicated=result["duplicated"])
