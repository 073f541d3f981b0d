"""Real worker processes: two on one database, SIGKILL mid-batch, SIGTERM drain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from pgsynapse.cli import main
from pgsynapse.learning.cli import queue_retrain
from pgsynapse.migrate import available, migrate
from pgsynapse.queries import q
from pgsynapse.status import render, snapshot
from tests.e2e.test_learning import _helpful_feedback, _pages
from tests.helpers import (SAFETY_TIMEOUT, aconn, adopt_runtime, fast_settings, free_port, http_get, insert_docs,
                           running_worker, spawn_worker, wait_until, with_db)

pytestmark = pytest.mark.anyio

MODULES_WORKER = Path(__file__).resolve().parents[1] / "modules_worker.py"  # `pgsynapse` with an exit handler

ALL_DONE = "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'"

EXACTLY_ONCE = """
SELECT
  (SELECT count(*) FROM pgsynapse.documents WHERE status <> 'embedded') AS not_embedded,
  (SELECT count(*) FROM pgsynapse.jobs WHERE status <> 'done') AS jobs_not_done,
  (SELECT count(*) FROM pgsynapse.jobs WHERE completions > 1) AS jobs_done_twice,
  (SELECT count(*) FROM pgsynapse.documents d WHERE NOT EXISTS
      (SELECT 1 FROM pgsynapse.chunks c WHERE c.document_id = d.id)) AS docs_without_chunks,
  (SELECT count(*) FROM (SELECT document_id, ord FROM pgsynapse.chunks GROUP BY 1, 2 HAVING count(*) > 1) x) AS dup_chunks,
  (SELECT count(*) FROM pgsynapse.chunks c WHERE (SELECT count(*) FROM pgsynapse.embeddings e
      WHERE e.chunk_id = c.id) <> 1) AS chunks_not_once
"""
CLEAN = {"not_embedded": 0, "jobs_not_done": 0, "jobs_done_twice": 0, "docs_without_chunks": 0,
         "dup_chunks": 0, "chunks_not_once": 0}


def _docs(n: int, words: int = 60) -> list[tuple[str, str]]:
    return [(f"Doc {i}", " ".join(f"word{(i * 7 + k) % 997}" for k in range(words)) + f" end of document {i}.")
            for i in range(n)]


async def _retrain_queued(db_url: str, models) -> int | None:
    """Four docs pages embedded, helpful feedback on each, and a retrain queued: its job id."""
    pages = _pages()[:4]
    conn = await aconn(db_url)
    await conn.execute(
        "INSERT INTO pgsynapse.documents (source, title, body) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])",
        ([p["id"] for p in pages], [p["title"] for p in pages], [p["text"] for p in pages]))
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status <> 'embedded'")
    await _helpful_feedback(conn, pages)
    await conn.close()
    with psycopg.connect(db_url, autocommit=True) as c:
        return queue_retrain(c)


@pytest.fixture
def shipped_url(db_url: str, shipped) -> str:
    """The flow tests' workers run what ships: the default runtime (tests/conftest.py pins torch elsewhere)."""
    shipped(db_url)
    return db_url


async def test_two_workers_process_every_job_exactly_once(shipped_url):
    db_url = shipped_url
    env = {"PGSYNAPSE_BATCH_SIZE": "8"}
    workers = [spawn_worker(db_url, env=env), spawn_worker(db_url, env=env)]
    try:
        # 8 batches: both workers, started before the INSERT and woken by its NOTIFY, claim some (each worker claims
        # two batches at most before it has written one: its two loops)
        insert_docs(db_url, _docs(64))
        conn = await aconn(db_url)
        await wait_until(conn, ALL_DONE)
        assert await (await conn.execute(EXACTLY_ONCE)).fetchone() == CLEAN
        per_worker = await (await conn.execute(
            "SELECT split_part(worker, ':', 2) AS pid, count(*) AS n FROM pgsynapse.jobs GROUP BY 1")).fetchall()
        # both took part: the claim query shared the queue between them
        assert len(per_worker) == 2 and all(r["n"] > 0 for r in per_worker), per_worker
        await conn.close()
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [0, 0]


