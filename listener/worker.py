"""The worker: claim batches, compute outside transactions, write in short ones, retry, shut down cleanly.

Waiting (LISTEN or poll, in :mod:`pgsynapse.listener.listener`) is kept apart from working (one batch,
:meth:`Worker.process_batch`), so each is small and testable; claiming and micro-batching are in
:mod:`pgsynapse.listener.claiming`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import socket
import time
import uuid
from typing import Any

import anyio
import psycopg
from anyio.abc import TaskGroup, TaskStatus
from pgvector.psycopg import register_vector_async
from psycopg_pool import AsyncConnectionPool
from psycopg.types.json import Jsonb

from pgsynapse import metrics
from pgsynapse.cache import default_lru
from pgsynapse.config import Settings
from pgsynapse.db import bounded_transaction, pool_kwargs, session_url
from pgsynapse.errors import ConfigError
from pgsynapse.handlers import registry
from pgsynapse.handlers.base import Handler, Job, Outcome, describe
from pgsynapse.listener.batches import Batch, LoopState, SoloGate, WorkerStats
from pgsynapse.listener.claiming import STOP_GRACE, Claiming
from pgsynapse.listener.housekeeping import cleanup_caches, drop_unused_weights, prune_done_jobs
from pgsynapse.listener.listener import Listener
from pgsynapse.listener.rollout import Rollout
from pgsynapse.listener.writer import BatchWriter
from pgsynapse.listener.wakeup import Wakeups, lone_error, unless_stopped
from pgsynapse.logs import get_logger
from pgsynapse.models import ModelCache, rss_bytes
from pgsynapse.queries import q
from pgsynapse.textsql import reader

log = get_logger(__name__)


class Worker(Claiming):
    """One worker process. ``await Worker(settings, url).run()`` until SIGINT/SIGTERM or :meth:`request_stop`.
    ``rollout=False`` (the in-process worker of a one-shot command): no runtime exports and no A/B decisions.
    ``failures_are_errors=False`` (that worker too): a job that fails for good logs ``job_failed`` at info, not error
    (the command prints its question's reason itself), and what a long-running worker warns of at its start about
    its deployment (``sql_reader_shares_worker_session``) is said at info."""

    def __init__(
        self,
        settings: Settings,
        url: str,
        *,
        models: ModelCache | None = None,
        handlers: dict[str, Handler] | None = None,
        rollout: bool = True,
        failures_are_errors: bool = True,
    ) -> None:
        self.settings = settings
        self.url = url
        self.failures_are_errors = failures_are_errors
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.models = models or ModelCache(
            model_path=settings.model_path,
            device=settings.device,
            threads=settings.torch_threads,
            onnx_threads=settings.onnx_threads,
            data_dir=settings.data_dir,
        )
        if handlers is None:
            known = registry()
            unknown = [k for k in settings.kinds if k not in known]
            if unknown:
                raise ConfigError(f"invalid setting kinds [PGSYNAPSE_KINDS]: unknown job kind(s) {unknown}")
            bound = settings.model_copy(update={"database_url": url, "sql_reader_url": reader.reader_url(url, settings)})
            handlers = {k: known[k](bound, self.models) for k in settings.kinds}
        self.handlers = handlers
        self.kinds = list(self.handlers)
        self.wakeups = Wakeups(self.kinds)
        # LISTEN needs a session: a direct URL when ``url`` goes through a transaction pooler (listen_url)
        self.listener = Listener(session_url(settings, url), self.wakeups, reconnect_max=settings.reconnect_max_seconds,
                                 settings=settings, worker_id=self.worker_id)
        self.stats = WorkerStats()
        self.writer = BatchWriter(self.worker_id, self.stats, lambda: self.settings, self._open_pool,
                                  failures_are_errors=failures_are_errors)
        self.stopping = anyio.Event()
        # once the loops have drained, the maintenance task ends between two steps (see run())
        self._winding_down = anyio.Event()
        self._maintenance_ended = anyio.Event()
        self.pool: AsyncConnectionPool | None = None
        self.in_flight = 0
        # micro-batching: how many batches of a kind are computing, and an event set when one finishes
        self._computing = {k: 0 for k in self.kinds}
        # one claim at a time per kind: two loops woken by one NOTIFY would otherwise split a statement's rows
        # between them (SKIP LOCKED), and a session's follow-up would lose its batch-mate turn
        self._claim_locks = {k: anyio.Lock() for k in self.kinds}
        self._compute_done = {k: anyio.Event() for k in self.kinds}
        self._last_cache_cleanup = 0.0
        self._registered = False
        # what this worker holds (renewed until each batch's deadline) and the gate that runs a solo job alone
        self._held: dict[int, Batch] = {}
        self.gate = SoloGate()
        self._deadline = {k: h.deadline_seconds or settings.batch_deadline_seconds for k, h in self.handlers.items()}
        # kinds whose expired jobs come back solo, whichever worker reaps them (every registered kind says)
        self._isolate_kinds = [k for k, cls in registry().items() if cls.crash_isolation]
        self._tasks: TaskGroup | None = None
        # exports of new versions to the configured runtime, and the A/B decisions (listener/rollout.py)
        self.rollout = Rollout(settings, url, self.worker_id, serves=bool({"embed", "answer"} & set(self.handlers)),
                               enabled=rollout)
        default_lru.size = settings.cache_lru_size

    # -- lifecycle ---------------------------------------------------------------------------
    def request_stop(self) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            self.wakeups.stop()
            for handler in self.handlers.values():
                handler.abandon()  # a training run is not waited for: its job goes back to the queue
            log.info("worker_stopping", worker=self.worker_id, in_flight=self.in_flight)  # once every handler knows

    def _open_pool(self) -> AsyncConnectionPool:
        assert self.pool is not None
        return self.pool

    async def _configure(self, conn: psycopg.AsyncConnection) -> None:
        await register_vector_async(conn)

    async def warm_up(self) -> None:
        """Load the models of the serving versions now (each handler's :meth:`~Handler.warm_up`), so start-up fails
        fast on a bad model and the first jobs wait for no load."""
        assert self.pool is not None
        await self.rollout.export_at_start()  # minutes at a first start: a stop abandons it (listener/rollout.py)
        async with self.pool.connection() as conn:
            if "retrain" in self.handlers:
                await conn.execute(q("set_retrain_min_feedback", "learning.sql"), {"n": self.settings.retrain_min_feedback})
            if set(reader.KINDS) & set(self.handlers):  # statements run on the reader's own login (or why not)
                await anyio.to_thread.run_sync(functools.partial(reader.prepare_at_start, self.url, self.settings,
                                                                 one_off=not self.failures_are_errors))
            if "sql_retrain" in self.handlers:
                await conn.execute(q("set_sql_retrain_min_corrections", "learning.sql"),
                                   {"n": self.settings.sql_retrain_min_corrections})
            for handler in self.handlers.values():  # each kind's models (Handler.warm_up)
                await handler.warm_up(conn)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED, handle_signals: bool = True) -> None:
        self.pool = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=4 + len(self.kinds),
            timeout=self.settings.pool_timeout_seconds,  # a connection() that names none
            # no session state (PgBouncer in transaction mode); keepalives and tcp_user_timeout: cut off from the
            # server, a connection fails in bounded time instead of waiting for the kernel (db.pool_kwargs)
            kwargs=pool_kwargs(self.url, self.settings, "pgsynapse-worker"),
            configure=self._configure,
            # a connection broken while idle (server restart, terminated backend) is replaced, not handed out
            check=AsyncConnectionPool.check_connection,
            open=False,
        )
        await self.pool.open(wait=True, timeout=30)
        try:
            # a SIGTERM while it warms up (the first start's export) stops it before it starts: exit 0, nothing left
            if await unless_stopped(self.warm_up, self.stopping, self._watch_signals if handle_signals else None):
                async with anyio.create_task_group() as tg:
                    self._tasks = tg
                    if handle_signals:
                        tg.start_soon(self._watch_signals)
                    await tg.start(self.listener.run)
                    # registered before it says it started: `status` shows every worker that logged worker_started
                    # (the maintenance loop's first heartbeat came after, so a worker cut off early never showed)
                    await self._heartbeat()
                    tg.start_soon(self._maintenance)
                    log.info("worker_started", worker=self.worker_id, kinds=self.kinds, listening=self.listener.connected)
                    task_status.started()
                    async with anyio.create_task_group() as loops:
                        for kind in self.kinds:
                            # two loops per kind by default: one computes while the other claims/writes
                            for _ in range(getattr(self.handlers[kind], "concurrency", 2)):
                                loops.start_soon(self._kind_loop, kind)
                    # drained: the maintenance step in flight ends first (STOP_GRACE at most). A query cancelled
                    # mid-flight has psycopg's own cancel request interrupted too: it warns and closes the connection
                    self._winding_down.set()
                    with anyio.move_on_after(STOP_GRACE):
                        await self._maintenance_ended.wait()
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # raised bare, as a start-up error is: its caller (the CLI, `ask`'s own worker) maps it to its exit status
            if (only := lone_error(group)) is None:
                raise
            raise only from None
        finally:
            with anyio.CancelScope(shield=True):
                if self._registered:
                    try:
                        async with self.pool.connection(timeout=5) as conn:
                            await conn.execute(q("worker_deregister"), {"worker": self.worker_id})
                    except (psycopg.Error, OSError) as exc:  # the row is pruned a day later; nothing else depends on it
                        log.warning("worker_deregister_failed", error=" ".join(str(exc).split())[:200])
                for handler in self.handlers.values():
                    await handler.aclose()
                await self.pool.close()
        log.info("worker_stopped", worker=self.worker_id, processed=self.stats.processed, failed=self.stats.failed)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal_received", signal=signal.Signals(signum).name)
                self.request_stop()

    async def _maintenance(self) -> None:
        """Renew our leases, return expired ones to the queue, register, clean up: each step on its own, so
        one that fails (and logs ``maintenance_failed`` with its step) never stops the others."""
        interval = max(0.2, min(self.settings.lease_seconds / 3, 10.0))
        steps = (("renew", self.renew_leases), ("reap", self.reap_expired), ("heartbeat", self._heartbeat),
                 ("cache_cleanup", lambda: cleanup_caches(self._open_pool(), self.settings)),
                 ("prune", lambda: prune_done_jobs(self._open_pool(), self.settings)),
                 ("unused_weights", lambda: drop_unused_weights(self._open_pool(), self.settings)))
        try:
            while not self._winding_down.is_set():
                cleanup_due = time.monotonic() - self._last_cache_cleanup >= self.settings.cache_cleanup_interval
                if cleanup_due:
                    self._last_cache_cleanup = time.monotonic()
                for name, step in steps:
                    if self._winding_down.is_set():
                        break
                    if name in ("cache_cleanup", "prune", "unused_weights") and not cleanup_due:
                        continue
                    try:
                        await step()
                    except (psycopg.Error, OSError) as exc:
                        log.warning("maintenance_failed", step=name, error=" ".join(str(exc).split())[:200])
                with anyio.move_on_after(interval):
                    await self._winding_down.wait()
        finally:
            self._maintenance_ended.set()

    async def renew_leases(self) -> None:
        """Extend the leases of the batches within their deadline; say once of each batch that passed it."""
        now = time.monotonic()
        claims: list[tuple[int, Any]] = []
        for batch in list(self._held.values()):
            if batch.live(now):
                claims += batch.claims()
            elif not batch.overdue_logged:
                batch.overdue_logged = True
                log.error("batch_deadline_exceeded", kind=batch.kind, n=len(batch.jobs), solo=batch.solo,
                          deadline_s=self._deadline[batch.kind], note="its leases run out and its jobs go back to the queue")
        if not claims:
            return
        assert self.pool is not None
        async with self.pool.connection() as conn:
            await conn.execute(q("renew_leases"), {"lease": self.settings.lease_seconds, "worker": self.worker_id,
                                                   "ids": [i for i, _ in claims], "claims": [c for _, c in claims]})

    async def _heartbeat(self) -> None:
        assert self.pool is not None
        async with self.pool.connection() as conn:
            await self.heartbeat(conn)

    async def heartbeat(self, conn: psycopg.AsyncConnection) -> None:
        """Register this worker for ``status``: kinds, loaded model versions with their memory, RSS, counts.
        First unload the model versions no longer served (retired, rejected, or moved to another runtime)."""
        host, pid = socket.gethostname(), os.getpid()
        serving = await (await conn.execute(q("serving_versions"))).fetchall()
        passages = await (await conn.execute(q("passage_versions"))).fetchall()  # they encode the chunks of some
        for model in self.models.evict_except([*serving, *passages]):
            log.info("model_unloaded", version=model.spec.version_id, runtime=model.spec.runtime,
                     rss_added_mb=model.describe()["rss_added_mb"])
        await self.rollout.step(conn, serving, self._tasks)
        if not self._registered:
            await conn.execute(q("workers_prune"))
        await conn.execute(q("worker_heartbeat"), {
            "worker": self.worker_id, "host": host, "pid": pid, "kinds": list(self.kinds),
            "models": Jsonb([m.describe() for m in self.models.loaded()]),
            "rss_mb": round(rss_bytes() / 2**20, 1), "processed": Jsonb(dict(self.stats.processed)),
        })
        self._registered = True

    async def reap_expired(self) -> None:
        assert self.pool is not None
        async with self.pool.connection() as conn:
            async with bounded_transaction(conn, self.settings):
                cur = await conn.execute(q("reap_expired_leases"), {"max_attempts": self.settings.max_attempts,
                                                                    "isolate_kinds": self._isolate_kinds})
                row = await cur.fetchone()
                failed, removed = (row["failed"], row["removed"]) if row else ([], [])
                # on their rows, whichever kinds this worker takes: a failure, or a requeued job's partial answer
                # withdrawn with a `retrying` NOTIFY (as after an error)
                for f in failed:
                    if handler := self._handler_class(f["kind"]):
                        await handler.record_failure(conn, _reaped(f), f["last_error"])
                for r in row["requeued_jobs"] if row else []:
                    if handler := self._handler_class(r["kind"]):
                        await handler.record_retry(conn, _reaped(r), r["last_error"])
                # requeued jobs send no NOTIFY of their own: wake every worker of their kinds (on commit)
                for kind, n in (row["requeued_kinds"] if row else {}).items():
                    await conn.execute(q("notify_jobs"), {"kind": kind, "n": n})
        # counted once committed: failed for good by this process, or done as superseded (processed)
        for f in failed:
            self.stats.add(self.stats.failed, f["kind"])
        for kind, n in (row["superseded_kinds"] if row else {}).items():
            self.stats.add(self.stats.processed, kind, n)
        for r in removed:  # closed as done, not failed: its row was deleted or truncated while its worker was gone
            self.stats.add(self.stats.processed, r["kind"])
            log.info("job_failure_of_removed_row", kind=r["kind"], job=r["id"], ref=r["ref_id"], error=r["error"])
        for kind, n in (row["requeued_kinds"] if row else {}).items():  # back in the queue, its attempt charged
            self.stats.add(self.stats.lease_expired, kind, n)
        if row and (row["requeued"] or failed or row["superseded"] or removed):
            log.warning("leases_expired", requeued=row["requeued"], failed=len(failed), superseded=row["superseded"],
                        removed=len(removed))
        if row and row["requeued"]:
            self.wakeups.wake_all()

    def _handler_class(self, kind: str) -> type[Handler] | None:
        """The handler class whose record_failure / record_retry (class methods: they write the row alone) record a
        reaped job's fate on its row: this worker's handler's, or the registry's for a kind it does not take (a dead
        worker's), of which no handler is built; None for a kind unknown here."""
        return type(self.handlers[kind]) if kind in self.handlers else registry().get(kind)

    # -- the loop ----------------------------------------------------------------------------
    async def _kind_loop(self, kind: str) -> None:
        # a handler whose batches legitimately run for minutes (retrain: its own process, own time budget)
        # is not judged by the watchdog at all
        handler = self.handlers[kind]
        loop = LoopState()
        if not getattr(handler, "watchdog_exempt", False):
            self.stats.loops[anyio.get_current_task().id] = loop
        while not self.stopping.is_set():
            self.stats.last_tick = loop.tick = time.monotonic()
            try:
                solo = await self._claim_solo(kind) if handler.crash_isolation else None
                if solo is None and handler.crash_isolation:
                    await self._after_solo(loop)
                jobs = [solo] if solo else await self.claim(kind, self.batch_size(kind))
            except (psycopg.Error, OSError) as exc:
                log.warning("claim_failed", kind=kind, error=" ".join(str(exc).split())[:200])
                await self.wakeups.wait(kind, min(self.settings.poll_interval, 2.0))
                continue
            if not jobs:
                if self.stopping.is_set():
                    continue  # the idle wait's query would wait for a connection too (a database down): none
                timeout = await self._idle_timeout(kind)
                woken = await self.wakeups.wait(kind, timeout)
                if not woken and not self.listener.connected:
                    self.stats.fallback_polls += 1
                continue
            # a solo job's deadline starts once it runs alone; a batch's at its claim
            batch = Batch(kind, jobs, solo=solo is not None,
                          deadline=math.inf if solo else time.monotonic() + self._deadline[kind])
            self._held[batch.id] = loop.batch = batch
            try:
                await self._run_batch(handler, batch, loop)
            finally:
                del self._held[batch.id]
                loop.batch = None

    async def _after_solo(self, loop: LoopState) -> None:
        """Wait while the worker's solo job is claimed or runs; the loop that runs it is judged meanwhile."""
        loop.waiting = True
        try:
            await self.gate.clear()
        finally:
            loop.waiting = False

    def stalled_loop(self, now: float | None = None) -> tuple[float, str] | None:
        """The most overdue watched dispatcher loop: ``(seconds past its limit, why)``, or None while all are healthy.

        An idle loop is stuck ``poll_interval + stall_seconds`` after its last turn (a hung claim query); a loop in
        a batch once the batch passes its deadline (a model call or query that hangs: the leases are no longer
        renewed), however long before that it computes (:meth:`LoopState.due`). While stopping, loops end one by
        one and the drain is bounded by the service manager's stop timeout instead.
        """
        if self.stopping.is_set():
            return None
        now = time.monotonic() if now is None else now
        idle_limit = self.settings.poll_interval + self.settings.stall_seconds
        worst: tuple[float, str] | None = None
        for loop in self.stats.loops.values():
            over = now - loop.due(idle_limit)
            if over > 0 and (worst is None or over > worst[0]):
                worst = (over, "batch past its deadline" if loop.batch is not None
                         else "dispatcher loop silent past poll_interval + stall_seconds")
        return worst

    async def _run_batch(self, handler: Handler, batch: Batch, loop: LoopState) -> None:
        kind = batch.kind
        if not batch.solo and len(batch.jobs) < self.batch_size(kind):
            try:
                await self.gather(batch)
            except (psycopg.Error, OSError) as exc:  # what is already claimed, gathered too, is still processed
                log.warning("claim_failed", kind=kind, error=" ".join(str(exc).split())[:200])
        # in-flight work finishes and is written even when a stop is requested meanwhile
        with anyio.CancelScope(shield=True):
            if not handler.crash_isolation:
                gate: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
            else:
                if not batch.solo:  # a solo job claimed meanwhile runs first
                    await self._after_solo(loop)
                gate = self.gate.solo() if batch.solo else self.gate.shared(batch)
            async with gate:
                if batch.solo:
                    batch.deadline = time.monotonic() + self._deadline[kind]
                    log.info("solo_job_started", kind=kind, job=batch.jobs[0].id, ref=batch.jobs[0].ref_id,
                             attempt=batch.jobs[0].attempts)
                self.in_flight += 1
                try:
                    await self.process_batch(kind, batch.jobs)
                except Exception:  # noqa: BLE001 - never let one batch kill the worker; leases bring the jobs back
                    log.exception("batch_crashed", kind=kind, n=len(batch.jobs))
                finally:
                    self.in_flight -= 1

    async def _idle_timeout(self, kind: str) -> float:
        """Sleep until a NOTIFY, the poll interval, or the next retry falling due, whichever comes first; while the
        enqueue triggers send no NOTIFY (queue_settings.notify_on_enqueue off), ``quiet_poll_interval`` at most."""
        timeout = self.settings.poll_interval
        try:
            assert self.pool is not None
            async with self.pool.connection() as conn:
                row = await (await conn.execute(q("next_due"), {"kind": kind})).fetchone()
            if row and not row["notify"]:
                timeout = min(timeout, self.settings.quiet_poll_interval)
            if row and row["seconds"] is not None:
                timeout = min(timeout, max(0.0, float(row["seconds"])) + 0.01)
        except (psycopg.Error, OSError):
            pass
        return timeout

    async def process_batch(self, kind: str, jobs: list[Job]) -> None:
        handler = self.handlers[kind]
        started = time.perf_counter()
        assert self.pool is not None
        work: list[Any] = []  # a load that raises leaves nothing computed
        try:
            async with self.pool.connection() as conn:
                work, outcomes = await handler.load(conn, jobs)
            computed = await self._compute(kind, handler, work) if work else []
            outcomes = outcomes + computed
        except Exception as exc:  # noqa: BLE001 - a batch-level error: every job gets it, and is retried
            log.exception("batch_failed", kind=kind, n=len(jobs))
            outcomes = [Outcome(j, error=describe(exc)) for j in jobs]
        compute_ms = (time.perf_counter() - started) * 1000
        served = handler.served_by(work)
        if served is not None:  # None: a kind that model versions compute computed nothing (every job refused)
            metrics.observe_batch(kind, len(jobs), compute_ms / 1000, served)
        inference = None
        versions = getattr(handler, "versions", ())  # embed's, recorded in pgsynapse.inference_log (performance.md)
        if work and versions:  # by the batch's write transaction
            inference = {"op": kind, "n": len(jobs), "ms": round(compute_ms, 2), "versions": [v["id"] for v in versions]}
        written = await self.writer.write(kind, handler, outcomes, inference)
        self.stats.batches += 1
        log.info(
            "batch_processed",
            kind=kind,
            n=len(jobs),
            ok=sum(o.ok for o in outcomes),
            processed=written["processed"],  # done: written, skipped or superseded
            retried=written["retried"],
            failed=written["failed"],  # for good
            compute_ms=round(compute_ms, 1),
            total_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    async def _compute(self, kind: str, handler: Handler, work: list) -> list[Outcome]:
        self._computing[kind] += 1
        try:
            return await anyio.to_thread.run_sync(handler.compute, work)
        finally:
            self._computing[kind] -= 1
            done, self._compute_done[kind] = self._compute_done[kind], anyio.Event()
            done.set()


def _reaped(row: dict[str, Any]) -> Job:
    """A job of the lease reaper's result, for a handler's record_failure or record_retry (its row: kind, ref_id)."""
    return Job(row["id"], row["kind"], row["ref_id"], {}, 0, None)  # type: ignore[arg-type]
