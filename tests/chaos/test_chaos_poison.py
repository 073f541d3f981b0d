"""Poison rows in a worker process, with the default max_attempts.

- A batch of 64 documents of which 3 make the model step raise: 61 are embedded, the 3 fail with their own error
  after exactly ``max_attempts`` attempts; then the cause is fixed (a worker without the fault) and
  ``pgsynapse retry-failed`` puts them back: all 64 end embedded, once.
- A batch of 16 of which one kills the worker process: after the first crash its batch-mates come back solo and
  end embedded; only the killer is failed, after ``max_attempts`` crashes while it ran alone."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from pgsynapse.config import load_settings

from tests.chaos.invariants import QUIET, assert_exactly_once
from tests.helpers import aconn, insert_docs, spawn_worker, wait_until

pytestmark = pytest.mark.anyio

FAULTY = [str(Path(__file__).with_name("faulty_worker.py"))]
ENV = {"PGSYNAPSE_BATCH_SIZE": "64", "PGSYNAPSE_RETRY_BACKOFF_SECONDS": "0.05",
       "PGSYNAPSE_RETRY_BACKOFF_MAX_SECONDS": "0.2"}
MAX_ATTEMPTS = load_settings(environ={}).max_attempts  # the default
NOTHING_PENDING = "SELECT NOT EXISTS (SELECT 1 FROM pgsynapse.jobs WHERE status IN ('pending', 'running'))"


def retry_failed(url: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pgsynapse", "--database-url", url, "retry-failed", *args],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


async def test_poison_rows_fail_alone_then_retry_failed_recovers_them(db_url, record):
    poisoned_at = (3, 31, 60)
    docs = [(f"Doc {i}", "POISON in this body" if i in poisoned_at else f"Healthy text number {i}.") for i in range(64)]
    conn = await aconn(db_url)
    worker = spawn_worker(db_url, env={**ENV, "CHAOS_POISON_MARKER": "POISON"}, entry=FAULTY)
    try:
        ids = insert_docs(db_url, docs)
        await wait_until(conn, NOTHING_PENDING, channel="pgsynapse_jobs")
    finally:
        assert worker.stop() == 0
    rows = await (await conn.execute(
        "SELECT d.id, d.status, d.error, j.status AS job_status, j.attempts FROM pgsynapse.documents d"
        " JOIN pgsynapse.jobs j ON j.ref_id = d.id AND j.kind = 'embed' ORDER BY d.id")).fetchall()
    bad = {ids[i] for i in poisoned_at}
    assert [r["id"] for r in rows if r["status"] == "embedded" and r["job_status"] == "done"] == [
        i for i in ids if i not in bad]
    for r in rows:
        if r["id"] in bad:
            assert (r["status"], r["job_status"], r["attempts"]) == ("failed", "failed", MAX_ATTEMPTS)
            assert r["error"] == f"ValueError: cannot encode poisoned document {r['id']}"
    attempts = {}
    for e in worker.events:
        if e.get("event") in ("job_retry_scheduled", "job_failed"):
            attempts[e["ref"]] = attempts.get(e["ref"], 0) + 1
    assert attempts == {i: MAX_ATTEMPTS for i in bad}  # each poisoned row tried exactly max_attempts times, no other

    # the cause is fixed: one poisoned row's text corrected by the application (a new pending job), and a
    # worker without the fault; retry-failed requeues the other two and closes the superseded failed job
    fixed = ids[poisoned_at[0]]
    await conn.execute("UPDATE pgsynapse.documents SET body = 'Corrected text.' WHERE id = %s", (fixed,))
    assert retry_failed(db_url, "--kind", "answer") == "no failed jobs of kind answer"
    worker = spawn_worker(db_url, env=ENV)
    try:
        assert retry_failed(db_url, "--kind", "embed") == ("requeued embed: 2\nclosed 1 failed job(s) as superseded: "
                                                            "their row has a newer job, or changed and was processed since")
        await wait_until(conn, QUIET)
        assert retry_failed(db_url) == "no failed jobs"
        result = assert_exactly_once(db_url)
    finally:
        assert worker.stop() == 0
    t = result["totals"]
    assert t["documents"] == 64 and t["documents_failed"] == 0 and t["jobs_failed"] == 0
    superseded = await (await conn.execute(
        "SELECT count(*) AS n FROM pgsynapse.jobs WHERE ref_id = %s AND skip_reason LIKE 'superseded%%'", (fixed,))).fetchone()
    assert superseded["n"] == 1
    await conn.close()
    record(batch=64, poisoned=3, embedded_first_pass=61, attempts_per_poisoned_row=MAX_ATTEMPTS,
           requeued_by_retry_failed=2, superseded=1, jobs_checked=t["jobs"], lost=result["lost"],
           duplicated=result["duplicated"])


async def test_a_row_that_kills_its_worker_fails_alone_and_its_batch_mates_end_done(db_url, record):
    killer_at = 5
    docs = [(f"Doc {i}", "KILLER in this body" if i == killer_at else f"Healthy text number {i}.") for i in range(16)]
    ids = insert_docs(db_url, docs)  # before any worker runs: the 16 are claimed as one batch
    env = {**ENV, "PGSYNAPSE_LEASE_SECONDS": "1", "CHAOS_KILL_MARKER": "KILLER"}
    conn = await aconn(db_url)
    crashes, worker = 0, None
    try:
        while True:
            worker = spawn_worker(db_url, env=env, entry=FAULTY)
            quiet = False

            async def until_quiet(scope: anyio.CancelScope) -> None:
                nonlocal quiet
                await wait_until(conn, NOTHING_PENDING, channel="pgsynapse_jobs")
                quiet = True
                scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(until_quiet, tg.cancel_scope)
                # the worker dies on the killer, or lives once the killer is failed and the queue is empty
                await anyio.to_thread.run_sync(worker.wait_event, "process_exited", abandon_on_cancel=True)
                tg.cancel_scope.cancel()
            if quiet:
                break
            assert worker.proc.wait(30) == -signal.SIGKILL, worker.tail()
            crashes += 1
            assert crashes <= MAX_ATTEMPTS + 1, "the killer should be failed by now"
    finally:
        if worker is not None:
            assert worker.stop() in (0, -signal.SIGKILL)
    rows = await (await conn.execute(
        "SELECT d.id, d.status, d.error, j.status AS job_status, j.attempts FROM pgsynapse.documents d"
        " JOIN pgsynapse.jobs j ON j.ref_id = d.id AND j.kind = 'embed' ORDER BY d.id")).fetchall()
    killer = ids[killer_at]
    # every batch-mate embedded, once; the killer alone failed, with a reason, after max_attempts solo crashes
    assert [(r["id"], r["status"], r["job_status"]) for r in rows if r["id"] != killer] == [
        (i, "embedded", "done") for i in ids if i != killer], rows
    [k] = [r for r in rows if r["id"] == killer]
    assert (k["status"], k["job_status"], k["attempts"]) == ("failed", "failed", MAX_ATTEMPTS)
    assert k["error"].startswith(f"lease expired {MAX_ATTEMPTS} times"), k["error"]
    assert crashes == MAX_ATTEMPTS + 1  # the batch's crash, then max_attempts alone
    result = assert_exactly_once(db_url)
    await conn.close()
    record(batch=16, killers=1, crashes=crashes, batch_mates_done=15, killer_attempts=k["attempts"],
           jobs_checked=result["totals"]["jobs"], lost=result["lost"], duplicated=result["duplicated"])