async def test_sigkill_mid_batch_then_restart_embeds_everything_once(shipped_url):
    db_url = shipped_url
    env = {"PGSYNAPSE_BATCH_SIZE": "16", "PGSYNAPSE_LEASE_SECONDS": "2"}
    conn = await aconn(db_url)
    worker = spawn_worker(db_url, env=env)
    insert_docs(db_url, _docs(48, words=150))  # 3 batches, ~96 chunks: the first worker dies after a batch, mid-run
    # kill while a batch is in flight: some documents done, some jobs running (each batch's commit notifies)
    await wait_until(conn, "SELECT (SELECT count(*) >= 16 FROM pgsynapse.documents WHERE status = 'embedded')"
                           " AND EXISTS (SELECT FROM pgsynapse.jobs WHERE status = 'running')")
    with psycopg.connect(db_url, row_factory=dict_row) as c:
        [seen] = snapshot(c)["workers"]
        assert seen["connected"] and "GONE" not in render(snapshot(c))
    worker.proc.send_signal(signal.SIGKILL)
    assert worker.proc.wait(30) == -signal.SIGKILL
    # status says so as soon as its server backend has ended (it reads the closed socket at once), not only once
    # its heartbeat is 120 s old
    await wait_until(conn, "SELECT NOT connected FROM (" + q("workers_seen").rstrip().rstrip(";") + ") w"
                           " WHERE worker_id = %s", (seen["worker_id"],), channel="pgsynapse_jobs")
    with psycopg.connect(db_url, row_factory=dict_row) as c:
        text = render(snapshot(c))
    assert f"{seen['host']}:{seen['pid']}" in text and "GONE: its connection closed (killed?)" in text, text
    left = await (await conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'running') AS running, count(*) FILTER (WHERE status = 'pending') AS pending"
        " FROM pgsynapse.jobs")).fetchone()
    assert left["running"] + left["pending"] > 0
    restarted = spawn_worker(db_url, env=env)
    try:
        await wait_until(conn, ALL_DONE)
        assert await (await conn.execute(EXACTLY_ONCE)).fetchone() == CLEAN
    finally:
        assert restarted.stop() == 0
    await conn.close()


async def test_sigterm_drains_in_flight_batches_and_exits_zero(shipped_url):
    db_url = shipped_url
    conn = await aconn(db_url)
    worker = spawn_worker(db_url, env={"PGSYNAPSE_BATCH_SIZE": "32"})
    insert_docs(db_url, _docs(400, words=150))
    await wait_until(conn, "SELECT count(*) > 0 FROM pgsynapse.jobs WHERE status = 'running'", channel="pgsynapse_jobs")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(120) == 0
    stopped = worker.wait_event("worker_stopped")
    row = await (await conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'running') AS running,"
        " count(*) FILTER (WHERE status = 'done') AS done,"
        " count(*) FILTER (WHERE status = 'pending') AS pending FROM pgsynapse.jobs")).fetchone()
    assert row["running"] == 0  # nothing left leased
    assert row["done"] >= 1 and row["done"] == stopped["processed"]["embed"]
    assert row["pending"] == 400 - row["done"]  # the rest wait, untouched, for the next worker
    await conn.close()


async def test_a_stopped_worker_ends_its_process_at_once_after_the_exit_handlers(db_url):
    """After its drain and its last event, a stopped worker's process spent seconds in the interpreter's teardown
    (2 to 4.5 s with torch loaded on a loaded 2-core host, CPU in garbage collections and freeing the models),
    past systemd's or a container runtime's stop timeout. It ends at once now (pgsynapse/exiting.py), once no
    non-daemon thread is left, after the exit handlers: the entry's own (tests/modules_worker.py) still runs."""
    worker = spawn_worker(db_url, entry=[str(MODULES_WORKER)])
    insert_docs(db_url, _docs(3))
    conn = await aconn(db_url)
    await wait_until(conn, ALL_DONE)
    await conn.close()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(120) == 0, worker.tail()
    exiting = worker.wait_event("process_exiting")  # main: RuntimeError, worker exited before 'process_exiting'
    assert (exiting["code"], exiting["fast"], exiting["waits_for_threads"]) == (0, True, []), exiting
    order = [e["event"] for e in worker.events]
    assert order.index("worker_stopped") < order.index("process_exiting") < order.index("modules_at_exit"), order
    assert worker.wait_event("process_exited") == worker.events[-1]


