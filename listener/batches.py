"""What a worker holds: its claimed batches, each with a deadline, and the gate that lets a solo job run alone.

A batch's leases are renewed only until its deadline (per kind): a batch that hangs (a model call that never
returns) stops being renewed, its leases run out and its jobs go back to the queue, whether or not the process
is supervised. A job whose lease expired in a batch comes back *solo* (migration 0008): the worker runs it while
it holds no other live batch, so a row that kills its worker is found alone and its batch-mates are not blamed.

The same deadline tells a busy dispatcher loop from a stuck one (:class:`LoopState`, read by the watchdog and
``/healthz``): a batch is legitimate for as long as its leases are renewed, however long it computes.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import anyio

from pgsynapse.handlers.base import Job

_ids = itertools.count(1)


@dataclass(eq=False)
class Batch:
    """Jobs claimed together. ``deadline`` (``time.monotonic()``) bounds how long their leases are renewed."""

    kind: str
    jobs: list[Job]
    solo: bool = False
    deadline: float = math.inf
    overdue_logged: bool = False
    id: int = field(default_factory=lambda: next(_ids))

    def live(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.deadline

    def claims(self) -> list[tuple[int, datetime | None]]:
        return [(j.id, j.claimed_at) for j in self.jobs]


@dataclass(eq=False)
class LoopState:
    """What one dispatcher loop is doing, for the stall judgement (:meth:`due`)."""

    tick: float = field(default_factory=time.monotonic)  # when it last came round
    batch: Batch | None = None  # the batch it runs now
    waiting: bool = False  # waiting for the worker's solo job, which another loop runs (and is judged by)

    def due(self, idle_limit: float) -> float:
        """When the loop is stuck (``time.monotonic()``) unless it comes round or its state changes before.

        Idle, it comes round at least every ``poll_interval``: ``idle_limit`` after its last turn. In a batch, at
        the batch's deadline, until which its leases are renewed (a solo job waiting for its turn: none yet; the
        batches it waits for have theirs). Waiting for a solo job: never, the loop running that job is judged.
        """
        if self.waiting:
            return math.inf
        if self.batch is not None:
            return self.batch.deadline
        return self.tick + idle_limit


@dataclass
class WorkerStats:
    """Live counters of one worker process (read by status, health and metrics)."""

    processed: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    retried: dict[str, int] = field(default_factory=dict)
    lease_expired: dict[str, int] = field(default_factory=dict)  # requeued by this process's lease reaper
    batches: int = 0
    fallback_polls: int = 0
    last_tick: float = field(default_factory=time.monotonic)
    loops: dict[int, LoopState] = field(default_factory=dict)  # per watched dispatcher loop (task id)

    def tick_age(self, now: float | None = None) -> float:
        """Seconds since the *least recently* turning watched loop came round (any loop's, before one is tracked)."""
        ticks = [loop.tick for loop in self.loops.values()]
        return (time.monotonic() if now is None else now) - (min(ticks) if ticks else self.last_tick)

    def add(self, table: dict[str, int], kind: str, n: int = 1) -> None:
        table[kind] = table.get(kind, 0) + n


class SoloGate:
    """At most one solo job per worker, run while no other live batch runs; new batches wait for it.

    One solo job at a time makes a crash meanwhile that job's own (the reaper charges it the attempt); the other
    jobs the worker held are refunded as batch-mates. A batch past its deadline no longer counts: its jobs were
    given back, and a hung thread must not keep a solo job (often the very job it hung on) from running.
    """

    def __init__(self) -> None:
        self._shared: dict[int, Batch] = {}
        self._reserved = False  # a solo job is being claimed, waits, or runs
        self._changed = anyio.Event()

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def reserve(self) -> bool:
        """Take the worker's one solo slot before claiming a solo job; False when it is taken."""
        if self._reserved:
            return False
        self._reserved = True
        return True

    def release(self) -> None:
        self._reserved = False
        self._notify()

    async def clear(self) -> None:
        """Wait while a solo job is claimed or runs (before claiming a batch)."""
        while self._reserved:
            await self._changed.wait()

    @asynccontextmanager
    async def shared(self, batch: Batch) -> AsyncIterator[None]:
        await self.clear()
        self._shared[batch.id] = batch
        try:
            yield
        finally:
            del self._shared[batch.id]
            self._notify()

    @asynccontextmanager
    async def solo(self) -> AsyncIterator[None]:
        """Run the reserved solo job once no live batch runs; the slot is released after it."""
        try:
            while True:
                now = time.monotonic()
                live = [b.deadline for b in self._shared.values() if b.live(now)]
                if not live:
                    break
                # wake when a batch ends or the first live one passes its deadline
                with anyio.move_on_after(min(live) - now):
                    await self._changed.wait()
            yield
        finally:
            self.release()
