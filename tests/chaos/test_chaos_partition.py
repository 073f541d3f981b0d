"""Network partition: worker A runs in a second network namespace and reaches the database only through a veth
pair the test cuts (``ip link set ... down``: packets dropped silently, no RST, A's server backends stay up) while
A holds claimed jobs: at any moment (A computing, the usual case) or right after A's write transaction has written
(its row locks held by a server backend that waits for A's next statement); worker B, on the direct path, must take over A's expired leases and finish everything. The
link is healed: A's late writes of its old claims are refused (the claim token, ``jobs.started_at``), A heartbeats
again and does new work alone. Every row done exactly once; ``pgsynapse status`` lists both workers' identities and
heartbeats (A's stale during the partition, fresh after)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.chaos.invariants import QUIET, assert_exactly_once
from tests.chaos.partition import partition
from tests.helpers import SAFETY_TIMEOUT, WorkerProcess, aconn, insert_docs, spawn_worker, wait_until

pytestmark = pytest.mark.anyio

# a short lease so the partitioned worker's claims expire fast, small batches so A holds several; else defaults
ENV = {"PGSYNAPSE_LEASE_SECONDS": "2", "PGSYNAPSE_BATCH_SIZE": "8"}
# what a worker logs when it notices the database is unreachable
# what a worker logs when its late results are not written: the guard refused them, or the write failed for good
LATE = ("lease_lost_results_dropped", "batch_write_abandoned")
# the takeover's safety net: a lease (2 s), the server's end of an idle transaction (10 s) or of one cut inside a
# statement's message (20 s: db.transaction_bounds) and the reaper's interval fit in it; without those bounds A's
# locks would be held for the server's TCP keepalive (hours)
TAKEOVER_TIMEOUT = 60.0
NOTICED = ("listen_connection_lost", "claim_failed", "maintenance_failed", "batch_write_retrying",
           "batch_write_abandoned")


def _docs(rng: random.Random, start: int, n: int) -> list[tuple[str, str]]:
    return [(f"Doc {i}", f"Document {i}: " + " ".join(f"w{rng.randrange(5000)}" for _ in range(rng.randrange(5, 40))))
            for i in range(start, start + n)]


def _at(ev: dict[str, Any]) -> float:
    return datetime.fromisoformat(ev["timestamp"].replace("Z", "+00:00")).timestamp()


def _events(worker: WorkerProcess, names: tuple[str, ...], since: float) -> list[dict[str, Any]]:
    return [e for e in list(worker.events) if e.get("event") in names and "timestamp" in e and _at(e) >= since]


def _status_workers(url: str) -> dict[str, dict[str, Any]]:
    r = subprocess.run([sys.executable, "-m", "pgsynapse", "--database-url", url, "status", "--json"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       cwd=str(Path(__file__).parent.parent))
    assert r.returncode == 0, r.stderr[-2000:]
    return {w["worker_id"]: w for w in json.loads(r.stdout)["workers"]}


def _stop(worker: WorkerProcess | None) -> int | None:
    if worker is None:
        return None
    try:
        return worker.stop(60)
    except subprocess.TimeoutExpired:
        worker.proc.kill()
        return worker.proc.wait(30)


async def _scalar(conn, sql: str, params: Any = None) -> Any:
    row = await (await conn.execute(sql, params)).fetchone()
    return list(row.values())[0]


async def _why_not_taken_over(conn, a_id: str, a: WorkerProcess, b: WorkerProcess) -> str:
    """What a failed takeover wait shows: A's jobs still running (locked or not), the server's sessions, the
    workers' last events."""
    async with conn.transaction(force_rollback=True):
        jobs = await (await conn.execute(
            "SELECT id, kind, solo, attempts, round(extract(epoch FROM lease_until - now())::numeric, 1) AS lease_left_s"
            " FROM pgsynapse.jobs WHERE status = 'running' AND worker = %s ORDER BY id", (a_id,))).fetchall()
        unlocked = [r["id"] for r in await (await conn.execute(
            "SELECT id FROM pgsynapse.jobs WHERE status = 'running' AND worker = %s FOR UPDATE SKIP LOCKED",
            (a_id,))).fetchall()]
    sessions = await (await conn.execute(
        "SELECT pid, application_name, client_addr, state, wait_event_type, wait_event, backend_xid,"
        " round(extract(epoch FROM now() - xact_start)::numeric, 1) AS xact_s,"
        " round(extract(epoch FROM now() - state_change)::numeric, 1) AS state_s,"
        " pg_blocking_pids(pid) AS blocked_by, left(query, 160) AS query"
        " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")).fetchall()
    lines = [f"A's running jobs ({len(jobs)}; not row-locked: {unlocked}): {jobs}", "sessions:"]
    lines += [f"  {dict(r)}" for r in sessions]
    lines += ["B's last events:", b.tail(25), "A's last events:", a.tail(10)]
    return "\n".join(lines)