async def test_sigterm_while_the_database_is_down_claims_nothing_more(shipped_url):
    """SIGTERM during a database outage, nothing in flight: the stopped worker went on claiming (each claim waits 30 s
    for a pool connection, the loops of a kind one after another, then its idle poll's query) and exited 86 s later,
    near TimeoutStopSec=120. Stopped, it starts no claim: only those already waiting at the signal run out.
    Meanwhile /healthz says why the database cannot be used (it said "TimeoutError": the pool's wait, not the cause).
    The pool's wait is pool_timeout_seconds (6 s here, not the default 30 s: the outage's first claim_failed, which
    the test waits for, comes after it). The worker runs what ships (the default runtime: it starts in seconds, where
    the tests' torch pin loads sentence-transformers first)."""
    db_url = shipped_url
    port = free_port()
    pool_timeout = 6
    worker = spawn_worker(db_url, env={"PGSYNAPSE_POLL_INTERVAL": "1", "PGSYNAPSE_METRICS_PORT": str(port),
                                       "PGSYNAPSE_POOL_TIMEOUT_SECONDS": str(pool_timeout)})
    # the service answers /healthz from READY=1 on; until then the start's own answer ("starting") does, which the
    # fresh-clone run got here once under load (the outage began between worker_started and service_ready)
    worker.wait_event("service_ready")
    conn = await aconn(with_db(db_url, "postgres"))
    name = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    db = sql.Identifier(name)
    try:
        # the outage: no new connection to the database, the worker's own ones ended
        await conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(db))
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        failed = worker.wait_event("claim_failed")  # its loops wait on the pool, one claim after another
        while not failed["error"].startswith("couldn't get a connection"):  # a claim its termination cut
            failed = worker.wait_event("claim_failed", start=worker.events.index(failed) + 1)
        assert failed["error"] == f"couldn't get a connection after {pool_timeout:.2f} sec", failed
        code, body = http_get(f"http://127.0.0.1:{port}/healthz")
        health = json.loads(body)
        assert code == 503 and health["status"] == "unhealthy" and not health["db_reachable"], health
        assert f'database "{name}" is not currently accepting connections' in health["db_error"], health
        mark = len(worker.events)
        worker.proc.send_signal(signal.SIGTERM)
        worker.wait_event("signal_received", start=mark)
        signalled = time.monotonic()
        assert worker.proc.wait(SAFETY_TIMEOUT) == 0
        took = time.monotonic() - signalled
        # the claims waiting at the signal give up after the pool's wait at most, the maintenance step in flight
        # after STOP_GRACE (3 s), the deregistration after 5 s; 4 s more for a loaded host, less than one more pool
        # wait: a claim started after the signal (its other loop's, the idle poll's) comes on top of the first (the
        # three guards removed: 21.4 s with a 5 s wait, 10.4 s with them, under load)
        assert took < pool_timeout + 3 + 5 + 4, (round(took, 1), worker.tail())
        # and none claims again: a loop's claim fails once at most after the signal (two loops of a kind at most)
        after = Counter(e["kind"] for e in worker.events[mark:] if e["event"] == "claim_failed")
        assert all(n <= 2 for n in after.values()), (after, worker.tail())
    finally:
        await conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(db))
        worker.stop()
        await conn.close()


