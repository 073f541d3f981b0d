"""The write step of a batch: one short transaction per batch, for the claims the worker still holds.

Results go through the handler's stale-write guard; failed jobs are retried with backoff or failed for good; a
broken connection is retried for about a lease; a batch whose write fails is split, so one bad row never fails
its neighbours.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from pgsynapse import metrics
from pgsynapse.config import Settings
from pgsynapse.db import bounded_transaction, transaction_bounds
from pgsynapse.handlers.base import Handler, Outcome, WriteReport, describe
from pgsynapse.listener.batches import WorkerStats
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)


def backoff_delay(attempts: int, base: float, cap: float) -> float:
    """Seconds before the next attempt: base, 2*base, 4*base, ... capped."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


def transient(exc: BaseException) -> bool:
    """A database error that says nothing about the rows: the connection broke, the server is restarting,
    the transaction lost a deadlock/serialization race, or the server ended it while the worker was silent or
    after it had lasted too long (25P03, 25P04: db.bounded_transaction). Writing the same results again is
    right."""
    if not isinstance(exc, psycopg.Error):
        return False
    state = exc.sqlstate or ""
    if state in ("25P03", "25P04"):  # psycopg's InternalError (class 25: invalid transaction state)
        return True
    return isinstance(exc, psycopg.OperationalError) and (not state or state.startswith(("08", "57P", "40")))



