"""Leases of the job queue on real Postgres: expired leases of one row requeue one job, the maintenance steps fail
apart, and a hung batch gives its jobs back.

A dead worker is a ``worker`` value that no process holds, with its lease moved into the past: the state a
SIGKILLed worker leaves once its lease ran out (the subprocess kill tests in tests/chaos/ reach it for real).
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time

import anyio
import pytest
from structlog.testing import capture_logs

from pgsynapse.handlers.base import Handler
from pgsynapse.handlers.embed import EmbedHandler
from pgsynapse.listener.batches import Batch, LoopState
from pgsynapse.listener.worker import Worker
from pgsynapse.metrics import WorkerCollector
from pgsynapse.queries import q
from tests.helpers import aconn, fast_settings, insert_docs, running_worker, wait_until
from tests.integration.test_stale_writes import stepped_worker

pytestmark = pytest.mark.anyio

DEAD = "deadhost:1:dead00"
# the safety net of the waits below: leases of 1 s come back within a few maintenance rounds
WAIT = 30.0


async def _claim_as(conn, worker: str, kind: str = "embed") -> list[int]:
    rows = await (await conn.execute(q("claim_jobs"), {"kind": kind, "limit": 10, "worker": worker, "lease": 60})).fetchall()
    return [r["id"] for r in rows]


async def _expire(conn, worker: str) -> None:
    await conn.execute("UPDATE pgsynapse.jobs SET lease_until = now() - interval '1 second' WHERE worker = %s", (worker,))


async def test_two_expired_jobs_of_one_row_requeue_one_and_the_row_is_embedded(db_url, models):
    """An UPDATE while the INSERT's job runs queues a second job; a worker holding both dies: one comes back."""
    conn = await aconn(db_url)
    [doc] = insert_docs(db_url, [("Vacuum", "VACUUM reclaims storage occupied by dead tuples.")])
    first = await _claim_as(conn, DEAD)
    await conn.execute("UPDATE pgsynapse.documents SET body = 'VACUUM FULL rewrites the table.' WHERE id = %s", (doc,))
    second = await _claim_as(conn, DEAD)
    assert len(first) == len(second) == 1
    await _expire(conn, DEAD)
    with capture_logs() as logs:
        async with running_worker(fast_settings(db_url, lease_seconds=1.0), models):
            await wait_until(conn, "SELECT status = 'embedded' AND embedded_hash = content_hash"
                                   " FROM pgsynapse.documents WHERE id = %s", (doc,), timeout=WAIT)
    assert not [e for e in logs if e["event"] == "maintenance_failed"], logs
    rows = await (await conn.execute(
        "SELECT id, status, completions, skip_reason FROM pgsynapse.jobs WHERE ref_id = %s ORDER BY id", (doc,))).fetchall()
    # one job did the work, the other was superseded; none is left pending or running
    assert [r["status"] for r in rows] == ["done", "done"]
    assert sorted(r["completions"] for r in rows) == [0, 1]
    assert [r["skip_reason"] for r in rows if r["completions"] == 0][0].startswith("superseded")
    chunks = await (await conn.execute(
        "SELECT count(*) AS n, count(DISTINCT ord) AS ords FROM pgsynapse.chunks WHERE document_id = %s", (doc,))).fetchone()
    assert chunks["n"] == chunks["ords"] == 1
    await conn.close()


