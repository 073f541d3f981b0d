"""The worker's part in rolling out model versions, run from its heartbeat (issue 23, items 4 and 5).

- A candidate the retrain job registered (``runtime_pending``) is exported to ``settings.runtime`` before it gets
  A/B traffic, so the A/B test measures the runtime that ships and a promotion needs no switch. A version that
  became active on torch anyway (promoted before this release, or its export was not tried) is moved as at start.
  Exports run one at a time, in a thread: serving goes on meanwhile, the handlers pick up the new runtime at their
  next batch. Only workers that serve (embed or answer) export: they hold the models. A stopping worker does not
  wait for an export (minutes on a small host): it abandons it (``runtime_export_abandoned``), removes its partial
  artifact and records nothing, so the next start exports the version; the thread is a daemon, it ends with the
  process.
- Every ``auto_promote_interval`` seconds, when a candidate is in an A/B test and ``auto_promote`` is on, the A/B
  decision (:mod:`pgsynapse.learning.autopromote`): one worker at a time, under an advisory lock.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import psycopg
from anyio.abc import TaskGroup
from psycopg.rows import dict_row

from pgsynapse.config import Settings
from pgsynapse.db import NO_PREPARE
from pgsynapse.export import Abandon, ExportAbandoned, optimise_version
from pgsynapse.learning.autopromote import run_decisions
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)


class Rollout:
    def __init__(self, settings: Settings, url: str, worker_id: str, *, serves: bool, enabled: bool = True) -> None:
        self.settings = settings
        self.enabled = enabled  # off in a one-shot command's worker: an export or a decision would outlive it
        self.url = url
        self.worker_id = worker_id
        self.serves = serves
        self._exporting = False  # an export runs in a thread
        self._deciding = False
        self._last_decision = -math.inf

    async def step(self, conn: psycopg.AsyncConnection, serving: list[dict[str, Any]], tasks: TaskGroup | None) -> None:
        """Start what is due (in ``tasks``); never waits for an export or a decision."""
        if tasks is None or not self.enabled:
            return
        await self._export_if_due(conn, serving, tasks)
        await self._decide_if_due(conn, tasks)

    # -- runtime ---------------------------------------------------------------------------------
    async def _export_if_due(self, conn: psycopg.AsyncConnection, serving: list[dict[str, Any]], tasks: TaskGroup) -> None:
        if not self.serves or self._exporting:
            return
        pending = [v["id"] for v in serving if v["status"] == "candidate" and v.get("runtime_pending")]
        if pending:
            version: int | None = pending[0]
        else:
            active = next((v for v in serving if v["status"] == "active"), None)
            if active is None or active["runtime"] != "torch" or self.settings.runtime == "torch":
                return
            row = await (await conn.execute(q("runtime_export_requested", "learning.sql"),
                                           {"version": active["id"]})).fetchone()
            if row is None or row["requested"] == self.settings.runtime:
                return  # tried already (refused or failed): once per version
            version = None  # the active one
        self._exporting = True
        tasks.start_soon(self._export, version)

    async def export_at_start(self) -> None:
        """The active version's export at the worker's start (minutes on a small host), abandoned as a candidate's
        is when the worker is stopped meanwhile; an error stops the start, as it always did."""
        if self.serves:
            await self._export(None, export=self.enabled, at_start=True)

    async def _export(self, version: int | None, *, export: bool = True, at_start: bool = False) -> None:
        abandon, done, token = Abandon(), anyio.Event(), anyio.lowlevel.current_token()
        failed: list[Exception] = []

        def export_() -> None:  # a daemon thread: a worker thread of anyio's would keep the stopped process alive
            try:
                optimise_version(self.settings, self.url, version, actor=self.worker_id, export=export,
                                 abandon=abandon, at_start=at_start)
            except ExportAbandoned:
                pass
            except Exception as exc:  # noqa: BLE001 - the version stays as it is; the next heartbeat tries again
                failed.append(exc)
            finally:
                with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody waits
                    anyio.from_thread.run_sync(done.set, token=token)

        threading.Thread(target=export_, name="runtime-export", daemon=True).start()
        try:
            await done.wait()
        except anyio.get_cancelled_exc_class():  # the worker is stopping
            with anyio.CancelScope(shield=True):
                removed = await anyio.to_thread.run_sync(abandon.now)
            log.info("runtime_export_abandoned", version=version, removed=[str(d) for d in removed],
                     note="the worker is stopping: nothing recorded, the next start exports the version")
            raise
        finally:
            self._exporting = False
        if at_start and failed:
            raise failed[0]
        for exc in failed:
            log.warning("runtime_export_failed", version=version,
                        error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")

    # -- A/B decisions -----------------------------------------------------------------------------
    async def _decide_if_due(self, conn: psycopg.AsyncConnection, tasks: TaskGroup) -> None:
        s = self.settings
        if not s.auto_promote or self._deciding or time.monotonic() - self._last_decision < s.auto_promote_interval:
            return
        self._last_decision = time.monotonic()
        row = await (await conn.execute(q("ab_in_progress", "learning.sql"))).fetchone()
        if not row or not row["running"]:
            return
        self._deciding = True
        tasks.start_soon(self._decide)

    async def _decide(self) -> None:
        try:
            await anyio.to_thread.run_sync(self._decide_sync, abandon_on_cancel=True)
        except Exception as exc:  # noqa: BLE001 - a failed look never stops the worker; the next one tries again
            log.warning("maintenance_failed", step="auto_promote",
                        error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        finally:
            self._deciding = False

    def _decide_sync(self) -> list[dict[str, Any]]:
        with psycopg.connect(self.url, autocommit=True, row_factory=dict_row, **NO_PREPARE,
                             application_name="pgsynapse-worker") as conn:
            return run_decisions(conn, min_rated=self.settings.auto_promote_min_rated,
                                 alpha=self.settings.auto_promote_alpha, actor=self.worker_id)
