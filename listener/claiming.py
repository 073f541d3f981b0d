"""Claiming, for the worker: batches of due jobs (one claim at a time per kind), the solo job that must run alone,
bulk jobs expanded into per-row ones, and micro-batching (a batch short of ``batch_size`` gathers more jobs while the
model is busy, or for ``max_wait_ms`` while it is idle).

A mixin of :class:`pgsynapse.listener.worker.Worker`, whose state it uses: ``pool``, ``settings``, ``worker_id``,
``stopping``, ``gate``, and the per-kind ``_claim_locks``, ``_computing`` and ``_compute_done``.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from pgsynapse.config import Settings
from pgsynapse.db import bounded_transaction
from pgsynapse.handlers.base import Handler, Job
from pgsynapse.listener.batches import Batch, SoloGate
from pgsynapse.listener.wakeup import unless_stopped
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)

STOP_GRACE = 3.0  # seconds a claim in flight at a stop may still take (one takes milliseconds)


class Claiming:
    pool: AsyncConnectionPool | None
    settings: Settings
    worker_id: str
    stopping: anyio.Event
    gate: SoloGate
    _claim_locks: dict[str, anyio.Lock]
    _computing: dict[str, int]
    _compute_done: dict[str, anyio.Event]
    handlers: dict[str, Handler]

    def batch_size(self, kind: str) -> int:
        """The most jobs of ``kind`` a batch holds: ``batch_size``, or fewer where the handler says (``batch_limit``:
        a generative answerer answers one question at a time)."""
        limit = getattr(self.handlers[kind], "batch_limit", None)
        return min(self.settings.batch_size, limit) if limit else self.settings.batch_size

    async def gather(self, batch: Batch) -> None:
        """Micro-batching: claim more jobs into a batch short of ``batch_size``, into ``batch.jobs`` as each claim
        returns (a later claim that raises leaves them there: processed, their leases renewed with the batch's).

        While another batch of this kind computes, the model is busy anyway: keep claiming until it is free
        (or the batch is full), so batches grow with the load. With the model idle, wait at most
        ``max_wait_ms`` for more jobs, so an idle insert costs at most that much latency. Never past the batch's
        deadline nor a lease: a batch that hangs meanwhile must not keep the claimed ones waiting.
        """
        kind, jobs = batch.kind, batch.jobs
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        until = min(batch.deadline, time.monotonic() + self.settings.lease_seconds)
        size = self.batch_size(kind)
        while len(jobs) < size and not self.stopping.is_set() and time.monotonic() < until:
            busy = self._computing[kind] > 0
            left = deadline - time.monotonic()
            if not busy and left <= 0:
                break
            if busy:
                done = self._compute_done[kind]
                with anyio.move_on_after(self.settings.lease_seconds / 3):
                    await done.wait()
            else:
                await anyio.sleep(left)
            jobs.extend(await self.claim(kind, size - len(jobs)))

    async def claim(self, kind: str, limit: int) -> list[Job]:
        async with self._claim_locks[kind]:
            if self.stopping.is_set():  # stopped while the kind's other loop claimed: no claim after a stop
                return []
            claimed: list[Job] = []

            async def work() -> None:
                claimed.extend(await self._claim(kind, limit))

            # a stop ends a claim that still waits after STOP_GRACE (on a lock of the jobs table, for a connection
            # while the server is down): the command or service stopping must not wait for it. A claim in flight at
            # the stop ends well within it, and its batch is drained; jobs a claim cancelled as it committed keep
            # their lease, and come back with it
            await unless_stopped(work, self.stopping, grace=STOP_GRACE)
            return claimed

    async def _claim(self, kind: str, limit: int) -> list[Job]:
        assert self.pool is not None
        jobs: list[Job] = []
        for _ in range(3):  # a claim that only finds bulk jobs expands them and claims again
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    q("claim_jobs"),
                    {"kind": kind, "limit": limit - len(jobs), "worker": self.worker_id, "lease": self.settings.lease_seconds},
                )
                rows = await cur.fetchall()
                bulk = await self._expand_bulk(conn, kind, rows)
            jobs += [_job(r) for r in rows if r["ref_id"] >= 0]
            if not bulk or len(jobs) >= limit:
                break
        return jobs

    async def claim_solo(self, kind: str) -> Job | None:
        """One job that must run alone (its lease expired in a batch), or None."""
        assert self.pool is not None
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                q("claim_solo_job"), {"kind": kind, "worker": self.worker_id, "lease": self.settings.lease_seconds})
            rows = await cur.fetchall()
            await self._expand_bulk(conn, kind, rows)
        return next((_job(r) for r in rows if r["ref_id"] >= 0), None)

    async def _claim_solo(self, kind: str) -> Job | None:
        """A solo job in the worker's one solo slot (kept until the job is processed), or None."""
        if self.stopping.is_set() or not self.gate.reserve():
            return None
        solo = None

        async def work() -> None:
            nonlocal solo
            solo = await self.claim_solo(kind)

        try:
            await unless_stopped(work, self.stopping, grace=STOP_GRACE)  # as claim()
        finally:
            if solo is None:
                self.gate.release()
        return solo

    async def _expand_bulk(self, conn: psycopg.AsyncConnection, kind: str, rows: list[dict[str, Any]]) -> bool:
        """Bulk jobs (one per large INSERT statement, ref_id < 0) become per-row jobs first."""
        bulk = [r["id"] for r in rows if r["ref_id"] < 0]
        if bulk:
            # its length grows with the application's INSERT (millions of rows are one job), not with a batch
            async with bounded_transaction(conn, self.settings, whole=False):
                cur = await conn.execute(q("expand_bulk_jobs"), {"ids": bulk, "worker": self.worker_id})
            log.info("bulk_jobs_expanded", kind=kind, bulk=len(bulk), jobs=cur.rowcount)
        return bool(bulk)


def _job(row: dict[str, Any]) -> Job:
    return Job(row["id"], row["kind"], row["ref_id"], row["payload"] or {}, row["attempts"], row["queued_at"],
               row["started_at"])