async def test_a_failing_reap_does_not_stop_lease_renewal(db_url, models):
    """Reaping fails on every round (a real error from the server); our own batch's lease is renewed all the same."""
    conn = await aconn(db_url)
    [stuck] = insert_docs(db_url, [("Stuck", "A row of a dead worker whose reap keeps failing.")])
    await _claim_as(conn, DEAD)
    await _expire(conn, DEAD)
    # the server refuses to requeue the dead worker's job, every time it is asked
    await conn.execute("""
        CREATE FUNCTION public.refuse_reap() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'reaping refused for this test'; END $$;
        CREATE TRIGGER refuse_reap BEFORE UPDATE ON pgsynapse.jobs FOR EACH ROW
        WHEN (OLD.worker = 'deadhost:1:dead00') EXECUTE FUNCTION public.refuse_reap();""")
    release, started = threading.Event(), threading.Event()
    settings = fast_settings(db_url, lease_seconds=1.0)

    class Held(EmbedHandler):
        def compute(self, work):
            started.set()
            release.wait(WAIT)
            return super().compute(work)

    handler = Held(settings, models)
    try:
        with capture_logs() as logs:
            async with running_worker(settings, models, handlers={"embed": handler}):
                [doc] = insert_docs(db_url, [("Held", "A batch that computes for longer than its lease.")])
                await anyio.to_thread.run_sync(started.wait, WAIT)
                row = await (await conn.execute(
                    "SELECT lease_until FROM pgsynapse.jobs WHERE ref_id = %s AND status = 'running'", (doc,))).fetchone()
                # renewed past the lease it was claimed with, while every reap fails
                await wait_until(conn, "SELECT lease_until > %s + interval '1 second' FROM pgsynapse.jobs"
                                       " WHERE ref_id = %s AND status = 'running'", (row["lease_until"], doc),
                                 channel="pgsynapse_jobs", timeout=WAIT)
                release.set()
                await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,),
                                 timeout=WAIT)
    finally:
        release.set()
    assert [e for e in logs if e["event"] == "maintenance_failed" and e.get("step") == "reap"]
    jobs = await (await conn.execute(
        "SELECT attempts, completions FROM pgsynapse.jobs WHERE ref_id = %s", (doc,))).fetchall()
    assert [(j["attempts"], j["completions"]) for j in jobs] == [(1, 1)]  # never lost its lease
    assert (await (await conn.execute("SELECT status FROM pgsynapse.jobs WHERE ref_id = %s", (stuck,))).fetchone())["status"] == "running"
    await conn.close()


async def test_a_hung_batch_gives_its_jobs_back_and_its_late_result_is_dropped(db_url, models):
    """A batch past its deadline is no longer renewed: its job returns to the queue, another loop does it, and
    the hung computation's late result is dropped by the write guard (the same worker holds the job again)."""
    conn = await aconn(db_url)
    release, hung = threading.Event(), threading.Event()
    settings = fast_settings(db_url, lease_seconds=1.0, batch_deadline_seconds=1.0)

    class HangsOnce(EmbedHandler):
        def compute(self, work):
            if not hung.is_set():
                hung.set()
                release.wait(WAIT)
            return super().compute(work)

    handler = HangsOnce(settings, models)
    try:
        with capture_logs() as logs:
            async with running_worker(settings, models, handlers={"embed": handler}):
                [doc] = insert_docs(db_url, [("Hung", "A batch whose model call never returns.")])
                await anyio.to_thread.run_sync(hung.wait, WAIT)
                first = await (await conn.execute(
                    "SELECT started_at FROM pgsynapse.jobs WHERE ref_id = %s", (doc,))).fetchone()
                # while the first computation still hangs, the job comes back and a second claim embeds it
                await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,),
                                 timeout=WAIT)
                release.set()  # the hung batch ends; the worker's stop waits for its write
    finally:
        release.set()
    events = [e["event"] for e in logs]
    assert "batch_deadline_exceeded" in events and "leases_expired" in events
    assert "lease_lost_results_dropped" in events  # the late result of the first claim, refused
    jobs = await (await conn.execute(
        "SELECT started_at, completions, status FROM pgsynapse.jobs WHERE ref_id = %s", (doc,))).fetchall()
    assert [(j["status"], j["completions"]) for j in jobs] == [("done", 1)]
    assert jobs[0]["started_at"] > first["started_at"]  # done by the second claim
    chunks = await (await conn.execute(
        "SELECT count(*) AS n, count(DISTINCT ord) AS ords FROM pgsynapse.chunks WHERE document_id = %s", (doc,))).fetchone()
    assert chunks["n"] == chunks["ords"] == 1
    await conn.close()


