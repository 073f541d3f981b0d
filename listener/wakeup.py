"""Wake-ups per job kind: NOTIFY, the fallback poll and shutdown all end a dispatcher's wait."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

JOBS_CHANNEL = "pgsynapse_jobs"


@dataclass(frozen=True)
class JobNotice:
    """The validated payload of a ``pgsynapse_jobs`` NOTIFY: ``{"kind": "embed", "n": 3}``."""

    kind: str
    n: int = 1

    @classmethod
    def parse(cls, payload: str) -> JobNotice | None:
        try:
            data = json.loads(payload)
            kind, n = data["kind"], int(data.get("n", 1))
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(kind, str) or not kind:
            return None
        return cls(kind, n)


class Wakeups:
    def __init__(self, kinds: list[str]) -> None:
        self._events = {k: anyio.Event() for k in kinds}
        self.stopped = False

    def wake(self, kind: str) -> None:
        event = self._events.get(kind)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        for event in self._events.values():
            event.set()

    def stop(self) -> None:
        """Every current and future wait returns at once."""
        self.stopped = True
        self.wake_all()

    async def wait(self, kind: str, timeout: float) -> bool:
        """Wait for a wake-up of ``kind`` or ``timeout`` seconds; True when woken."""
        if self.stopped:
            return True
        event = self._events[kind]
        woken = False
        with anyio.move_on_after(timeout):
            await event.wait()
            woken = True
        if event.is_set():
            self._events[kind] = anyio.Event()
        return woken


async def unless_stopped(work: Callable[[], Awaitable[None]], stopping: anyio.Event,
                         watch: Callable[[], Awaitable[None]] | None = None, *, grace: float = 0.0) -> bool:
    """Run ``work`` (a worker's warm-up) beside ``watch`` (its signal receiver, which sets ``stopping``) until it
    ends (True) or ``stopping`` is set first and ``grace`` seconds more pass (False: ``work`` is cancelled). Its
    error is raised bare."""
    finished = False

    async def run() -> None:
        nonlocal finished
        await work()
        finished = True
        tg.cancel_scope.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            if watch is not None:
                tg.start_soon(watch)
            await stopping.wait()
            await anyio.sleep(grace)  # ended at once when ``work`` ends first
            tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    return finished


def lone_error(group: BaseExceptionGroup) -> BaseException | None:
    """The one error of a task group's exception group, through nested groups of one error each (a loop's error in
    a task group inside another); None when there are several."""
    while len(group.exceptions) == 1:
        only = group.exceptions[0]
        if not isinstance(only, BaseExceptionGroup):
            return only
        group = only
    return None
