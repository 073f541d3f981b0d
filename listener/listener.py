"""The dedicated LISTEN connection: autocommit, keepalives, reconnect with backoff.

While it is down the dispatchers fall back to polling; the loss is logged (``listen_connection_lost``)
and counted, never silent. On every (re)connect all dispatchers are woken to catch up.
"""

from __future__ import annotations

import time

import anyio
import psycopg
from anyio.abc import TaskStatus

from pgsynapse.config import Settings
from pgsynapse.db import aconnect
from pgsynapse.errors import DatabaseError
from pgsynapse.listener.wakeup import JOBS_CHANNEL, JobNotice, Wakeups
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)

LISTENER_APPLICATION_NAME = "pgsynapse-listener"


class Listener:
    def __init__(self, url: str, wakeups: Wakeups, *, reconnect_max: float = 30.0,
                 settings: Settings | None = None, worker_id: str | None = None) -> None:
        self.url = url
        self.worker_id = worker_id  # its presence lock, held by the connection (hold_worker_presence; status)
        self.settings = settings  # its keepalives and tcp_user_timeout (db.tcp_params)
        self.wakeups = wakeups
        self.reconnect_max = reconnect_max
        self.connected = False
        self.reconnects = 0
        self.outages = 0  # times the connection was lost (a counter for status and metrics)
        self.lost_at: float | None = None  # monotonic time of the current outage's start
        self.backend_pid: int | None = None
        self.pooler_said = False  # listen_through_pooler is said once per process, not at every reconnect
        self.on_state_change = lambda connected: None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        backoff, started, ever_connected = 0.25, False, False
        while True:
            conn = None
            try:
                conn = await aconnect(self.url, autocommit=True, application_name=LISTENER_APPLICATION_NAME,
                                      settings=self.settings)
                await conn.execute(f"LISTEN {JOBS_CHANNEL}")
                if self.worker_id is not None:
                    await conn.execute(q("hold_worker_presence"), {"worker": self.worker_id})
                self.backend_pid = conn.info.backend_pid
                await self._say_if_pooled(conn)
                self._set(True)
                if ever_connected:
                    self.reconnects += 1
                    down_s = time.monotonic() - self.lost_at if self.lost_at is not None else 0.0
                    self.lost_at = None
                    log.info(
                        "listen_reconnected",
                        backend_pid=self.backend_pid,
                        reconnects=self.reconnects,
                        outages=self.outages,
                        down_s=round(down_s, 2),
                    )
                else:
                    log.info("listen_connected", channel=JOBS_CHANNEL, backend_pid=self.backend_pid)
                ever_connected, backoff = True, 0.25
                # whatever arrived while we were away
                self.wakeups.wake_all()
                if not started:
                    task_status.started()
                    started = True
                async for notice in conn.notifies():
                    parsed = JobNotice.parse(notice.payload)
                    if parsed is None:
                        log.warning("notify_payload_invalid", payload=notice.payload[:200])
                        self.wakeups.wake_all()
                    else:
                        self.wakeups.wake(parsed.kind)
            except (psycopg.Error, DatabaseError, OSError) as exc:
                if self.connected:
                    self.outages += 1
                    self.lost_at = time.monotonic()
                self._set(False)
                log.warning(
                    "listen_connection_lost",
                    error=" ".join(str(exc).split())[:200],
                    retry_in=round(backoff, 2),
                    fallback="polling",
                    outages=self.outages,
                )
                if not started:
                    task_status.started()
                    started = True
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, self.reconnect_max)
            finally:
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        try:
                            await conn.close()
                        except Exception:  # noqa: BLE001 - the connection is already broken
                            pass

    async def _say_if_pooled(self, conn: psycopg.AsyncConnection) -> None:
        """Warn when the LISTEN connection goes through a pooler with no ``listen_url`` set: through a transaction
        pooler its LISTEN and presence lock stay on a server connection that serves other clients, so no NOTIFY
        wakes this worker and ``status`` shows it gone. The pooler's mode cannot be seen from here (a session-mode
        pooler is fine): an explicit ``listen_url`` is taken as the operator's choice."""
        if self.pooler_said or (self.settings is not None and self.settings.listen_url):
            return
        row = await (await conn.execute(q("session_backend_pid"))).fetchone()
        if row is None or row["pid"] == conn.info.backend_pid:
            return
        self.pooler_said = True
        poll = self.settings.poll_interval if self.settings is not None else None
        log.warning(
            "listen_through_pooler",
            client_backend_pid=conn.info.backend_pid,
            server_backend_pid=row["pid"],
            effect=(f"a connection pooler sits between this worker's LISTEN and PostgreSQL (the backend pid it gave is "
                    f"not the server's). In transaction pooling mode (PgBouncer pool_mode = transaction) the LISTEN "
                    f"goes back to the pool with its server connection: no NOTIFY wakes this worker, it finds new "
                    f"jobs only every poll_interval ({poll} s), and `pgsynapse status` shows it GONE"),
            fix=("set PGSYNAPSE_LISTEN_URL (listen_url) to a direct URL of the same database, or to a pool_mode = "
                 "session entry (a session-mode pooler is fine: naming it as listen_url silences this); "
                 "docs/operations.md, PgBouncer"),
        )

    def _set(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self.on_state_change(connected)