async def test_an_expired_job_with_a_newer_running_job_of_its_row_is_superseded_not_requeued(db_url, models):
    """The row's newer job already runs (and reads the row's latest text): requeueing the older one would embed the
    same text a second time (the chaos suite's write audit caught it: chunks_written_twice)."""
    conn = await aconn(db_url)
    [doc] = insert_docs(db_url, [("Twice", "The first text.")])
    [old] = await _claim_as(conn, DEAD)
    await conn.execute("UPDATE pgsynapse.documents SET body = 'The second text.' WHERE id = %s", (doc,))
    [new] = await _claim_as(conn, "alivehost:2:alive0")
    await _expire(conn, DEAD)
    async with stepped_worker(fast_settings(db_url), models) as worker:
        await worker.reap_expired()
    rows = {r["id"]: r for r in await (await conn.execute(
        "SELECT id, status, skip_reason, last_error FROM pgsynapse.jobs WHERE ref_id = %s", (doc,))).fetchall()}
    assert rows[old]["status"] == "done" and rows[old]["skip_reason"] == "superseded by a newer job", rows
    assert rows[old]["last_error"] is None  # not an error
    assert rows[new]["status"] == "running"
    await conn.close()


@pytest.mark.parametrize("newer", ["done", "running"])
async def test_a_job_out_of_attempts_whose_row_has_a_newer_job_is_superseded_not_failed(db_url, models, newer):
    """A job's worker died on every attempt, and the row was edited after its last claim (the edit queued a job of its
    own, which read the new text): the reaper's final failure is the old text's. The row must not be marked failed
    (nor announced so) over the new text's result; the old job is superseded, not failed."""
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    [doc] = insert_docs(db_url, [("Vacuum", "The old text, whose worker dies every time.")])
    [old] = await _claim_as(conn, DEAD)
    await conn.execute("UPDATE pgsynapse.documents SET body = 'VACUUM reclaims storage.' WHERE id = %s", (doc,))
    # every attempt used, the last one alone (crash isolation charges a solo expiry)
    await conn.execute("UPDATE pgsynapse.jobs SET solo = true, attempts = %s WHERE id = %s", (settings.max_attempts, old))
    async with stepped_worker(settings, models) as worker, await aconn(db_url) as listener:
        await listener.execute("LISTEN pgsynapse_documents")
        jobs = await worker.claim("embed", 10)
        assert [j.ref_id for j in jobs] == [doc]
        if newer == "done":
            await worker.process_batch("embed", jobs)
        await _expire(conn, DEAD)
        with capture_logs() as logs:
            await worker.reap_expired()
        if newer == "running":
            await worker.process_batch("embed", jobs)
        await conn.execute("NOTIFY pgsynapse_documents, 'end'")
        said = []
        async for note in listener.notifies(timeout=WAIT):
            if note.payload == "end":
                break
            said.append(note.payload)
    row = await (await conn.execute(
        "SELECT status, error, embedded_hash = content_hash AS current FROM pgsynapse.documents WHERE id = %s",
        (doc,))).fetchone()
    assert (row["status"], row["error"], row["current"]) == ("embedded", None, True), row
    assert not [s for s in said if "failed" in s], said
    job = await (await conn.execute("SELECT status, skip_reason, last_error FROM pgsynapse.jobs WHERE id = %s",
                                    (old,))).fetchone()
    assert job["status"] == "done" and job["skip_reason"].startswith("superseded"), job
    assert "lease expired" in job["skip_reason"] and job["last_error"] is None, job
    assert [e["superseded"] for e in logs if e["event"] == "leases_expired"] == [1], logs
    await conn.close()


def job_counters(worker) -> dict[str, dict[str, float]]:
    """The pgsynapse_jobs_{processed,failed,retried,lease_expired}_total counters a scrape of ``worker`` reads, by kind (non-zero)."""
    return {m.name: {s.labels["kind"]: s.value for s in m.samples if s.name.endswith("_total") and s.value}
            for m in WorkerCollector(worker).collect() if m.name.startswith("pgsynapse_jobs_")}


