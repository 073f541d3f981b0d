"""pgsynapse through a real PgBouncer in transaction pooling mode, the LISTEN on a direct URL (listen_url).

Skips when no ``pgbouncer`` binary is installed (Debian: ``apt-get install pgbouncer``; .ci/run installs it).
The worker test fails on the two session-state mistakes it is about (both tried): with the LISTEN on the pooled
URL the question's NOTIFY never arrives (AnswerTimeout), and with prepared statements on the worker's pool
psycopg warns 'prepared statement "_pg3_0" already exists'.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.client import Client
from pgsynapse.db import NO_PREPARE, runtime_export
from pgsynapse.export import optimise_active_version
from pgsynapse.handlers.answer import AnswerHandler
from pgsynapse.handlers.embed import EmbedHandler
from pgsynapse.migrate import _LOCK_KEY, migrate
from tests.helpers import aconn, fast_settings, running_worker, wait_until
from tests.pgbouncer import BINARY, PgBouncer

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(BINARY is None, reason="no pgbouncer binary (Debian: apt-get install pgbouncer; .ci/run "
                                              "installs it)"),
]

WAIT = 120.0  # safety net only


@pytest.fixture(scope="module")
def pgbouncer(pg_url):
    bouncer = PgBouncer(pg_url, pool_size=2).start()
    yield bouncer
    bouncer.stop()


async def test_worker_through_transaction_pooling_with_a_direct_listen_url(pgbouncer, db_url, models, caplog):
    caplog.set_level(logging.WARNING, logger="psycopg")
    pooled = pgbouncer.url(db_url)
    dbname = conninfo_to_dict(db_url)["dbname"]
    # no fallback poll within the test: a job is picked up only when the LISTEN (direct) hears its NOTIFY
    settings = fast_settings(pooled, listen_url=db_url, kinds=("embed", "answer"), poll_interval=3600.0)

    class FailsOnce(EmbedHandler):
        failed = False

        def compute(self, work):
            if not FailsOnce.failed:
                FailsOnce.failed = True
                raise RuntimeError("injected failure: the first embed batch fails")
            return super().compute(work)

    handlers = {"embed": FailsOnce(settings, models), "answer": AnswerHandler(settings, models)}
    direct = await aconn(db_url)
    with capture_logs() as logs:
        async with running_worker(settings, models, handlers=handlers) as worker:
            assert worker.listener.connected
            async with worker.pool.connection() as c:
                assert c.info.port == pgbouncer.port and c.prepare_threshold is None
            # the application writes through the pooler too
            app = await psycopg.AsyncConnection.connect(pooled, autocommit=True, **NO_PREPARE)
            cur = await app.execute(
                "INSERT INTO pgsynapse.documents (title, body) VALUES (%s, %s), (%s, %s) RETURNING id",
                ("Vacuum", "VACUUM reclaims storage occupied by dead tuples. Run it regularly on busy tables.",
                 "JSON", "The jsonb type stores JSON documents in a decomposed binary format."))
            ids = [r[0] for r in await cur.fetchall()]
            await wait_until(direct, "SELECT count(*) = 2 FROM pgsynapse.documents WHERE status = 'embedded'"
                             " AND id = ANY(%s)", (ids,), timeout=WAIT)
            # the injected failure was retried: every job of that batch took a second attempt
            jobs = await (await direct.execute(
                "SELECT status, attempts, last_error FROM pgsynapse.jobs WHERE kind = 'embed' AND ref_id = ANY(%s)",
                (ids,))).fetchall()
            assert FailsOnce.failed and {j["status"] for j in jobs} == {"done"}
            assert max(j["attempts"] for j in jobs) == 2, jobs

            # a question asked through the pooler; its answer's NOTIFY arrives on the client's direct LISTEN
            async with Client(pooled, listen_url=db_url) as client:
                client.recheck_seconds = 3600.0  # no re-read of the row while waiting: only the NOTIFY ends the wait
                result = await client.ask("how do I reclaim space from dead tuples?", timeout=WAIT)
            assert result.status == "answered", result
            assert result.sources and result.sources[0]["document_id"] == ids[0]
            await app.close()
            assert worker.stats.fallback_polls == 0
    assert not [e for e in logs if e["event"] == "listen_through_pooler"]  # its LISTEN is on a direct connection
    await direct.close()
    # session state through the pooler shows here first: the worker survives it (a connection that fails is
    # replaced, a failed claim retried) but the pool and psycopg warn; with prepared statements on the pooled
    # connections: 'prepared statement "_pg3_0" already exists' and a run four times as long
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")]
    stats = pgbouncer.stats(dbname)
    assert stats and int(stats["total_xact_count"]) > 10, stats  # the claims and writes went through the pooler


async def test_a_worker_whose_listen_goes_through_the_pooler_says_so(pgbouncer, db_url, models):
    """No listen_url: the LISTEN goes through the transaction pooler, which drops it with its server connection.
    The worker cannot hear that, but it can see that its connection is not a session of its own (the pooler's
    made-up backend pid): it says what it loses and what to set."""
    pooled = pgbouncer.url(db_url)
    with capture_logs() as logs:
        async with running_worker(fast_settings(db_url, kinds=("embed",)), models) as worker:
            assert worker.listener.connected
    assert not [e for e in logs if e["event"] == "listen_through_pooler"]  # direct, no listen_url: nothing to say
    with capture_logs() as logs:
        async with running_worker(fast_settings(pooled, kinds=("embed",)), models) as worker:
            assert worker.listener.connected
    said = [e for e in logs if e["event"] == "listen_through_pooler"]
    assert len(said) == 1, [e["event"] for e in logs]
    assert said[0]["log_level"] == "warning"
    assert "PGSYNAPSE_LISTEN_URL" in said[0]["fix"] and "poll_interval" in said[0]["effect"], said[0]
    assert said[0]["client_backend_pid"] != said[0]["server_backend_pid"]


async def test_a_client_whose_listen_goes_through_the_pooler_says_so(pgbouncer, db_url):
    """`pgsynapse ask` / Client on a transaction pooler with no listen_url: its LISTEN went back to the pool, the
    answer's NOTIFY never came, and the ask found its answer only at its re-check (5 s), without a word. It says
    so now, once, as the worker does (listen_through_pooler)."""
    pooled = pgbouncer.url(db_url)
    with capture_logs() as logs:
        async with Client(db_url):
            pass
        async with Client(pooled, listen_url=db_url):  # the LISTEN direct, as documented: nothing to say
            pass
    assert not [e for e in logs if e["event"] == "client_listen_through_pooler"], logs
    with capture_logs() as logs:
        for _ in range(2):  # said once, not at every Client (an application may open one per request)
            async with Client(pooled) as client:
                assert client.recheck_seconds == 5.0
    said = [e for e in logs if e["event"] == "client_listen_through_pooler"]
    assert len(said) == 1, [e["event"] for e in logs]
    assert said[0]["log_level"] == "warning"
    assert said[0]["client_backend_pid"] != said[0]["server_backend_pid"], said[0]
    assert "listen_url" in said[0]["fix"] and "PGSYNAPSE_LISTEN_URL" in said[0]["fix"], said[0]
    assert "5.0 s" in said[0]["effect"], said[0]


def test_prepared_statements_break_through_transaction_pooling(pg_url, db_url):
    """What NO_PREPARE avoids, shown on the same PgBouncer (1.18 has no prepared statement support): two clients
    that prepare share the one server connection, and the second one's statement name collides."""
    bouncer = PgBouncer(pg_url, pool_size=1).start()
    try:
        url = bouncer.url(db_url)
        with psycopg.connect(url, autocommit=True, prepare_threshold=0) as a, \
                psycopg.connect(url, autocommit=True, prepare_threshold=0) as b:
            a.execute("SELECT 1")  # prepared on the server as _pg3_0
            with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
                b.execute("SELECT 2")  # b's first prepared statement has the same name, on the same server connection
        # the way pgsynapse connects: nothing prepared, any number of clients on one server connection
        with psycopg.connect(url, autocommit=True, **NO_PREPARE) as a, \
                psycopg.connect(url, autocommit=True, **NO_PREPARE) as b:
            for i in range(10):
                assert a.execute("SELECT %s::int", (i,)).fetchone() == (i,)
                assert b.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
    finally:
        bouncer.stop()


