"""What every handler is: load rows, compute outside any transaction, write in a short one.

The worker owns claiming, leases, retries and failure; a handler only knows its rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Generic, TypeVar

import psycopg

from pgsynapse.errors import EndpointBusy, InputError
from pgsynapse.queries import q

W = TypeVar("W")


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    ref_id: int
    payload: dict[str, Any]
    attempts: int
    queued_at: datetime  # created, or put back by retry-failed (coalesce(jobs.queued_at, jobs.created_at))
    claimed_at: datetime | None = None  # the claim's token (jobs.started_at): a late write of an older claim is refused


@dataclass
class Outcome:
    """The result of one job: ``error`` set means it failed; ``retry`` whether another attempt may help."""

    job: Job
    result: Any = None
    error: str | None = None
    retry: bool = True
    skip_reason: str | None = None  # done with nothing to write (row deleted, superseded)
    superseded: bool = False  # skipped because its row changed while it computed (Handler.requeue_changed)
    # the content (or text) hash of the row as the job read it: a final failure of a row that changed since is the
    # old content's, not the row's (Handler.changed_since)
    read_hash: str | None = None
    # a stopping worker abandoned it (Handler.abandon): back to pending at once, the attempt not charged
    abandoned: bool = False
    # the seconds a busy endpoint asked to wait before the next try (its Retry-After): the retry comes no sooner
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class WriteReport:
    """What a handler's write did, for logs and metrics."""

    written: list[int] = field(default_factory=list)  # job ids whose results were written
    superseded: list[int] = field(default_factory=list)  # job ids whose row changed meanwhile
    # job ids whose result another job already wrote (it read the same, newer content): done, nothing written
    already_written: list[int] = field(default_factory=list)
    # job id -> why a written result leaves nothing to serve (an emptied body), or why a superseded job's result was
    # not written (the row changed meanwhile, when none): recorded as the job's skip_reason
    notes: dict[int, str] = field(default_factory=dict)


def retry_after(exc: BaseException) -> float | None:
    """The wait an error asks for before the job is tried again: a busy endpoint's Retry-After, else None."""
    return exc.retry_after if isinstance(exc, EndpointBusy) else None