async def test_the_reapers_final_failures_and_superseded_jobs_are_counted_by_its_worker(db_url, models):
    """The reaper marks a job failed for good (its worker died on every attempt) and supersedes another (its row has
    a newer job): the metrics say "Jobs marked failed ... by this process" and "completed by this process (written,
    skipped or superseded)". Before, neither was counted (reap_expired never touched the stats)."""
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    [doomed, edited] = insert_docs(db_url, [("Doomed", "Its worker dies every time."), ("Edited", "The first text.")])
    assert len(await _claim_as(conn, DEAD)) == 2
    # every attempt used, the last one alone (crash isolation charges a solo expiry)
    await conn.execute("UPDATE pgsynapse.jobs SET solo = true, attempts = %s WHERE ref_id = %s",
                       (settings.max_attempts, doomed))
    await conn.execute("UPDATE pgsynapse.documents SET body = 'The second text.' WHERE id = %s", (edited,))
    assert len(await _claim_as(conn, "alivehost:2:alive0")) == 1  # the edit's job runs: the old one is outdated
    await _expire(conn, DEAD)
    async with stepped_worker(settings, models) as worker:
        with capture_logs() as logs:
            await worker.reap_expired()
        assert [(e["failed"], e["superseded"]) for e in logs if e["event"] == "leases_expired"] == [(1, 1)], logs
        assert (worker.stats.processed, worker.stats.failed, worker.stats.retried) == (
            {"embed": 1}, {"embed": 1}, {}), worker.stats
        assert job_counters(worker) == {"pgsynapse_jobs_processed": {"embed": 1}, "pgsynapse_jobs_failed": {"embed": 1},
                                        "pgsynapse_jobs_retried": {}, "pgsynapse_jobs_lease_expired": {}}
    rows = await (await conn.execute("SELECT ref_id, status FROM pgsynapse.jobs WHERE worker = %s OR ref_id = %s"
                                     " ORDER BY id", (DEAD, doomed))).fetchall()
    assert [(r["ref_id"], r["status"]) for r in rows] == [(doomed, "failed"), (edited, "done")], rows
    await conn.close()


async def test_a_batch_whose_load_fails_is_retried_with_backoff_not_left_to_its_lease(db_url, models):
    """The connection breaks between the claim and the load (a database restart, a terminated backend): the batch's
    jobs go back to pending with the error, to be retried after their backoff, instead of staying running until
    their lease expires (and then coming back solo, one at a time)."""
    conn = await aconn(db_url)
    docs = insert_docs(db_url, [("Vacuum", "VACUUM reclaims storage."), ("Index", "CREATE INDEX builds an index.")])
    async with stepped_worker(fast_settings(db_url, lease_seconds=600.0), models) as worker:
        jobs = await worker.claim("embed", 10)
        assert len(jobs) == 2
        # the pool's idle connection (the one the load takes next) is cut by the server
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                           " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
        with capture_logs() as logs:
            await worker.process_batch("embed", jobs)
    rows = await (await conn.execute("SELECT status, attempts, solo, last_error FROM pgsynapse.jobs ORDER BY id")).fetchall()
    assert [(r["status"], r["attempts"], r["solo"]) for r in rows] == [("pending", 1, False)] * 2, rows
    assert all("terminating connection" in r["last_error"] for r in rows), rows
    assert [e["event"] for e in logs if e["log_level"] == "warning"].count("job_retry_scheduled") == 2, logs
    async with running_worker(fast_settings(db_url), models):
        await wait_until(conn, "SELECT count(*) = 2 FROM pgsynapse.documents WHERE status = 'embedded'"
                               " AND id = ANY(%s)", (docs,))
    await conn.close()