def test_migrate_through_transaction_pooling_leaves_no_lock_behind(pg_url, db_url):
    """`migrate` (a worker's start too) through a transaction pooler with no listen_url took its session advisory
    lock on one server connection and unlocked on another (pg_advisory_unlock: false), whenever another client
    had the first one by then: the pooled server session kept the lock, and the next `migrate` or worker start
    waited for ever. Here a second client takes the first server connection in between, as busy pools do."""
    bouncer = PgBouncer(pg_url, pool_size=2).start()
    try:
        pooled = bouncer.url(db_url)
        dbname = conninfo_to_dict(db_url)["dbname"]
        held = ("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid::bigint = %s"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
        blocked = ("SELECT EXISTS (SELECT FROM pg_locks WHERE NOT granted"
                   " AND relation = 'public.pgsynapse_migrations'::regclass)")
        results: list[list[str]] = []
        with psycopg.connect(db_url, autocommit=True) as direct, \
                psycopg.connect(pooled, **NO_PREPARE) as first, psycopg.connect(pooled, **NO_PREPARE) as second:
            first.execute("SELECT 1")  # its open transaction holds one of the two server connections
            with direct.transaction():
                # migrate's read of its table waits here, on the other server connection, lock already taken
                direct.execute("LOCK TABLE public.pgsynapse_migrations IN ACCESS EXCLUSIVE MODE")
                run = threading.Thread(target=lambda: results.append(migrate(pooled)))
                run.start()
                _until(lambda: direct.execute(blocked).fetchone()[0], run)
                # a client waiting for a server connection gets migrate's, as soon as migrate lets it go
                other = threading.Thread(target=lambda: second.execute("SELECT 1"))
                other.start()
                _until(lambda: bouncer.waiting_clients(dbname) > 0, other)
            other.join(WAIT)
            assert not other.is_alive()
            first.commit()  # migrate goes on on the first client's server connection
            run.join(WAIT)
            assert results == [[]]
            second.commit()
            assert direct.execute(held, (_LOCK_KEY,)).fetchall() == []  # main: the lock held by a pooled session
            again = threading.Thread(target=lambda: results.append(migrate(pooled)))
            again.start()
            again.join(WAIT)
            assert not again.is_alive() and results == [[], []]
    finally:
        bouncer.stop()


def test_the_runtime_export_through_transaction_pooling_leaves_no_lock_behind(pgbouncer, db_url):
    """Every worker start takes the runtime export lock (optimise_active_version), also with nothing to export.
    Through a transaction pooler with no listen_url it was a session lock: the pooled server connection kept it
    once the start's client had gone, and the next start whose try landed on another server connection waited
    in runtime_export_waiting for as long as that one lived."""
    pooled = pgbouncer.url(db_url)
    for _ in range(2):  # nothing to export (torch), the lock taken and let go each time
        assert optimise_active_version(fast_settings(pooled), pooled) is None
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as direct:
            state = runtime_export(direct)
        assert (state["exporting"], state["waiting"]) == (0, 0), state  # main: (1, 0), held by a pooled session


def _until(done, thread: threading.Thread) -> None:
    """Poll ``done()`` (a lock wait and a pooler's queue send no event) while ``thread`` runs; a safety net."""
    deadline = time.monotonic() + WAIT
    while not done():
        assert time.monotonic() < deadline, "timed out"
        thread.join(0.05)


def test_the_pooler_dies_with_the_test_process(pg_url):
    """A test run killed outright (CI's timeout, a kill -9) must not leave a pgbouncer running, as it leaves no
    worker: the pooler gets the parent-death signal, armed after it drops root (a change of user clears it)."""
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tests.pgbouncer import PgBouncer;"
         " b = PgBouncer(sys.argv[1]).start(); print(b.proc.pid, flush=True); sys.stdin.read()", pg_url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).parent.parent.parent))
    pid = None
    try:
        assert owner.stdout is not None
        pid = int(owner.stdout.readline())
        pidfd = os.pidfd_open(pid)
        try:
            owner.kill()
            owner.wait(30)
            gone, _, _ = select.select([pidfd], [], [], 30.0)  # readable once the process has exited
        finally:
            os.close(pidfd)
        assert gone, f"pgbouncer {pid} outlived the process that started it"
    finally:
        if owner.poll() is None:
            owner.kill()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