async def test_sigterm_abandons_a_runtime_export_and_the_next_start_redoes_it(db_url, default_runtime, tmp_path):
    """A candidate's export to ONNX INT8 takes minutes on a small host: SIGTERM does not wait for it (nor let it
    go on after worker_stopped), removes its partial artifact and leaves the version waiting for its export."""
    adopt_runtime(db_url, default_runtime)  # version 1 as a fresh install leaves it: nothing to export at start
    with psycopg.connect(db_url, autocommit=True) as conn:
        candidate = conn.execute(q("register_version", "learning.sql"), {
            "name": "fine-tuned", "base": 1, "passage": None, "path": None, "dim": 384, "metrics": json.dumps({}),
            "status": "candidate"}).fetchone()[0]
    worker = spawn_worker(db_url, env={"PGSYNAPSE_RUNTIME": "onnx-int8", "PGSYNAPSE_DATA_DIR": str(tmp_path),
                                       "PGSYNAPSE_EXPORT_SAMPLE_CHUNKS": "16"})
    started = worker.events.index(worker.wait_event("runtime_export_started"))
    # the export's reference model is loaded once its fp32 graph is written: its artifact directory is there
    while (loaded := worker.wait_event("model_loaded", start=started + 1)).get("runtime") != "torch":
        started = worker.events.index(loaded)
    assert [p.name for p in (tmp_path / "models").iterdir()][0].startswith(f"v{candidate}-onnx-int8-")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0
    names = [e["event"] for e in worker.events]
    abandoned = worker.wait_event("runtime_export_abandoned")
    assert abandoned["version"] == candidate and abandoned["removed"][0].startswith(str(tmp_path / "models"))
    assert names.index("runtime_export_abandoned") < names.index("worker_stopped")
    assert not {"model_exported", "runtime_switched", "runtime_export_failed"} & set(names), worker.tail()
    assert list((tmp_path / "models").iterdir()) == []  # no orphan artifact directory
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        v = conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = %s", (candidate,)).fetchone()
        events = conn.execute("SELECT count(*) AS n FROM pgsynapse.model_events WHERE model_version_id = %s",
                              (candidate,)).fetchone()["n"]
    # nothing recorded: the next start exports it (runtime_export_started picks a runtime_pending candidate)
    assert v["runtime_pending"] and v["runtime"] == "torch" and "runtime_export" not in v["metrics"] and events == 0


async def test_sigterm_abandons_a_running_retrain_and_releases_its_job_for_the_next_worker(db_url, models, tmp_path):
    """SIGTERM waited for a retrain in progress (up to retrain_budget_seconds, then as long again to evaluate), so
    systemd's TimeoutStopSec SIGKILLed the worker first and the run was lost and redone only after its lease. Now
    the trainer is stopped, the job back to pending at once without
    charging an attempt (the next worker takes it), `retrain_abandoned` logged, and the worker exits 0."""
    job = await _retrain_queued(db_url, models)
    # a long run: 20 epochs, the flow under test is its end
    worker = spawn_worker(db_url, env={"PGSYNAPSE_KINDS": "retrain", "PGSYNAPSE_DATA_DIR": str(tmp_path),
                                       "PGSYNAPSE_RETRAIN_SYNTHETIC_PAIRS": "0", "PGSYNAPSE_RETRAIN_BATCH_SIZE": "4",
                                       "PGSYNAPSE_RETRAIN_EPOCHS": "20", "PGSYNAPSE_RETRAIN_BUDGET_SECONDS": "120"})
    try:
        step = worker.wait_event("retrain_step")  # the trainer is training
        assert step["job"] == job and step["step"] < step["steps"], step
        [trainer] = [p for p in psutil.Process(worker.proc.pid).children(recursive=True)
                     if "pgsynapse.learning.train" in p.cmdline()]
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(60) == 0, worker.tail()
    finally:
        for p in psutil.Process(worker.proc.pid).children(recursive=True) if worker.proc.poll() is None else []:
            p.kill()
        worker.proc.kill()
    names = [e["event"] for e in worker.events]
    abandoned = worker.wait_event("retrain_abandoned")
    assert abandoned["job"] == job and names.index("retrain_abandoned") < names.index("worker_stopped"), names
    assert not {"retrain_finished", "retrain_registered", "job_retry_scheduled", "job_failed"} & set(names), names
    assert not trainer.is_running()
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
        row = c.execute("SELECT status, attempts, worker, lease_until, run_after <= now() AS due, last_error"
                        " FROM pgsynapse.jobs WHERE id = %s", (job,)).fetchone()
        versions = c.execute("SELECT count(*) AS n FROM pgsynapse.model_versions").fetchone()["n"]
    assert row == {"status": "pending", "attempts": 0, "worker": None, "lease_until": None, "due": True,
                   "last_error": None}, row
    assert versions == 1


