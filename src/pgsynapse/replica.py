"""Reads that may go to a streaming replica (``read_url``): the kNN retrieval of answers and ``pgsynapse search``.

A read goes to the replica only once the replica has replayed everything the primary had flushed when the read
began, so it sees every commit the same read would see on the primary (every document embedded, every version
promoted before the question was claimed). The replica is asked, with growing pauses, for ``read_max_lag_ms`` at
most; past that, or when it cannot be reached, the read goes to the primary and the event is logged. A replica
that failed is tried again after ``RETRY_SECONDS``. Writes and claims never come here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import anyio
import psycopg
from pgvector.psycopg import register_vector_async

from pgsynapse.config import Settings
from pgsynapse.db import aconnect, connect, describe_db_error
from pgsynapse.errors import DatabaseError
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)

RETRY_SECONDS = 30.0
FIRST_PAUSE = 0.002  # seconds; doubled up to MAX_PAUSE while the replica catches up
MAX_PAUSE = 0.05


class ReadReplica:
    """One connection to the replica at ``url``, shared by the reads of one handler (or one command)."""

    def __init__(self, url: str, *, max_lag_ms: float, application_name: str = "pgsynapse-read",
                 settings: Settings | None = None) -> None:
        self.url = url
        self.settings = settings  # its keepalives and tcp_user_timeout (db.tcp_params)
        self.max_lag = max_lag_ms / 1000.0
        self.application_name = application_name
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = anyio.Lock()
        self._down_until = 0.0
        self.reads = {"replica": 0, "primary_lagging": 0, "primary_unavailable": 0}

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @contextlib.asynccontextmanager
    async def connection(self, primary: psycopg.AsyncConnection) -> AsyncIterator[psycopg.AsyncConnection]:
        """The replica's connection when it has caught up with ``primary``, else ``primary`` itself."""
        async with self._lock:  # one read at a time on the replica's connection
            conn = await self._fresh(primary)
            if conn is None:
                yield primary
                return
            try:
                yield conn
            except psycopg.OperationalError as exc:  # lost mid-read: the caller's read fails, the next one reconnects
                await self._failed(exc)
                raise

    async def _fresh(self, primary: psycopg.AsyncConnection) -> psycopg.AsyncConnection | None:
        if time.monotonic() < self._down_until:
            self.reads["primary_unavailable"] += 1
            return None
        lsn = (await (await primary.execute(q("primary_flush_lsn", "replica.sql"))).fetchone())["lsn"]
        try:
            conn = await self._connect()
            deadline, pause = time.monotonic() + self.max_lag, FIRST_PAUSE
            while True:
                row = await (await conn.execute(q("replica_caught_up", "replica.sql"), {"lsn": lsn})).fetchone()
                if row["ok"]:
                    self.reads["replica"] += 1
                    return conn
                if time.monotonic() >= deadline:
                    break
                await anyio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 2, MAX_PAUSE)
            lag = await (await conn.execute(q("replica_lag", "replica.sql"), {"lsn": lsn})).fetchone()
        except (psycopg.OperationalError, DatabaseError) as exc:
            await self._failed(exc)
            self.reads["primary_unavailable"] += 1
            return None
        self.reads["primary_lagging"] += 1
        log.warning("read_replica_behind", waited_ms=round(self.max_lag * 1000), reading="primary", **lag)
        return None

    async def _connect(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            # dict rows and registered vectors, as on the worker's own connections
            self._conn = await aconnect(self.url, autocommit=True, application_name=self.application_name,
                                       settings=self.settings)
            await register_vector_async(self._conn)
            log.info("read_replica_connected")
        return self._conn

    async def _failed(self, exc: BaseException) -> None:
        detail = describe_db_error(exc) if isinstance(exc, psycopg.Error) else str(exc)
        log.warning("read_replica_unavailable", error=detail, retry_in_s=RETRY_SECONDS, reading="primary")
        self._down_until = time.monotonic() + RETRY_SECONDS
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None


@contextlib.asynccontextmanager
async def reading(replica: ReadReplica | None, primary: psycopg.AsyncConnection) -> AsyncIterator[psycopg.AsyncConnection]:
    """Where a read that may go to a replica goes: ``replica``'s connection when it has caught up, else ``primary``."""
    if replica is None:
        yield primary
        return
    async with replica.connection(primary) as conn:
        yield conn


def replica_for(url: str | None, max_lag_ms: float, **kwargs: object) -> ReadReplica | None:
    """A :class:`ReadReplica` when ``url`` (the ``read_url`` setting) is set."""
    return ReadReplica(url, max_lag_ms=max_lag_ms, **kwargs) if url else None


def replica_lag(primary: psycopg.Connection, url: str) -> dict[str, object]:
    """How far the replica at ``url`` is behind ``primary`` now (for ``pgsynapse status``); ``error`` when it
    cannot be asked."""
    lsn = primary.execute(q("primary_flush_lsn", "replica.sql")).fetchone()["lsn"]
    try:
        with connect(url, autocommit=True, application_name="pgsynapse-status") as conn:
            return dict(conn.execute(q("replica_lag", "replica.sql"), {"lsn": lsn}).fetchone())
    except (psycopg.Error, DatabaseError) as exc:
        return {"error": describe_db_error(exc) if isinstance(exc, psycopg.Error) else str(exc)}