async def test_jobs_gathered_before_a_claim_fails_stay_in_their_batch(db_url, models):
    """Micro-batching claims more jobs while another batch computes; one of those claims fails (the server cut the
    connection): the jobs the earlier claims took are processed with the batch, not dropped from the worker's view
    and left running, their leases renewed by no one, until they expire and come back one at a time."""
    conn = await aconn(db_url)
    docs = insert_docs(db_url, [(f"Doc {i}", f"Document {i} is about vacuum and dead tuples.") for i in range(3)])
    async with stepped_worker(fast_settings(db_url, lease_seconds=600.0, batch_size=10), models) as worker:
        first = await worker.claim("embed", 1)
        claim = worker.claim

        async def claim_then_cut(kind: str, limit: int) -> list:
            jobs = await claim(kind, limit)
            # the pool's connection, idle again, is cut by the server: the next claim fails
            await conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE backend_type ="
                               " 'client backend' AND datname = current_database() AND pid <> pg_backend_pid()")
            return jobs

        worker.claim = claim_then_cut  # type: ignore[method-assign]
        # another batch of the kind computes, and each wait for it ends at once: gather claims again and again
        worker._computing["embed"] += 1
        worker._compute_done["embed"].set()
        batch = Batch("embed", first, deadline=time.monotonic() + 600)
        with capture_logs() as logs:
            await worker._run_batch(worker.handlers["embed"], batch, LoopState())
    rows = await (await conn.execute("SELECT status FROM pgsynapse.jobs ORDER BY id")).fetchall()
    assert "claim_failed" in [e["event"] for e in logs], logs
    # none left running: all three were the batch's (done, or pending for a retry when its load met a cut connection)
    assert len(rows) == 3 and {r["status"] for r in rows} <= {"done", "pending"}, rows
    async with running_worker(fast_settings(db_url), models):
        await wait_until(conn, "SELECT count(*) = 3 FROM pgsynapse.documents WHERE status = 'embedded' AND id = ANY(%s)",
                         (docs,))
    await conn.close()


async def test_the_reapers_requeues_are_counted_by_its_worker(db_url, models):
    """A job whose worker died goes back to the queue (lease expired, attempts left): no counter said so, so a worker
    that dies and restarts over and over (an OOM kill mid-batch) showed on no graph; jobs_retried counts failed
    attempts, not these. Now pgsynapse_jobs_lease_expired counts them, by kind, in the worker that requeued them, a
    kind it does not take included (the dead worker's)."""
    conn = await aconn(db_url)
    insert_docs(db_url, [("Orphan", "Its worker died once.")])
    assert len(await _claim_as(conn, DEAD)) == 1
    await conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id, status, attempts, worker, lease_until) VALUES"
                       " ('retrain', 0, 'running', 1, %s, now())", (DEAD,))
    await _expire(conn, DEAD)
    async with stepped_worker(fast_settings(db_url, kinds=("embed",)), models) as worker:
        await worker.reap_expired()
        assert (worker.stats.lease_expired, worker.stats.retried) == ({"embed": 1, "retrain": 1}, {}), worker.stats
        assert job_counters(worker)["pgsynapse_jobs_lease_expired"] == {"embed": 1, "retrain": 1}
    rows = await (await conn.execute("SELECT kind, status FROM pgsynapse.jobs ORDER BY id")).fetchall()
    assert [(r["kind"], r["status"]) for r in rows] == [("embed", "pending"), ("retrain", "pending")], rows
    await conn.close()