def describe(exc: BaseException) -> str:
    """A readable one-line error for a row or a job."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def isolate(fn: Callable[[Sequence[W]], list[Any]], items: Sequence[W]) -> list[Any | BaseException]:
    """Run ``fn`` on a batch; if it raises, bisect so one poisoned item never fails its neighbours.

    Returns, per item, its result or the exception that item alone raised.
    """
    if not items:
        return []
    try:
        out = fn(items)
        if len(out) != len(items):
            raise RuntimeError(f"handler returned {len(out)} results for {len(items)} items")
        return out
    except Exception as exc:  # noqa: BLE001 - any error of a single item is that item's error
        if len(items) == 1:
            return [exc]
        mid = len(items) // 2
        return isolate(fn, items[:mid]) + isolate(fn, items[mid:])


class Handler(ABC, Generic[W]):
    kind: ClassVar[str]
    # a job whose lease expires in a batch is not charged the attempt and is claimed alone after (listener/batches.py)
    crash_isolation: ClassVar[bool] = True
    # leases of a batch are renewed this long at most (None: the ``batch_deadline_seconds`` setting)
    deadline_seconds: float | None = None
    # (name, file) of the named queries behind changed_since and requeue_changed; None: a kind without them
    changed_since_query: ClassVar[tuple[str, str] | None] = None
    requeue_changed_query: ClassVar[tuple[str, str] | None] = None
    # (name, file) of the query that locks the kind's rows by id, in id order (lock_rows); None: a kind without it
    lock_rows_query: ClassVar[tuple[str, str] | None] = None
    # record_retry writes on the job's row (locked with the others by lock_rows)
    writes_on_retry: ClassVar[bool] = False

    @abstractmethod
    async def load(self, conn: psycopg.AsyncConnection, jobs: list[Job]) -> tuple[list[W], list[Outcome]]:
        """Read what the jobs need. Returns the work items and the outcomes already known (row gone...)."""

    @abstractmethod
    def compute(self, work: list[W]) -> list[Outcome]:
        """The model work, in a thread, outside any transaction. One outcome per item."""

    @abstractmethod
    async def write(self, conn: psycopg.AsyncConnection, outcomes: list[Outcome]) -> WriteReport:
        """Write successful results inside the caller's transaction, with a stale-write guard."""

    def served_by(self, work: list[W]) -> list[dict[str, Any]] | None:
        """The model versions (``id``, ``runtime``) that computed ``work``: the ``model_version`` and ``runtime``
        labels of the batch metrics (pgsynapse_batch_size, pgsynapse_inference_seconds). The handler's ``versions``
        (embed's serving versions); none (the labels empty) for a kind no text model version computes; None when a
        kind that versions compute computed nothing (every job refused at its load): the batch is not observed, as
        no version's series."""
        return list(getattr(self, "versions", ()))

    # record_failure and record_retry write the job's row alone, with no state of a handler: the lease reaper calls
    # them on the class of a kind its worker does not take (a dead worker's), building no handler for it

    @classmethod
    async def record_failure(cls, conn: psycopg.AsyncConnection, job: Job, error: str) -> None:
        """Record a job's final failure on its row (inside the caller's transaction)."""

    @classmethod
    async def record_retry(cls, conn: psycopg.AsyncConnection, job: Job, error: str) -> None:
        """Record on its row that the job will run again after an error (inside the caller's transaction)."""

    async def lock_rows(self, conn: psycopg.AsyncConnection, ref_ids: list[int]) -> None:
        """Lock the rows a write touches (results and final failures), in id order, before any other row lock
        (inside the caller's transaction): two workers holding jobs of the same rows then take them in one order,
        where the write's own locks followed by the failures' could cross and deadlock."""
        if self.lock_rows_query is not None:
            await conn.execute(q(*self.lock_rows_query), {"ids": sorted(set(ref_ids))})

    async def changed_since(self, conn: psycopg.AsyncConnection, job: Job, read_hash: str) -> bool:
        """Whether the job's row holds other content than ``read_hash``, what the job read (inside the caller's
        transaction; the row is locked, so an edit not yet committed is waited for). False for a deleted row."""
        if self.changed_since_query is None:
            return False
        row = await (await conn.execute(q(*self.changed_since_query), {"id": job.ref_id, "hash": read_hash})).fetchone()
        return bool(row and row["changed"])

    async def requeue_changed(self, conn: psycopg.AsyncConnection, job_ids: list[int]) -> int:
        """Queue a new job for the row of each of these superseded jobs that still waits for its result and has no
        newer job (inside the caller's transaction, which holds the rows). An edit committed after a job's load may
        have found that job still pending, and queued none of its own (the triggers keep one pending job per row):
        the superseded job was then the row's last. Returns how many jobs were queued."""
        if self.requeue_changed_query is None:
            return 0
        return (await conn.execute(q(*self.requeue_changed_query), {"jobs": job_ids})).rowcount

    async def warm_up(self, conn: psycopg.AsyncConnection) -> None:
        """Load what the kind's first job would otherwise wait for (its models), before the worker says it started
        (Worker.warm_up, after the worker's own steps; ``conn`` a connection of its pool): the first job, and every
        job queued behind it, then wait for no load, and a model that cannot serve fails the start, not later jobs.
        A blocking load runs in a thread (``anyio.to_thread``), so a stop during it is heard. Nothing by default."""

    def abandon(self) -> None:
        """The worker is stopping: stop a compute that would keep it for minutes (a training run in its own process)
        now, from the event loop's thread; its jobs come back as ``Outcome(abandoned=True)``. Nothing by default:
        a batch in flight finishes and is written."""

    async def aclose(self) -> None:
        """Release what the handler holds outside the worker's pool (the worker is stopping)."""

    async def notify_written(self, conn: psycopg.AsyncConnection, report: WriteReport, jobs: dict[int, Job]) -> None:
        """Announce written results (inside the write transaction: delivered on commit)."""


def input_error(outcome_job: Job, exc: InputError, read_hash: str | None = None) -> Outcome:
    """The failure of bad input, not retried; its row's error ``InputError: ...`` whatever the subclass (a data
    question's NoReadableTables said its own name)."""
    text = " ".join(str(exc).split())
    return Outcome(outcome_job, error=f"InputError: {text}" if text else "InputError", retry=False,
                   read_hash=read_hash)


def unanswerable(outcome_job: Job, row: dict[str, Any], max_chars: int) -> Outcome | None:
    """The failure of a question no model is asked to answer, or None. One over ``max_chars``: its row came without
    its text (``text`` None, ``chars`` its length). One of nothing but whitespace: the tables refuse such a text
    when it is written (triggers/blank_text_v1.sql); this fails one written before migration 0031, or one of spaces
    that PostgreSQL's ``[[:space:]]`` does not count (a no-break space). ``row`` is a question's or a data
    question's (``text``, ``chars``, ``text_hash``)."""
    if row["text"] is None:
        return input_error(outcome_job, InputError(
            f"question has {row['chars']:,} characters, over max_question_chars={max_chars:,}"), row["text_hash"])
    if row["text"].strip():
        return None
    return input_error(outcome_job, InputError("the question is empty: there is nothing to answer"), row["text_hash"])
