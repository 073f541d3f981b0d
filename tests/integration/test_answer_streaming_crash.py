"""A streamed answer's worker killed, stopped or its asker interrupted mid-stream (split from
tests/integration/test_answer_streaming.py): no partial text becomes an answer, the question is answered once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import anyio
import pytest

from pgsynapse.client import Client
from tests.helpers import WorkerProcess, aconn, fast_settings, running_worker, spawn_worker, wait_until
from tests.integration.test_answers import _corpus
from tests.integration.test_guardrails import BOMB_RULE
from tests.sse_answers import CHECKED, PIECES, SAFETY, SSE, _notifies_until_final, sse_server

pytestmark = pytest.mark.anyio

sse = pytest.fixture(sse_server, name="sse")


RETRIED = ["Roll back to the savepoint [1]. ", "Its later work is undone [1]."]  # the next worker's answer


async def test_a_worker_killed_mid_stream_leaves_no_final_answer_and_the_next_answers_once_to_every_waiter(db_url,
                                                                                                           sse):
    """SIGKILL while a block rule's checked sentences stream (after the first `streaming` NOTIFY, before the final
    one): the row stays pending, its partial text no answer; the next worker answers it once, and both an asker
    (`pgsynapse ask`) and a Client that began waiting mid-stream get the final answer, not the partial one."""
    SSE.scripts = [CHECKED, RETRIED]
    SSE.gates = gates = [threading.Event() for _ in CHECKED]  # the first stream: piece 2 waits, the kill comes first
    conn = await aconn(db_url)
    await conn.execute(BOMB_RULE)
    env = {"PGSYNAPSE_ANSWERER": "openai", "PGSYNAPSE_OPENAI_BASE_URL": sse, "PGSYNAPSE_OPENAI_MODEL": "tiny",
           "PGSYNAPSE_STREAM_INTERVAL_MS": "0", "PGSYNAPSE_LEASE_SECONDS": "2"}
    worker = spawn_worker(db_url, env=env)
    asker = None
    try:
        await _corpus(db_url)
        listener = await aconn(db_url)
        await listener.execute("LISTEN pgsynapse_answers")
        asker = subprocess.Popen([sys.executable, "-m", "pgsynapse", "--database-url", db_url, "ask",
                                  "how do I undo commands back to a savepoint?"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"})
        with anyio.fail_after(SAFETY):
            first = json.loads((await anext(listener.notifies())).payload)
        assert first == {"id": 1, "status": "streaming", "seq": 1, "offset": 0, "delta": CHECKED[0]}, first
        results = []
        async with Client(db_url) as client, anyio.create_task_group() as tg:
            async def wait_for_it():
                results.append(await client.result(1, timeout=SAFETY))

            tg.start_soon(wait_for_it)
            worker.proc.send_signal(signal.SIGKILL)
            assert worker.proc.wait(30) == -signal.SIGKILL
            for g in gates:  # the endpoint's request of the dead worker ends
                g.set()
            row = await (await conn.execute("SELECT status, answer, answered_at FROM pgsynapse.questions")).fetchone()
            assert row["status"] == "pending" and row["answered_at"] is None, row
            worker = spawn_worker(db_url, env=env)
            notes = [first, *await _notifies_until_final(listener, 1)]
        out, err = asker.communicate(timeout=SAFETY)
        final = await (await conn.execute("SELECT * FROM pgsynapse.questions WHERE id = 1")).fetchone()
        jobs = await (await conn.execute("SELECT status, completions FROM pgsynapse.jobs WHERE kind = 'answer'")
                      ).fetchall()
    finally:
        worker.stop()
        if asker is not None and asker.poll() is None:
            asker.kill()
        await conn.close()
    assert final["status"] == "answered" and final["answer"] == "".join(RETRIED), final
    assert [n["status"] for n in notes].count("answered") == 1 and notes[-1]["status"] == "answered", notes
    # its lease expired: the job went back to the queue with the partial text withdrawn (a client drops the pieces
    # shown), before the retry answered
    assert notes[1] == {"id": 1, "status": "retrying"}, notes
    assert [n["seq"] for n in notes[2:] if n["status"] == "streaming"][:1] in ([], [1]), notes  # streamed anew
    assert sum(j["completions"] for j in jobs) == 1 and {j["status"] for j in jobs} <= {"done", "superseded"}, jobs
    assert [(r.status, r.answer) for r in results] == [("answered", "".join(RETRIED))], results
    assert asker.returncode == 0, err
    # the asker printed the first stream's sentence, then the final answer as one that replaces it
    assert out.startswith(CHECKED[0].strip()) and f"--- final answer ---\n{''.join(RETRIED).strip()}\n" in out, out


async def test_sigterm_mid_stream_finishes_the_answer_then_the_worker_ends_at_once_with_nothing_leased(db_url, sse):
    """SIGTERM while an answer streams (docs/reliability.md, "SIGTERM drains"): the generation goes on to its end,
    the final answer is written and announced, no job stays leased, and the process then ends at once, exit 0
    (exiting.py's fast exit: no thread of the stream left to wait for)."""
    SSE.gates = gates = [threading.Event() for _ in PIECES]
    env = {"PGSYNAPSE_ANSWERER": "openai", "PGSYNAPSE_OPENAI_BASE_URL": sse, "PGSYNAPSE_OPENAI_MODEL": "tiny",
           "PGSYNAPSE_STREAM_INTERVAL_MS": "0"}
    worker = spawn_worker(db_url, env=env)
    conn = await aconn(db_url)
    try:
        await _corpus(db_url)
        await conn.execute("LISTEN pgsynapse_answers")
        await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('how do I undo commands back to a savepoint?')")
        with anyio.fail_after(SAFETY):
            first = json.loads((await anext(conn.notifies())).payload)
        assert first["status"] == "streaming" and first["seq"] == 1, first
        worker.proc.send_signal(signal.SIGTERM)
        worker.wait_event("signal_received")
        for g in gates:  # the rest of the answer comes only now, after the SIGTERM
            g.set()
        assert worker.proc.wait(SAFETY) == 0, worker.tail()
        row = await (await conn.execute("SELECT status, answer FROM pgsynapse.questions")).fetchone()
        jobs = await (await conn.execute("SELECT status, count(*) AS n FROM pgsynapse.jobs GROUP BY status")).fetchall()
    finally:
        worker.stop()
        await conn.close()
    assert (row["status"], row["answer"]) == ("answered", "".join(PIECES)), row
    assert {j["status"]: j["n"] for j in jobs}.keys() == {"done"}, jobs
    exiting = worker.wait_event("process_exiting")
    assert (exiting["code"], exiting["fast"]) == (0, True), exiting


def _ctrl_c_as_on_a_terminal() -> None:
    """A command started from a terminal takes SIGINT; one of a shell's background jobs (a test run started with
    `&`, as CI scripts may) inherits it ignored, and Python keeps it ignored: Ctrl-C reaches the asker as it would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_ctrl_c_on_ask_stops_its_own_workers_generation_and_puts_the_question_back_at_once(db_url, models, sse):
    """`pgsynapse ask` with no worker running answers with a worker of its own. Ctrl-C while that worker generated
    did nothing: the answer went on streaming to the terminal to its end (a second Ctrl-C too), and only then did
    the command end. Now the generation stops at its next piece, the job goes back to the queue at once (its attempt
    not charged, its partial text withdrawn with a `retrying` NOTIFY) for the next worker, and the command exits 130."""
    await _stopped_mid_answer(db_url, models, sse, signal.SIGINT, 130)


async def test_sigterm_on_ask_puts_the_question_back_at_once_as_ctrl_c_does(db_url, models, sse):
    """SIGTERM (`kill`, a CI job's timeout, systemd stopping a unit that asked) while `pgsynapse ask`'s own worker
    generated killed the command at once: its job stayed `running`, leased to a worker gone, for a lease (60 s)
    before another worker could take it, with the partial text on the row. Now it does what Ctrl-C does, and the
    command exits 143 (128 + SIGTERM, as a shell reports a command SIGTERM ended)."""
    await _stopped_mid_answer(db_url, models, sse, signal.SIGTERM, 143)


def _asker(db_url: str, sse: str, text: str = "how do I undo commands back to a savepoint?") -> WorkerProcess:
    """`pgsynapse ask` (JSON logs at info) with no worker running: its own worker answers with the SSE endpoint."""
    env = {**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"}, "PGSYNAPSE_ANSWERER": "openai",
           "PGSYNAPSE_OPENAI_BASE_URL": sse, "PGSYNAPSE_OPENAI_MODEL": "tiny", "PGSYNAPSE_STREAM_INTERVAL_MS": "0",
           "PGSYNAPSE_LOG_LEVEL": "info"}
    asker = subprocess.Popen([sys.executable, "-m", "pgsynapse", "--database-url", db_url, "--log-format", "json",
                              "ask", text], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, preexec_fn=_ctrl_c_as_on_a_terminal)
    logs = WorkerProcess(asker)
    threading.Thread(target=logs._pump, daemon=True).start()
    return logs


async def _stopped_mid_answer(db_url, models, sse, signum: int, code: int) -> None:
    """``signum`` to `pgsynapse ask` while its own worker streams: it exits ``code`` at the next piece, the question
    pending with its partial text withdrawn (a `retrying` NOTIFY), its job pending again at once, not charged."""
    SSE.gates = gates = [threading.Event() for _ in PIECES]  # each piece after the first waits for the test
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await _corpus(db_url)
    conn = await aconn(db_url)
    await conn.execute("LISTEN pgsynapse_answers")
    logs = _asker(db_url, sse)
    asker = logs.proc
    try:
        with anyio.fail_after(SAFETY):
            first = json.loads((await anext(conn.notifies())).payload)
        assert first["status"] == "streaming", first
        asker.send_signal(signum)
        logs.wait_event("worker_stopping")
        gates[0].set()  # the endpoint's next piece, once the stop was asked
        try:  # at that piece; before, it waited for the whole answer
            asker.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`pgsynapse ask` still generates 30 s after its {signal.Signals(signum).name}: {logs.tail()}")
        with anyio.fail_after(SAFETY):
            after = json.loads((await anext(conn.notifies())).payload)
        row = await (await conn.execute("SELECT status, answer FROM pgsynapse.questions")).fetchone()
        [job] = await (await conn.execute("SELECT status, attempts, lease_until FROM pgsynapse.jobs"
                                          " WHERE kind = 'answer'")).fetchall()
    finally:
        for g in gates:
            g.set()
        asker.kill()
        await conn.close()
    assert asker.returncode == code, logs.tail()
    assert after == {"id": first["id"], "status": "retrying"}, after
    assert (row["status"], row["answer"]) == ("pending", None), row
    assert job == {"status": "pending", "attempts": 0, "lease_until": None}, job


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
async def test_ctrl_c_after_ask_printed_its_answer_exits_zero(db_url, models, sse, signum):
    """Ctrl-C in the seconds after `pgsynapse ask` printed its answer (its own worker stopping) exited 130, as if
    the question had been abandoned, though its answer was shown and saved. The work is done: exit 0. A SIGTERM
    then too (it stops the command as Ctrl-C does).
    The window is held open: the worker's deregistration (the last step of its stop) waits on a lock of its
    registration row, which the test takes once the worker registered and lets go once the deregistration waits."""
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await _corpus(db_url)
    conn, locker = await aconn(db_url), await aconn(db_url)
    logs = _asker(db_url, sse)
    asker = logs.proc
    try:
        started = logs.wait_event("worker_started")
        await locker.execute("BEGIN")
        await locker.execute("SELECT 1 FROM pgsynapse.workers WHERE worker_id = %s FOR UPDATE", (started["worker"],))
        logs.wait_event("worker_stopping")  # after the answer was printed (on_result)
        asker.send_signal(signum)
        await wait_until(conn, "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                               " AND query LIKE 'DELETE FROM pgsynapse.workers%%')")
        await locker.execute("ROLLBACK")
        asker.wait(SAFETY)
        out = asker.stdout.read()
        row = await (await conn.execute("SELECT status, answer FROM pgsynapse.questions")).fetchone()
    finally:
        asker.kill()
        await locker.close()
        await conn.close()
    assert (row["status"], row["answer"]) == ("answered", "".join(PIECES)), row
    assert out.startswith("".join(PIECES)), out
    assert asker.returncode == 0, logs.tail()