async def test_a_sigkilled_worker_s_trainer_exits_at_once_not_at_its_next_progress_line(db_url, models, tmp_path):
    """A worker SIGKILLed (systemd's TimeoutStopSec, the OOM killer) left its trainer running on, for nobody, until
    its next progress line failed to write: a trainer in a long silent stretch (loading data behind a lock, encoding
    the corpus, evaluating) held its memory and CPU for minutes. Now it exits as soon as its worker is gone. The
    trainer here waits on a lock this test holds on the training examples: silent until the lock is released."""
    await _retrain_queued(db_url, models)
    worker = spawn_worker(db_url, env={"PGSYNAPSE_KINDS": "retrain", "PGSYNAPSE_DATA_DIR": str(tmp_path),
                                       "PGSYNAPSE_RETRAIN_SYNTHETIC_PAIRS": "0"})
    trainer = None
    with psycopg.connect(db_url, row_factory=dict_row) as holder:
        try:
            worker.wait_event("retrain_started")  # the trainer starts: seconds of imports before it reads anything
            holder.execute("LOCK TABLE pgsynapse.training_examples IN ACCESS EXCLUSIVE MODE")
            with psycopg.connect(db_url, autocommit=True) as watch:  # the trainer waits on the lock: silent
                blocked = ("SELECT EXISTS (SELECT FROM pg_locks WHERE NOT granted AND relation ="
                           " 'pgsynapse.training_examples'::regclass)")
                deadline = time.monotonic() + SAFETY_TIMEOUT  # a safety net: the lock's waiter ends the wait
                while not watch.execute(blocked).fetchone()[0]:
                    assert time.monotonic() < deadline, worker.tail()
                    with pytest.raises(subprocess.TimeoutExpired):  # polled: a lock's waiter sends no event
                        worker.proc.wait(0.05)  # (and the worker must not die meanwhile)
            [trainer] = [p for p in psutil.Process(worker.proc.pid).children(recursive=True)
                         if "pgsynapse.learning.train" in p.cmdline()]
            worker.proc.kill()
            worker.proc.wait(60)
            try:
                trainer.wait(30)  # a safety net: it returns as soon as the trainer exits
            except psutil.TimeoutExpired:
                pytest.fail("the trainer outlived its SIGKILLed worker by 30 s")
        finally:
            holder.rollback()
            if trainer is not None and trainer.is_running():
                trainer.kill()
            worker.proc.kill()


def test_sigterm_during_the_first_starts_export_stops_the_worker_cleanly(db_url, tmp_path):
    """The active version's export at a fresh install's first start takes minutes: a SIGTERM then (systemctl stop or
    restart, docker stop) killed the process outright, with no log line, by the signal instead of exit 0, and left
    its partial artifact directory (90 MB) behind under DATA_DIR/models, one more at each interrupted start."""
    worker = spawn_worker(db_url, env={"PGSYNAPSE_RUNTIME": "onnx-int8", "PGSYNAPSE_DATA_DIR": str(tmp_path),
                                       "PGSYNAPSE_EXPORT_SAMPLE_CHUNKS": "16"}, wait_started=False)
    started = worker.events.index(worker.wait_event("runtime_export_started"))
    # the export's reference model is loaded once its fp32 graph is written: its artifact directory is there
    while (loaded := worker.wait_event("model_loaded", start=started + 1)).get("runtime") != "torch":
        started = worker.events.index(loaded)
    assert [p.name for p in (tmp_path / "models").iterdir()][0].startswith("v1-onnx-int8-")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0, worker.tail()
    names = [e["event"] for e in worker.events]
    abandoned = worker.wait_event("runtime_export_abandoned")
    assert abandoned["removed"][0].startswith(str(tmp_path / "models"))
    assert names.index("runtime_export_abandoned") < names.index("worker_stopped")
    assert not {"worker_started", "runtime_switched", "runtime_export_failed"} & set(names), worker.tail()
    assert list((tmp_path / "models").iterdir()) == []  # no orphan artifact directory
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        v = conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = 1").fetchone()
    # nothing recorded: the next start exports it
    assert v["runtime"] == "torch" and "runtime_export" not in v["metrics"], v


