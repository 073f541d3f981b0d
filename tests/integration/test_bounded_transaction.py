"""The server ends a pgsynapse transaction whose client falls silent in it (db.bounded_transaction), and so releases
its row locks for the worker that takes the jobs over, wherever the silence starts:

- between statements: the server waits at a ReadyForQuery, where ``idle_in_transaction_session_timeout`` ends it;
- inside a statement: a cut landed while the client was sending a message (a large INSERT's parameters, in the
  extended protocol: Parse arrived whole, Bind in part). The server is 'active', reading the rest of the message;
  no idle timeout is armed there and ``statement_timeout`` has not started, so only ``transaction_timeout``
  (PostgreSQL 17+) ends it. Seen in tests/chaos/test_chaos_partition.py under load: B could not take over A's jobs
  because A's backend held their row locks, 'active' in ClientRead.

The client here stays connected and says nothing (as a partition looks to the server until its TCP keepalive
gives up: hours). The bounds are the floor's, lowered to 3 s (6 s in all) so the test takes seconds."""

from __future__ import annotations

import os
import struct
import time

import psycopg
import pytest

from pgsynapse import db
from pgsynapse.db import bounded_transaction
from pgsynapse.queries import q
from tests.helpers import aconn, fast_settings, wait_until

pytestmark = pytest.mark.anyio

KEY = 4242  # the advisory lock the silent transaction holds: the row locks of a writer's jobs
SLACK_S = 10.0  # a loaded 2-core machine: the server's timer and the test's wake-up
LOCK_WAIT_S = 30.0  # how long the second session waits for the lock (without a bound: forever)


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


# a whole Parse (unnamed statement, no parameter types), then the first bytes of a Bind that announces 1,000 more
PARSE = _message(b"P", b"\0SELECT 1\0" + struct.pack("!h", 0))
PART_OF_A_BIND = b"B" + struct.pack("!i", 1000) + b"\0\0"


async def _acquire(conn: psycopg.AsyncConnection, limit: float) -> float | None:
    """Seconds until the lock is ours, or None when ``limit`` passed first."""
    started = time.monotonic()
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{round(limit * 1000)}ms'")
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (KEY,))
    except psycopg.errors.LockNotAvailable:
        return None
    return time.monotonic() - started


@pytest.mark.parametrize("where", ["between_statements", "inside_a_statement"])
async def test_the_server_ends_a_bounded_transaction_whose_client_falls_silent(where, db_url, monkeypatch):
    # 3 s: long enough that the server reads the Parse before the silent bound ends the session, even on a loaded
    # machine (the test would then see no 'active' backend), short enough for a test
    monkeypatch.setattr(db, "MIN_IDLE_SECONDS", 3.0)
    settings = fast_settings(db_url, lease_seconds=1.0)
    bound = db.transaction_bounds(settings).total
    other = await aconn(db_url)
    if where == "inside_a_statement" and other.info.server_version < db.TRANSACTION_TIMEOUT_VERSION:
        await other.close()
        pytest.skip("transaction_timeout needs PostgreSQL 17+: an older server waits for the client's TCP keepalive")
    conn = await psycopg.AsyncConnection.connect(db_url)
    pid = conn.info.backend_pid
    waited = state = ended = None
    try:
        async with bounded_transaction(conn, settings):
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (KEY,))
            if where == "inside_a_statement":
                conn.pgconn.flush()
                sock = conn.pgconn.socket
                assert sock >= 0
                # the client's bytes as a cut leaves them: the rest of the Bind never comes
                os.write(sock, PARSE + PART_OF_A_BIND)
                await wait_until(other, "SELECT state = 'active' AND wait_event = 'ClientRead' FROM pg_stat_activity"
                                        " WHERE pid = %s", (pid,))
            row = await (await other.execute("SELECT state, wait_event FROM pg_stat_activity WHERE pid = %s",
                                             (pid,))).fetchone()
            state = row and dict(row)
            waited = await _acquire(other, LOCK_WAIT_S)
            if waited is None:  # not ended: end it, so that leaving the block does not wait on it
                await other.execute("SELECT pg_terminate_backend(%s)", (pid,))
    except psycopg.Error as exc:  # the server ended the session: leaving the block cannot commit
        ended = exc
    finally:
        await conn.close()
    gone = await (await other.execute("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s) AS gone",
                                      (pid,))).fetchone()
    await other.close()
    assert waited is not None, f"{where}: the silent transaction ({state}) kept its lock for {LOCK_WAIT_S:.0f} s ({ended!r})"
    assert waited <= bound + SLACK_S, (where, waited, bound)
    assert gone["gone"], "the silent transaction's session is still there"
    print(f"{where} ({state}): the lock came free after {waited:.1f} s (bound {bound:.0f} s): {ended!r}")


@pytest.mark.parametrize("whole", [True, False])
async def test_a_transaction_that_grows_with_the_data_is_bounded_only_while_silent(whole, db_url):
    """A bulk job's expansion (one INSERT of as many rows as the application inserted) may take longer than any
    batch's write: ``whole=False`` keeps the silent bound and leaves out the total one."""
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    try:
        if conn.info.server_version < db.TRANSACTION_TIMEOUT_VERSION:
            pytest.skip("transaction_timeout needs PostgreSQL 17+")
        async with bounded_transaction(conn, settings, whole=whole):
            row = await (await conn.execute(
                "SELECT current_setting('idle_in_transaction_session_timeout') AS silent,"
                " current_setting('transaction_timeout') AS total")).fetchone()
        after = await (await conn.execute("SELECT current_setting('transaction_timeout') AS total")).fetchone()
    finally:
        await conn.close()
    assert row == {"silent": "10s", "total": "20s" if whole else "0"}, row
    assert after == {"total": "0"}  # SET LOCAL: nothing stays on the pooled connection


async def test_a_server_before_17_gets_the_silent_bound_from_the_same_parameters(db_url):
    """PostgreSQL 13-16 have no transaction_timeout: bounded_transaction sends them bound_idle_in_transaction with
    the parameters it has (the total's too), which must set the silent bound alone."""
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    try:
        async with conn.transaction():
            await conn.execute(q("bound_idle_in_transaction"), db.transaction_bounds(settings).parameters())
            row = await (await conn.execute(
                "SELECT current_setting('idle_in_transaction_session_timeout') AS silent")).fetchone()
    finally:
        await conn.close()
    assert row == {"silent": "10s"}