@pytest.mark.parametrize("when", ["holding_claims", "mid_transaction"])
async def test_partitioned_worker_is_taken_over_and_its_late_writes_refused(when, db_url, pg_url, full, record):
    rng = random.Random(21)
    n_docs, n_after = (600, 60) if full else (160, 20)
    with partition(pg_url) as part:
        part.check(db_url)
        a = b = None
        conn = await aconn(db_url)
        try:
            # A: in the namespace, through the cuttable path; B: the direct URL. Same settings otherwise.
            a = spawn_worker(part.url(db_url), env=ENV, prefix=part.exec_prefix, wait_started=False)
            b = spawn_worker(db_url, env=ENV, wait_started=False)
            a_id, b_id = a.wait_event("worker_started")["worker"], b.wait_event("worker_started")["worker"]
            assert a_id.split(":")[1] == str(a.proc.pid)  # `ip netns exec` execs the worker itself: signals reach it
            insert_docs(db_url, _docs(rng, 0, n_docs))
            await conn.execute("INSERT INTO pgsynapse.questions (text) SELECT unnest(%s::text[])",
                               ([f"What does document {rng.randrange(n_docs)} say about w{k}?" for k in range(6)],))
            await wait_until(conn, "SELECT EXISTS (SELECT 1 FROM pgsynapse.jobs WHERE status = 'running' AND worker = %s)",
                             (a_id,))
            if when == "mid_transaction":
                part.cut_mid_transaction()
                assert await anyio.to_thread.run_sync(part.cut_done.wait, SAFETY_TIMEOUT), "A wrote nothing to cut"
            else:
                part.cut()
            t_cut = part.cut_time
            # A can change nothing from here: what it holds now is what B must take over
            held = [r["id"] for r in await (await conn.execute(
                "SELECT id FROM pgsynapse.jobs WHERE status = 'running' AND worker = %s", (a_id,))).fetchall()]
            assert held, "A finished its batch between the check and the cut: it held nothing to take over"
            # B takes them over once their leases expire (and, mid-transaction, once A's locks are released)
            try:
                await wait_until(conn, "SELECT NOT EXISTS (SELECT 1 FROM pgsynapse.jobs WHERE status = 'running'"
                                 " AND worker = %s)", (a_id,), timeout=TAKEOVER_TIMEOUT)
            except TimeoutError:
                raise AssertionError(f"B did not take A's jobs over:\n{await _why_not_taken_over(conn, a_id, a, b)}") from None
            takeover_s = time.time() - t_cut
            await wait_until(conn, QUIET)
            finished_s = time.time() - t_cut
            # A's jobs are done once each (no row changed meanwhile: none superseded): by B, which did them again,
            # or by A when its commit was already on its way to the server at the cut
            rows = await (await conn.execute(
                "SELECT id, status, worker, completions FROM pgsynapse.jobs WHERE id = ANY(%s)", (held,))).fetchall()
            bad = [r for r in rows if not (r["status"] == "done" and r["worker"] in (a_id, b_id) and r["completions"] == 1)]
            assert not bad, f"jobs A ({a_id}) held not done once (B is {b_id}): {bad}"
            redone = sum(r["worker"] == b_id for r in rows)
            assert redone, f"B took over none of A's jobs: all {len(held)} were committed by A at the cut"
            # every job B did after A's lease on it expired, also of a claim of A's that the server committed just
            # after `held` was read (A's late results can be refused for those too): the reaper requeues an expired
            # job solo (embed, crash isolation: the attempt refunded) or with its attempt counted (other kinds)
            taken_over = await _scalar(conn, "SELECT count(*) FROM pgsynapse.jobs WHERE worker = %s AND status = 'done'"
                                       " AND (solo OR attempts > 1)", (b_id,))
            # status during the partition: both identities; A's heartbeat stops, B's goes on
            during = _status_workers(db_url)
            assert {a_id, b_id} <= set(during), during
            a_stale_s = during[a_id]["last_seen_seconds"]
            assert a_stale_s >= float(ENV["PGSYNAPSE_LEASE_SECONDS"]) and a_stale_s > during[b_id]["last_seen_seconds"]
            t_heal, healed_at = time.time(), len(a.events)
            part.heal()
            # A's first batch after the heal is a late one (it held claims): its results are refused by the guard
            # (the claim token), or its write fails for good when the server ended its transaction meanwhile (rolled
            # back, nothing written); a write that got through would show as duplicates in the invariants below
            late = a.wait_event((*LATE, "batch_processed"), start=healed_at)
            late_refused_s = _at(late) - t_heal
            await wait_until(conn, "SELECT heartbeat_at > to_timestamp(%s) FROM pgsynapse.workers WHERE worker_id = %s",
                             (t_heal, a_id))
            heartbeat_s = time.time() - t_heal
            after = _status_workers(db_url)
            assert {a_id, b_id} <= set(after) and after[a_id]["last_seen_seconds"] < a_stale_s, after
            assert {(w["host"], w["pid"]) for w in (after[a_id], after[b_id])} == {
                (a_id.split(":")[0], a.proc.pid), (b_id.split(":")[0], b.proc.pid)}
            assert _stop(b) == 0
            b_stopped = b
            b = None
            # A carries on alone: new rows after the heal are all A's
            t_new = time.time()
            insert_docs(db_url, _docs(rng, n_docs, n_after))
            await wait_until(conn, QUIET)
            new_work_s = time.time() - t_new
            by_a = await _scalar(conn, "SELECT count(*) FROM pgsynapse.jobs WHERE status = 'done' AND worker = %s"
                                 " AND finished_at > to_timestamp(%s)", (a_id, t_new))
            assert by_a >= n_after
            result = assert_exactly_once(db_url)
        finally:
            part.heal()  # a worker stuck on the cut path must be able to finish its shielded write and stop
            code_a, code_b = _stop(a), _stop(b)
            await conn.close()
    assert code_a == 0 and code_b in (0, None), (code_a, code_b, a.tail() if a else "")
    # A's log (its stderr, not the cut path): when it noticed the database was gone, if it did during the cut
    noticed = [(e["event"], round(_at(e) - t_cut, 1)) for e in _events(a, NOTICED, t_cut) if _at(e) < t_heal]
    late_events = _events(a, LATE, t_cut)
    dropped = sum(e["n"] for e in late_events)
    assert 1 <= dropped <= taken_over, f"A's late results refused: {dropped}, B redid {taken_over}: {late_events}"
    # the bound above holds only where the server waits on A at a ReadyForQuery: never inside a statement
    waits = part.forwarder.mid_statement_waits
    assert not waits, f"A left the server waiting on it inside a statement (connection, what): {waits[:10]}"
    t = result["totals"]
    assert t["documents"] == n_docs + n_after and t["jobs_failed"] == 0 and t["questions_answered"] == 6
    record(jobs_held_at_cut=len(held), jobs_redone_by_b=redone, takeover_s=round(takeover_s, 1), all_done_while_cut_s=round(finished_s, 1),
           a_heartbeat_stale_s=a_stale_s, a_noticed=noticed[:5],
           late_results_refused=dropped, late_results_how=sorted({e["event"] for e in late_events}), late_write_after_heal_s=round(late_refused_s, 1),
           a_heartbeat_after_heal_s=round(heartbeat_s, 1), new_docs_by_a=by_a, new_work_s=round(new_work_s, 1),
           b_exit=b_stopped.proc.returncode, jobs_checked=t["jobs"], documents=t["documents"],
           lost=result["lost"], duplicated=result["duplicated"],
           forwarder_upstream_errors=part.forwarder.upstream_errors[:3])