def test_bad_model_path_stops_start_up_with_a_clear_error(db_url):
    w = spawn_worker(db_url, env={"PGSYNAPSE_MODEL_PATH": "/nonexistent/model"}, wait_started=False)
    assert w.proc.wait(60) == 78
    w.wait_event("process_exited")
    assert w.fatal_errors() == ["model path does not exist: /nonexistent/model"]


def test_database_without_pgvector_schema_is_refused(new_db):
    url = new_db()  # empty: never migrated
    w = spawn_worker(url, wait_started=False)
    assert w.proc.wait(60) == 69
    w.wait_event("process_exited")
    [error] = w.fatal_errors()
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]  # exit 69: a worker waits for the owner's migrate
    assert error.startswith(f'database "{name}" has no pgsynapse schema: run `pgsynapse migrate` on it'), error


@pytest.mark.parametrize("command", [["status"], ["queue-notify", "show"], ["retry-failed"], ["model", "list"],
                                     ["search", "vacuum"], ["ingest", "NOTE"], ["feedback", "1", "--helpful"]])
def test_a_command_on_a_database_never_migrated_says_to_migrate(new_db, command, tmp_path, capsys):
    # a one-shot command exited 69, "retry later", for a schema that no retry makes: exit 78, naming the database
    # (`run --no-migrate` still waits for the owner's migrate: test_database_without_pgvector_schema_is_refused)
    url = new_db()  # empty: never migrated (status said "relation pgsynapse.jobs does not exist")
    (tmp_path / "note.md").write_text("A note about vacuum.\n")
    command = [str(tmp_path / "note.md") if arg == "NOTE" else arg for arg in command]
    capsys.readouterr()  # the command in this process: the exit code main() gives the process, and what it printed
    code = main(["--database-url", url, *command])
    r = capsys.readouterr()
    assert code == 78, r.err
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    assert r.err.startswith(f'pgsynapse: error: database "{name}" has no pgsynapse schema: run `pgsynapse '
                            "migrate` on it (it applies all "), r.err


def test_a_database_url_that_is_no_connection_string_stops_the_command_without_showing_it():
    # before: exit 69 and "database error: missing "=" after "mysql://u:pw-S3CRET-42@h/db" in connection info string"
    r = subprocess.run([sys.executable, "-m", "pgsynapse", "status"], capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL, env={**os.environ, "DATABASE_URL": "mysql://u:pw-S3CRET-42@h/db"})
    assert r.returncode == 78, r.stderr
    assert r.stderr.startswith("pgsynapse: error: invalid setting database_url [PGSYNAPSE_DATABASE_URL or "
                               "DATABASE_URL]: not a PostgreSQL connection string"), r.stderr
    assert "S3CRET" not in r.stderr


def test_database_a_migration_behind_is_refused_naming_what_is_missing(new_db):
    url = new_db()
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM public.pgsynapse_migrations WHERE version = (SELECT max(version)"
                     " FROM public.pgsynapse_migrations)")
    w = spawn_worker(url, wait_started=False)
    assert w.proc.wait(60) == 69
    w.wait_event("process_exited")
    [error] = w.fatal_errors()
    last = available()[-1].name
    assert f"database schema is not up to date (1 migration(s) to apply: {last}): run `pgsynapse migrate`" in error