class BatchWriter:
    """Writes the outcomes of one worker's batches. ``settings`` and ``pool`` return the worker's current ones
    (a SIGHUP replaces its settings; the pool opens when it runs). ``failures_are_errors``: a job that fails for good
    logs ``job_failed`` at error (else at info: a one-shot command's worker, which prints the reason)."""

    def __init__(self, worker_id: str, stats: WorkerStats, settings: Callable[[], Settings],
                 pool: Callable[[], AsyncConnectionPool], *, failures_are_errors: bool = True) -> None:
        self.worker_id = worker_id
        self.stats = stats
        self._settings = settings
        self._pool = pool
        self._failures_are_errors = failures_are_errors

    @property
    def settings(self) -> Settings:
        return self._settings()

    async def write(
        self, kind: str, handler: Handler, outcomes: list[Outcome], inference: dict[str, Any] | None = None
    ) -> Counter[str]:
        """Write the outcomes; returns how many jobs the committed writes made ``processed`` (done: written, skipped
        or superseded), ``retried`` and ``failed`` (for good), as the worker's stats count them."""
        try:
            return await self._write_retrying(kind, handler, outcomes, inference)
        except psycopg.Error as exc:
            if transient(exc):
                # the server stayed away for about a lease: not these rows' fault; their lease expires and they
                # are claimed again (splitting would only wait that long once per job)
                log.error("batch_write_abandoned", kind=kind, n=len(outcomes), error=describe(exc)[:300])
                return Counter()
            if len(outcomes) == 1:
                o = outcomes[0]
                if not o.ok:
                    # even recording the failure fails: leave the job to its lease, which expires and retries it
                    log.error("job_write_failed", kind=kind, job=o.job.id, error=describe(exc)[:300])
                    return Counter()
                # the write itself fails for this job: it becomes the job's error
                o.error, o.result = f"write failed: {describe(exc)}", None
                return await self.write(kind, handler, [o])
            log.warning("batch_write_failed_splitting", kind=kind, n=len(outcomes), error=describe(exc)[:200])
            counts: Counter[str] = Counter()
            for o in outcomes:
                counts += await self.write(kind, handler, [o])
            return counts

    async def _write_retrying(
        self, kind: str, handler: Handler, outcomes: list[Outcome], inference: dict[str, Any] | None = None
    ) -> Counter[str]:
        """Write; when the connection breaks (server restart, failover) or the txn is rolled back (deadlock),
        write the same results again once a connection is back, rather than blaming the jobs for it.

        Bounded by about one lease: after that the jobs may belong to another worker (the guard drops ours).
        """
        deadline = time.monotonic() + transaction_bounds(self.settings).silent
        delay = 0.25
        while True:
            try:
                # a short wait for a connection: the pool's own 30 s would outlast the whole retry budget
                return await self._write_txn(kind, handler, outcomes,
                                             timeout=max(1.0, min(5.0, deadline - time.monotonic())), inference=inference)
            except psycopg.Error as exc:
                if not transient(exc) or time.monotonic() + delay > deadline:
                    raise
                log.warning("batch_write_retrying", kind=kind, n=len(outcomes), retry_in=delay, error=describe(exc)[:200])
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _write_txn(
        self, kind: str, handler: Handler, outcomes: list[Outcome], timeout: float | None = None,
        inference: dict[str, Any] | None = None,
    ) -> Counter[str]:
        jobs = {o.job.id: o.job for o in outcomes}
        async with self._pool().connection(timeout=timeout) as conn, \
                bounded_transaction(conn, self.settings):
            cur = await conn.execute(q("lock_owned_jobs"), {"ids": list(jobs), "worker": self.worker_id,
                                                            "claims": [j.claimed_at for j in jobs.values()]})
            owned = {r["id"] for r in await cur.fetchall()}
            lost = len(jobs) - len(owned)
            if lost:
                log.warning("lease_lost_results_dropped", kind=kind, n=lost)
            mine = [o for o in outcomes if o.job.id in owned]
            # the rows this write touches, locked in one order first (more than one row: a single one cannot cross)
            touched = {o.job.ref_id for o in mine if o.ok or self._final(o) or handler.writes_on_retry}
            if len(touched) > 1:
                await handler.lock_rows(conn, list(touched))
            ok = [o for o in mine if o.ok and o.skip_reason is None]
            report = await handler.write(conn, ok) if ok else WriteReport()
            skipped = [o for o in mine if o.ok and o.skip_reason is not None]
            done = report.written + report.already_written + [o.job.id for o in skipped]
            # why each job is done with nothing to write, or nothing to serve (an emptied body)
            reasons = {**report.notes, **{o.job.id: o.skip_reason for o in skipped}}
            if done:
                await conn.execute(q("complete_jobs"), {"ids": done, "reasons": [reasons.get(i) for i in done],
                                                        "worker": self.worker_id})
            for job_id, reason in reasons.items():
                log.info("job_skipped", kind=kind, job=job_id, ref=jobs[job_id].ref_id, reason=reason)
            for job_id in report.superseded:
                await conn.execute(
                    q("supersede_job"), {"id": job_id, "worker": self.worker_id,
                                         "reason": report.notes.get(job_id, "superseded: the row changed meanwhile")}
                )
            changed = report.superseded + [o.job.id for o in skipped if o.superseded]
            # what became of the failed ones: "retried", "failed" (for good), or done as superseded ("pending",
            # "changed", "removed": processed, not failed); counted and logged once this transaction commits, not
            # before: one rolled back (a deadlock) is written again
            fates = {o.job.id: await self._fail_or_retry(conn, handler, o) for o in mine if not o.ok}
            changed += [i for i, how in fates.items() if how == "changed"]
            if released := sum(how == "released" for how in fates.values()):
                await conn.execute(q("notify_jobs"), {"kind": kind, "n": released})
            if changed and (n := await handler.requeue_changed(conn, changed)):
                # an edit committed after these jobs loaded their rows queued no job of its own: one is queued now
                await conn.execute(q("notify_jobs"), {"kind": kind, "n": n})
                log.info("changed_rows_requeued", kind=kind, n=n)
            if inference is not None:
                await conn.execute(q("log_inference"), inference)
            await handler.notify_written(conn, report, jobs)
        closed = sum(how in ("pending", "changed", "removed") for how in fates.values())
        counts = Counter(processed=len(done) + len(report.superseded) + closed,
                         retried=sum(how == "retried" for how in fates.values()),
                         failed=sum(how == "failed" for how in fates.values()))
        for name, table in (("processed", self.stats.processed), ("retried", self.stats.retried),
                            ("failed", self.stats.failed)):
            if counts[name]:
                self.stats.add(table, kind, counts[name])
        for o in mine:
            self._log_fate(o, fates.get(o.job.id))
        metrics.observe_results(kind, (jobs[i].queued_at for i in report.written))
        return counts

    def _final(self, o: Outcome) -> bool:
        """Whether a failed job fails for good (or is superseded), rather than being retried."""
        return not (o.retry and o.job.attempts < self.settings.max_attempts)

    def _delay(self, o: Outcome) -> float:
        s = self.settings
        delay = backoff_delay(o.job.attempts, s.retry_backoff_seconds, s.retry_backoff_max_seconds)
        if o.retry_after is not None:
            # a busy endpoint's Retry-After: no sooner than it asked, nor later than the longest backoff (a wait of
            # hours is a quota, not a rate limit: the job's last attempts then fail saying so)
            delay = max(delay, min(o.retry_after, s.retry_backoff_max_seconds))
        return delay

    def _log_fate(self, o: Outcome, how: str | None) -> None:
        """The log event of a failed job's fate, once its write committed."""
        if how == "retried":
            log.warning("job_retry_scheduled", kind=o.job.kind, job=o.job.id, ref=o.job.ref_id,
                        attempt=o.job.attempts, delay_s=self._delay(o), error=o.error)
        elif how == "changed":
            log.info("job_failure_superseded", kind=o.job.kind, job=o.job.id, ref=o.job.ref_id, error=o.error)
        elif how == "removed":
            log.info("job_failure_of_removed_row", kind=o.job.kind, job=o.job.id, ref=o.job.ref_id, error=o.error)
        elif how == "failed":
            (log.error if self._failures_are_errors else log.info)(
                "job_failed", kind=o.job.kind, job=o.job.id, ref=o.job.ref_id, attempts=o.job.attempts, error=o.error)

    async def _fail_or_retry(self, conn: psycopg.AsyncConnection, handler: Handler, o: Outcome) -> str | None:
        """Retry the failed job ("retried"), or fail it for good ("failed"); one a stopping worker abandoned goes back
        to the queue at once ("released"). Superseded instead (done), it says why:
        "pending", a newer pending job of the row has its new state; "changed", its row changed since the job read
        it (the caller queues a job for the new content: handler.requeue_changed); "removed", its row was deleted or
        truncated meanwhile. None: no longer this worker's."""
        params = {"id": o.job.id, "worker": self.worker_id, "error": o.error}
        if o.abandoned:  # the worker is stopping: the next worker takes it at once (the caller NOTIFYs)
            cur = await conn.execute(q("release_job"), params)
            if cur.rowcount:
                await handler.record_retry(conn, o.job, o.error or "abandoned")  # a partial answer is withdrawn
                return "released"
            cur = await conn.execute(q("supersede_job"), {**params, "reason": "superseded: a newer pending job runs it"})
            return "pending" if cur.rowcount else None
        if not self._final(o):
            cur = await conn.execute(q("retry_job"), {**params, "delay": self._delay(o)})
            if cur.rowcount:
                await handler.record_retry(conn, o.job, o.error or "unknown error")
                return "retried"
            # a newer pending job of the row has its new state: this one is done, its error kept as the reason
            cur = await conn.execute(q("supersede_job"), {**params, "reason": f"superseded after error: {o.error}"})
            return "pending" if cur.rowcount else None
        if o.read_hash is not None and await handler.changed_since(conn, o.job, o.read_hash):
            # the failure is the old content's (an edit committed after the job read the row, which may have
            # queued no job of its own): the row is not failed, its new content gets a job
            cur = await conn.execute(q("supersede_job"), {**params, "reason": f"superseded after error: {o.error}"})
            return "changed" if cur.rowcount else None
        if (await conn.execute(q("close_job_of_removed_row"), params)).rowcount:
            return "removed"  # its row was deleted or truncated while it ran: nobody can retry it
        cur = await conn.execute(q("fail_job"), params)
        if not cur.rowcount:
            return None
        await handler.record_failure(conn, o.job, o.error or "unknown error")
        return "failed"