def _handlers() -> list[Handler]:
    """The handlers alive in this process."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, Handler)]


async def test_the_reaper_builds_no_handler_for_a_kind_its_worker_does_not_take(db_url, models):
    """The lease reaper built a handler (an answer handler: its answer cache, rankers, read replica) for each kind
    of the jobs it reaped that its worker does not take, only to call the row SQL of its record_failure and
    record_retry, and no stop ever closed it. Those write the row alone: they need no handler built."""
    conn = await aconn(db_url)
    [question] = await (await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('What does VACUUM do?')"
                                           " RETURNING id")).fetchall()
    assert len(await _claim_as(conn, DEAD, "answer")) == 1
    # its last attempt, run alone (crash isolation charges it the expiry)
    await conn.execute("UPDATE pgsynapse.jobs SET attempts = 3, solo = true WHERE worker = %s", (DEAD,))
    await _expire(conn, DEAD)
    async with stepped_worker(fast_settings(db_url, kinds=("embed",), max_attempts=3), models) as worker:
        before = _handlers()
        await worker.reap_expired()
        # the dead worker's question is failed on its row, as an answer worker would fail it
        row = await (await conn.execute("SELECT status, error FROM pgsynapse.questions WHERE id = %s",
                                        (question["id"],))).fetchone()
        assert row["status"] == "failed" and row["error"], row
        assert worker.stats.failed == {"answer": 1}, worker.stats
        made = [h for h in _handlers() if h not in before]
        assert not made, f"the reaper built {[type(h).__name__ for h in made]} for kinds its worker does not take"
    await conn.close()


async def test_a_stop_ends_a_claim_that_waits_on_a_lock(db_url, models):
    """A claim waiting on a lock of the jobs table (an operator's LOCK TABLE, a long DDL) went on waiting after a
    stop until the lock was granted: `ask --timeout 1.5` and `sql-ask` never returned (their in-process worker's
    stop waited for its claim), and a SIGTERM waited for systemd's kill. A stop now ends the claim; a job claimed
    meanwhile would keep its lease and come back with it."""
    worker = Worker(fast_settings(db_url, kinds=("embed",)), db_url, models=models)
    conn = await aconn(db_url)
    locker = await aconn(db_url)
    try:
        stopped = anyio.Event()

        async def run(*, task_status) -> None:
            await worker.run(task_status=task_status, handle_signals=False)
            stopped.set()

        async with anyio.create_task_group() as tg:
            await tg.start(run)
            async with locker.transaction():
                await locker.execute("LOCK TABLE pgsynapse.jobs IN EXCLUSIVE MODE")
                await conn.execute("SELECT pg_notify('pgsynapse_jobs', '{\"kind\": \"embed\", \"n\": 1}')")
                await wait_until(conn, "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database()"
                                       " AND wait_event_type = 'Lock' AND query LIKE '%%pgsynapse.jobs%%'")
                worker.request_stop()
                with anyio.fail_after(20):  # the lock is still held: on main the stop waited for it
                    await stopped.wait()
    finally:
        await conn.close()
        await locker.close()


async def test_a_stop_lets_the_maintenance_step_in_flight_finish(db_url, models, caplog):
    """Once the loops had drained, the maintenance task (lease renewal, reaping, the heartbeat) was cancelled in the
    middle of its query: anyio's cancellation interrupted psycopg's own cancel request, and psycopg warned 'query
    cancellation interrupted (CancelledError): closing connection' and closed the connection (seen at SIGTERMs of
    a rolling restart on a busy host). A stop now lets the step in flight end, STOP_GRACE at most."""
    caplog.set_level(logging.WARNING, logger="psycopg")
    worker = Worker(fast_settings(db_url, kinds=("embed",), lease_seconds=1.0), db_url, models=models)  # steps 0.33 s
    conn = await aconn(db_url)
    locker = await aconn(db_url)
    try:
        stopped = anyio.Event()

        async def run(*, task_status) -> None:
            await worker.run(task_status=task_status, handle_signals=False)
            stopped.set()

        async with anyio.create_task_group() as tg:
            await tg.start(run)
            async with locker.transaction():
                await locker.execute("LOCK TABLE pgsynapse.workers IN EXCLUSIVE MODE")
                # the next heartbeat waits on the lock, in flight
                await wait_until(conn, "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database()"
                                       " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO pgsynapse.workers%%'")
                worker.request_stop()
                await anyio.wait_all_tasks_blocked()  # the loops have ended: main cancelled the heartbeat here
            with anyio.fail_after(20):
                await stopped.wait()
    finally:
        await conn.close()
        await locker.close()
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")]


async def _reap_with_partial_answer(db_url, models, kinds: tuple[str, ...], attempts: int) -> tuple[dict, dict, list]:
    """A question's answer job held by a worker that died mid-stream (its partial text on the pending row), reaped by
    a worker of ``kinds`` with the job at ``attempts``: the question's row, the job's, and the pgsynapse_answers
    payloads the reap sent."""
    settings = fast_settings(db_url, kinds=kinds)
    conn = await aconn(db_url)
    qid = (await (await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('How does VACUUM work?')"
                                     " RETURNING id")).fetchone())["id"]
    [job] = await _claim_as(conn, DEAD, kind="answer")
    await conn.execute("UPDATE pgsynapse.jobs SET solo = true, attempts = %s WHERE id = %s", (attempts, job))
    await conn.execute("UPDATE pgsynapse.questions SET answer = 'VACUUM reclaims the space of' WHERE id = %s", (qid,))
    await _expire(conn, DEAD)
    async with stepped_worker(settings, models) as worker, await aconn(db_url) as listener:
        await listener.execute("LISTEN pgsynapse_answers")
        await worker.reap_expired()
        await conn.execute("NOTIFY pgsynapse_answers, 'end'")
        said = []
        async for note in listener.notifies(timeout=WAIT):
            if note.payload == "end":
                break
            said.append(json.loads(note.payload))
    question = await (await conn.execute("SELECT status, answer, error FROM pgsynapse.questions WHERE id = %s",
                                         (qid,))).fetchone()
    job_row = await (await conn.execute("SELECT status FROM pgsynapse.jobs WHERE id = %s", (job,))).fetchone()
    await conn.close()
    return question, {**job_row, "qid": qid}, said


@pytest.mark.parametrize("kinds", [("answer",), ("embed",)], ids=["answer_worker", "other_worker"])
async def test_a_requeued_answer_job_withdraws_the_partial_answer_its_dead_worker_streamed(db_url, models, kinds):
    """A worker SIGKILLed mid-stream left its partial text on the pending question: when its lease expired and the
    job went back to the queue, the text stayed (a reader took it for the answer so far) until the retry's stream
    overwrote it, and no `retrying` NOTIFY told a client showing the pieces to drop them, as the error-retry path
    does. Whichever worker reaps the job (one that takes no answer jobs included)."""
    question, job, said = await _reap_with_partial_answer(db_url, models, kinds, attempts=1)
    assert job["status"] == "pending", job
    assert (question["status"], question["answer"]) == ("pending", None), question
    assert said == [{"id": job["qid"], "status": "retrying"}], said


@pytest.mark.parametrize("kinds", [("answer",), ("embed",)], ids=["answer_worker", "other_worker"])
async def test_an_answer_job_out_of_attempts_on_lease_expiry_fails_its_question(db_url, models, kinds):
    """The job's worker died on its last attempt: the question is failed with the lease error, its partial text gone
    and a `failed` NOTIFY sent, whichever worker reaps it (one that takes no answer jobs left the question pending
    for ever, its partial text on it, and a waiting client to its timeout)."""
    question, job, said = await _reap_with_partial_answer(db_url, models, kinds, attempts=3)
    assert job["status"] == "failed", job
    assert (question["status"], question["answer"]) == ("failed", None), question
    assert "lease expired" in question["error"], question
    assert said == [{"id": job["qid"], "status": "failed"}], said


async def test_a_job_out_of_attempts_on_lease_expiry_whose_row_was_deleted_is_closed_not_failed(db_url, models):
    """The worker died on the job's last attempt, and its row was deleted meanwhile: the reaper marked the job failed
    (an alert, a `retry-failed` that requeues a job for nothing), where a job that fails for good after its row was
    removed is closed as done everywhere else (close_job_of_removed_row, the DELETE and TRUNCATE triggers)."""
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    [doc, kept] = insert_docs(db_url, [("Gone", "Deleted while its worker was dead."), ("Kept", "Still there.")])
    assert len(await _claim_as(conn, DEAD)) == 2
    await conn.execute("UPDATE pgsynapse.jobs SET solo = true, attempts = %s", (settings.max_attempts,))
    await conn.execute("DELETE FROM pgsynapse.documents WHERE id = %s", (doc,))
    await _expire(conn, DEAD)
    async with stepped_worker(settings, models) as worker:
        with capture_logs() as logs:
            await worker.reap_expired()
        assert (worker.stats.processed, worker.stats.failed) == ({"embed": 1}, {"embed": 1}), worker.stats
    rows = {r["ref_id"]: r for r in await (await conn.execute(
        "SELECT ref_id, status, skip_reason, last_error FROM pgsynapse.jobs")).fetchall()}
    assert (rows[doc]["status"], rows[doc]["skip_reason"], rows[doc]["last_error"]) == (
        "done", "its row was deleted", None), rows
    assert rows[kept]["status"] == "failed", rows  # its row is there: failed as before
    [removed] = [e for e in logs if e["event"] == "job_failure_of_removed_row"]
    assert removed["ref"] == doc and "lease expired" in removed["error"], removed
    assert [(e["failed"], e["removed"]) for e in logs if e["event"] == "leases_expired"] == [(1, 1)], logs
    await conn.close()
