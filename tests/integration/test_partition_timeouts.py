"""A worker's pool connection cut off from its server (a network partition: packets dropped, no FIN, no RST) fails
within a bound its TCP settings give (keepalives, ``tcp_user_timeout``: :func:`pgsynapse.db.tcp_params`), instead of
waiting for the kernel: hours for a statement in flight, about 15 minutes for one sent into the cut. The client runs
in the partition's network namespace (tests/chaos/partition.py; needs root, skipped otherwise) with short settings:
tests/cutoff_client.py."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from psycopg_pool import AsyncConnectionPool

from pgsynapse.config import load_settings
from pgsynapse.db import pool_kwargs

from tests.chaos.partition import partition
from tests.helpers import aconn, die_with_parent, wait_until

pytestmark = pytest.mark.anyio

# short, so the bound is seconds: a waiting connection is dropped after idle + count x interval without an answer
# to the probes (Linux: once tcp_user_timeout has passed since the server was last heard, when it is set), one
# whose sent data stays unacknowledged after tcp_user_timeout
TCP = {"PGSYNAPSE_KEEPALIVES_IDLE_SECONDS": "1", "PGSYNAPSE_KEEPALIVES_INTERVAL_SECONDS": "1",
       "PGSYNAPSE_KEEPALIVES_COUNT": "2", "PGSYNAPSE_TCP_USER_TIMEOUT_MS": "3000"}
BOUND_S = max(1 + 2 * 1, 3.0)
SLACK_S = 5.0  # a loaded 2-core machine: the probes' timers and the client's wake-up
WAIT_S = BOUND_S + SLACK_S + 15  # how long the test waits for the client to say anything (without the settings: forever)


def _reader(proc: subprocess.Popen[str]) -> queue.Queue[tuple[float, dict]]:
    out: queue.Queue[tuple[float, dict]] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                out.put((time.time(), json.loads(line)))

    threading.Thread(target=pump, daemon=True).start()
    return out


@pytest.mark.parametrize("mode", ["in_flight", "after_cut"])
async def test_pool_connection_cut_off_fails_within_its_tcp_bound(mode, db_url, pg_url):
    with partition(pg_url) as part:
        part.check(db_url)
        env = {**os.environ, **TCP}
        env.pop("DATABASE_URL", None)
        proc = subprocess.Popen([*part.exec_prefix, sys.executable, "-m", "tests.cutoff_client", part.url(db_url), mode],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=str(Path(__file__).parent.parent.parent), preexec_fn=die_with_parent())
        said = _reader(proc)
        backend = None
        conn = await aconn(db_url)
        try:
            _, ready = await anyio.to_thread.run_sync(lambda: said.get(timeout=120))
            backend = ready["ready"]
            if mode == "in_flight":  # the statement reached the server (and was acknowledged): it is sleeping
                await wait_until(conn, "SELECT wait_event = 'PgSleep' FROM pg_stat_activity WHERE pid = %s", (backend,))
            part.cut()
            if mode == "after_cut":
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            try:
                at, result = await anyio.to_thread.run_sync(lambda: said.get(timeout=WAIT_S))
            except queue.Empty:
                pytest.fail(f"{mode}: the cut-off connection neither failed nor returned within {WAIT_S:.0f} s"
                            f" (its TCP bound: {BOUND_S:.0f} s)")
            failed_after = at - part.cut_time
            assert "failed" in result, result
            assert failed_after <= BOUND_S + SLACK_S, (failed_after, result)
            print(f"{mode}: failed {failed_after:.1f} s after the cut: {result['failed']}")
        finally:
            part.heal()
            if proc.poll() is None:
                proc.kill()
            await anyio.to_thread.run_sync(proc.wait, 30)
            if backend:  # its server backend still sleeps (in_flight) or waits for the client
                await conn.execute("SELECT pg_terminate_backend(%s)", (backend,))
            await conn.close()


async def test_tcp_settings_are_accepted_on_any_server_url(db_url):
    """libpq takes the TCP options on a Unix socket too (and ignores them): the embedded server's URL is one."""
    settings = load_settings(environ=TCP, database_url=db_url)
    async with AsyncConnectionPool(db_url, min_size=1, kwargs=pool_kwargs(db_url, settings, "pgsynapse-test"),
                                   open=False) as pool:
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT inet_server_addr() IS NULL AS unix_socket")).fetchone()
    print(f"unix socket: {row['unix_socket']}")
