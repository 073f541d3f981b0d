"""The worker: claim batches, compute outside transactions, write in short ones, retry, shut down cleanly.

Waiting (LISTEN or poll, in :mod:`pgsynapse.listener.listener`) is kept apart from working (one batch,
:meth:`Worker.process_batch`), so each is small and testable.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg
from anyio.abc import TaskGroup, TaskStatus
from pgvector.psycopg import register_vector_async
from psycopg_pool import AsyncConnectionPool
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgsynapse import metrics
from pgsynapse.config import Settings
from pgsynapse.handlers import registry
from pgsynapse.handlers.base import Handler, Job, Outcome, WriteReport, describe
from pgsynapse.listener.listener import Listener
from pgsynapse.listener.wakeup import Wakeups
from pgsynapse.logs import get_logger
from pgsynapse.models import ModelCache, rss_bytes
from pgsynapse.queries import q

log = get_logger(__name__)


def backoff_delay(attempts: int, base: float, cap: float) -> float:
    """Seconds before the next attempt: base, 2*base, 4*base, ... capped."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


def transient(exc: BaseException) -> bool:
    """A database error that says nothing about the rows: the connection broke, the server is restarting,
    or the transaction lost a deadlock/serialization race. Writing the same results again is right."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate or ""
    return not state or state.startswith(("08", "57P", "40"))


@dataclass
class WorkerStats:
    """Live counters of one worker process (read by status, health and metrics)."""

    processed: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    retried: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    fallback_polls: int = 0
    last_tick: float = field(default_factory=time.monotonic)
    loop_ticks: dict[int, float] = field(default_factory=dict)  # per dispatcher loop (task id): stall detection

    def add(self, table: dict[str, int], kind: str, n: int = 1) -> None:
        table[kind] = table.get(kind, 0) + n


class Worker:
    """One worker process. ``await Worker(settings, url).run()`` until SIGINT/SIGTERM or :meth:`request_stop`."""

    def __init__(
        self,
        settings: Settings,
        url: str,
        *,
        models: ModelCache | None = None,
        handlers: dict[str, Handler] | None = None,
    ) -> None:
        self.settings = settings
        self.url = url
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.models = models or ModelCache(
            model_path=settings.model_path,
            device=settings.device,
            threads=settings.torch_threads,
            onnx_threads=settings.onnx_threads,
        )
        if handlers is None:
            known = registry()
            unknown = [k for k in settings.kinds if k not in known]
            if unknown:
                from pgsynapse.errors import ConfigError

                raise ConfigError(f"invalid setting kinds [PGSYNAPSE_KINDS]: unknown job kind(s) {unknown}")
            bound = settings.model_copy(update={"database_url": url})
            handlers = {k: known[k](bound, self.models) for k in settings.kinds}
        self.handlers = handlers
        self.kinds = list(self.handlers)
        self.wakeups = Wakeups(self.kinds)
        self.listener = Listener(url, self.wakeups, reconnect_max=settings.reconnect_max_seconds)
        self.stats = WorkerStats()
        self.stopping = anyio.Event()
        self.pool: AsyncConnectionPool | None = None
        self.in_flight = 0
        # micro-batching: how many batches of a kind are computing, and an event set when one finishes
        self._computing = {k: 0 for k in self.kinds}
        self._compute_done = {k: anyio.Event() for k in self.kinds}
        self._last_cache_cleanup = 0.0
        self._registered = False
        self._tasks: TaskGroup | None = None
        self._switching = False  # a runtime switch of a newly active version is running in a thread
        from pgsynapse.cache import default_lru

        default_lru.size = settings.cache_lru_size

    # -- lifecycle ---------------------------------------------------------------------------
    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("worker_stopping", worker=self.worker_id, in_flight=self.in_flight)
            self.stopping.set()
            self.wakeups.stop()

    async def _configure(self, conn: psycopg.AsyncConnection) -> None:
        await register_vector_async(conn)

    async def warm_up(self) -> None:
        """Load the models of the serving versions now, so start-up fails fast on a bad model."""
        assert self.pool is not None
        if {"embed", "answer"} & set(self.handlers):
            from pgsynapse.export import optimise_active_version

            await anyio.to_thread.run_sync(optimise_active_version, self.settings, self.url)
        async with self.pool.connection() as conn:
            if "retrain" in self.handlers:
                await conn.execute("UPDATE pgsynapse.learning_settings SET retrain_min_feedback = %s",
                                   (self.settings.retrain_min_feedback,))
            for handler in self.handlers.values():
                refresh = getattr(handler, "refresh_versions", None)
                if refresh is not None:
                    await refresh(conn)
                    await anyio.to_thread.run_sync(handler.embedders)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED, handle_signals: bool = True) -> None:
        self.pool = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=4 + len(self.kinds),
            kwargs={"row_factory": dict_row, "application_name": "pgsynapse-worker", "autocommit": True},
            configure=self._configure,
            # a connection broken while idle (server restart, terminated backend) is replaced, not handed out
            check=AsyncConnectionPool.check_connection,
            open=False,
        )
        await self.pool.open(wait=True, timeout=30)
        try:
            await self.warm_up()
            async with anyio.create_task_group() as tg:
                self._tasks = tg
                if handle_signals:
                    tg.start_soon(self._watch_signals)
                await tg.start(self.listener.run)
                tg.start_soon(self._maintenance)
                log.info("worker_started", worker=self.worker_id, kinds=self.kinds, listening=self.listener.connected)
                task_status.started()
                async with anyio.create_task_group() as loops:
                    for kind in self.kinds:
                        # two loops per kind by default: one computes while the other claims/writes
                        for _ in range(getattr(self.handlers[kind], "concurrency", 2)):
                            loops.start_soon(self._kind_loop, kind)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if self._registered:
                    try:
                        async with self.pool.connection(timeout=5) as conn:
                            await conn.execute(q("worker_deregister"), {"worker": self.worker_id})
                    except (psycopg.Error, OSError) as exc:  # the row is pruned a day later; nothing else depends on it
                        log.warning("worker_deregister_failed", error=" ".join(str(exc).split())[:200])
                await self.pool.close()
        log.info("worker_stopped", worker=self.worker_id, processed=self.stats.processed, failed=self.stats.failed)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal_received", signal=signal.Signals(signum).name)
                self.request_stop()

    async def _maintenance(self) -> None:
        """Renew our leases and return expired ones to the queue."""
        interval = max(0.2, min(self.settings.lease_seconds / 3, 10.0))
        while True:
            try:
                await self.reap_expired()
                assert self.pool is not None
                async with self.pool.connection() as conn:
                    await conn.execute(q("renew_leases"), {"lease": self.settings.lease_seconds, "worker": self.worker_id})
                    await self.heartbeat(conn)
                if time.monotonic() - self._last_cache_cleanup >= self.settings.cache_cleanup_interval:
                    self._last_cache_cleanup = time.monotonic()
                    await self.cleanup_cache()
                    await self.prune_done_jobs()
            except (psycopg.Error, OSError) as exc:
                log.warning("maintenance_failed", error=" ".join(str(exc).split())[:200])
            await anyio.sleep(interval)

    async def heartbeat(self, conn: psycopg.AsyncConnection) -> None:
        """Register this worker for ``status``: kinds, loaded model versions with their memory, RSS, counts.
        First unload the model versions no longer served (retired, rejected, or moved to another runtime)."""
        host, pid = socket.gethostname(), os.getpid()
        serving = await (await conn.execute(q("serving_versions"))).fetchall()
        for model in self.models.evict_except(serving):
            log.info("model_unloaded", version=model.spec.version_id, runtime=model.spec.runtime,
                     rss_added_mb=model.describe()["rss_added_mb"])
        await self._switch_runtime_if_due(conn, serving)
        if not self._registered:
            await conn.execute(q("workers_prune"))
        await conn.execute(q("worker_heartbeat"), {
            "worker": self.worker_id, "host": host, "pid": pid, "kinds": list(self.kinds),
            "models": Jsonb([m.describe() for m in self.models.loaded()]),
            "rss_mb": round(rss_bytes() / 2**20, 1), "processed": Jsonb(dict(self.stats.processed)),
        })
        self._registered = True

    async def _switch_runtime_if_due(self, conn: psycopg.AsyncConnection, serving: list[dict[str, Any]]) -> None:
        """A version promoted while this worker runs is on torch: move it to ``settings.runtime`` as at start,
        in a thread (serving goes on meanwhile; the handlers pick up the new runtime at their next batch)."""
        active = next((v for v in serving if v["status"] == "active"), None)
        if (active is None or active["runtime"] != "torch" or self.settings.runtime == "torch" or self._switching
                or self._tasks is None or not {"embed", "answer"} & set(self.handlers)):
            return
        row = await (await conn.execute(
            "SELECT metrics->'runtime_export'->>'requested' AS requested FROM pgsynapse.model_versions WHERE id = %s",
            (active["id"],))).fetchone()
        if row is None or row["requested"] == self.settings.runtime:
            return  # tried already (refused or failed): once per version
        self._switching = True
        self._tasks.start_soon(self._switch_runtime)

    async def _switch_runtime(self) -> None:
        from pgsynapse.export import optimise_active_version

        try:
            await anyio.to_thread.run_sync(optimise_active_version, self.settings, self.url, abandon_on_cancel=True)
        except Exception as exc:  # noqa: BLE001 - the version stays on torch; the next heartbeat tries again
            log.warning("runtime_export_failed", error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        finally:
            self._switching = False

    async def cleanup_cache(self) -> None:
        """Enforce the inference cache's TTL and size bound."""
        from pgsynapse.cache import cleanup

        assert self.pool is not None
        async with self.pool.connection() as conn:
            removed = await cleanup(conn, ttl_seconds=self.settings.cache_ttl_seconds, max_rows=self.settings.cache_max_rows)
        if removed:
            log.info("inference_cache_cleaned", removed=removed)

    async def prune_done_jobs(self, batch: int = 10_000) -> int:
        """Delete done jobs (and ``inference_log`` rows) past ``done_job_retention_seconds``, ``batch`` rows per
        statement. Returns the jobs removed."""
        retention = self.settings.done_job_retention_seconds
        if retention <= 0:
            return 0
        assert self.pool is not None
        params = {"retention": retention, "limit": batch}
        async with self.pool.connection() as conn:

            async def delete_in_batches(query: str) -> int:
                removed = 0
                for _ in range(100):  # at most 100 statements per run; the next run takes the rest
                    n = (await conn.execute(q(query), params)).rowcount or 0
                    removed += n
                    if n < batch:
                        break
                return removed

            removed = await delete_in_batches("prune_done_jobs")
            await delete_in_batches("prune_inference_log")
        if removed:
            log.info("done_jobs_pruned", removed=removed, retention_seconds=retention)
        return removed

    async def reap_expired(self) -> None:
        assert self.pool is not None
        async with self.pool.connection() as conn:
            async with conn.transaction():
                cur = await conn.execute(q("reap_expired_leases"), {"max_attempts": self.settings.max_attempts})
                row = await cur.fetchone()
                failed = row["failed"] if row else []
                for f in failed:
                    handler = self.handlers.get(f["kind"])
                    if handler is not None:
                        job = Job(f["id"], f["kind"], f["ref_id"], {}, 0, None)  # type: ignore[arg-type]
                        await handler.record_failure(conn, job, f["last_error"])
        if row and (row["requeued"] or failed):
            log.warning("leases_expired", requeued=row["requeued"], failed=len(failed), superseded=row["superseded"])
        if row and row["requeued"]:
            # requeued jobs send no NOTIFY: without this they would wait for the fallback poll
            self.wakeups.wake_all()

    # -- the loop ----------------------------------------------------------------------------
    async def _kind_loop(self, kind: str) -> None:
        # a handler whose batches legitimately run for minutes (retrain: its own process, own time budget)
        # is not judged by the watchdog's stall limit
        watched = not getattr(self.handlers[kind], "watchdog_exempt", False)
        while not self.stopping.is_set():
            self.stats.last_tick = time.monotonic()
            if watched:
                self.stats.loop_ticks[anyio.get_current_task().id] = self.stats.last_tick
            try:
                jobs = await self.claim(kind, self.settings.batch_size)
            except (psycopg.Error, OSError) as exc:
                log.warning("claim_failed", kind=kind, error=" ".join(str(exc).split())[:200])
                await self.wakeups.wait(kind, min(self.settings.poll_interval, 2.0))
                continue
            if not jobs:
                timeout = await self._idle_timeout(kind)
                woken = await self.wakeups.wait(kind, timeout)
                if not woken and not self.listener.connected:
                    self.stats.fallback_polls += 1
                continue
            if len(jobs) < self.settings.batch_size:
                try:
                    jobs += await self.gather(kind, self.settings.batch_size - len(jobs))
                except (psycopg.Error, OSError) as exc:  # what is already claimed is still processed
                    log.warning("claim_failed", kind=kind, error=" ".join(str(exc).split())[:200])
            # in-flight work finishes and is written even when a stop is requested meanwhile
            with anyio.CancelScope(shield=True):
                self.in_flight += 1
                try:
                    await self.process_batch(kind, jobs)
                except Exception:  # noqa: BLE001 - never let one batch kill the worker; leases bring the jobs back
                    log.exception("batch_crashed", kind=kind, n=len(jobs))
                finally:
                    self.in_flight -= 1

    async def _idle_timeout(self, kind: str) -> float:
        """Sleep until a NOTIFY, the poll interval, or the next retry falling due, whichever comes first."""
        timeout = self.settings.poll_interval
        try:
            assert self.pool is not None
            async with self.pool.connection() as conn:
                row = await (await conn.execute(q("next_due"), {"kind": kind})).fetchone()
            if row and row["seconds"] is not None:
                timeout = min(timeout, max(0.0, float(row["seconds"])) + 0.01)
        except (psycopg.Error, OSError):
            pass
        return timeout

    async def gather(self, kind: str, room: int) -> list[Job]:
        """Micro-batching: claim more jobs for a batch short of ``batch_size``.

        While another batch of this kind computes, the model is busy anyway: keep claiming until it is free
        (or the batch is full), so batches grow with the load. With the model idle, wait at most
        ``max_wait_ms`` for more jobs, so an idle insert costs at most that much latency.
        """
        more: list[Job] = []
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while room > len(more) and not self.stopping.is_set():
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
            more += await self.claim(kind, room - len(more))
        return more

    async def claim(self, kind: str, limit: int) -> list[Job]:
        assert self.pool is not None
        jobs: list[Job] = []
        for _ in range(3):  # a claim that only finds bulk jobs expands them and claims again
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    q("claim_jobs"),
                    {"kind": kind, "limit": limit - len(jobs), "worker": self.worker_id, "lease": self.settings.lease_seconds},
                )
                rows = await cur.fetchall()
                # bulk jobs (one per large INSERT statement, ref_id < 0) become per-row jobs first
                bulk = [r["id"] for r in rows if r["ref_id"] < 0]
                if bulk:
                    async with conn.transaction():
                        cur = await conn.execute(q("expand_bulk_jobs"), {"ids": bulk, "worker": self.worker_id})
                    log.info("bulk_jobs_expanded", kind=kind, bulk=len(bulk), jobs=cur.rowcount)
            jobs += [Job(r["id"], r["kind"], r["ref_id"], r["payload"] or {}, r["attempts"], r["created_at"])
                     for r in rows if r["ref_id"] >= 0]
            if not bulk or len(jobs) >= limit:
                break
        return jobs

    async def process_batch(self, kind: str, jobs: list[Job]) -> None:
        handler = self.handlers[kind]
        started = time.perf_counter()
        assert self.pool is not None
        try:
            async with self.pool.connection() as conn:
                work, outcomes = await handler.load(conn, jobs)
            computed = await self._compute(kind, handler, work) if work else []
            outcomes = outcomes + computed
        except Exception as exc:  # noqa: BLE001 - a batch-level error: every job gets it, and is retried
            log.exception("batch_failed", kind=kind, n=len(jobs))
            outcomes = [Outcome(j, error=describe(exc)) for j in jobs]
        compute_ms = (time.perf_counter() - started) * 1000
        versions = getattr(handler, "versions", ())
        metrics.observe_batch(kind, len(jobs), compute_ms / 1000, versions)
        inference = None
        if work and versions:  # recorded in pgsynapse.inference_log by the batch's write transaction
            inference = {"op": kind, "n": len(jobs), "ms": round(compute_ms, 2), "versions": [v["id"] for v in versions]}
        await self._write(kind, handler, outcomes, inference)
        self.stats.batches += 1
        log.info(
            "batch_processed",
            kind=kind,
            n=len(jobs),
            ok=sum(o.ok for o in outcomes),
            failed=sum(not o.ok for o in outcomes),
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

    async def _write(
        self, kind: str, handler: Handler, outcomes: list[Outcome], inference: dict[str, Any] | None = None
    ) -> None:
        try:
            await self._write_retrying(kind, handler, outcomes, inference)
        except psycopg.Error as exc:
            if transient(exc):
                # the server stayed away for about a lease: not these rows' fault; their lease expires and they
                # are claimed again (splitting would only wait that long once per job)
                log.error("batch_write_abandoned", kind=kind, n=len(outcomes), error=describe(exc)[:300])
                return
            if len(outcomes) == 1:
                o = outcomes[0]
                if not o.ok:
                    # even recording the failure fails: leave the job to its lease, which expires and retries it
                    log.error("job_write_failed", kind=kind, job=o.job.id, error=describe(exc)[:300])
                    return
                # the write itself fails for this job: it becomes the job's error
                o.error, o.result = f"write failed: {describe(exc)}", None
                await self._write(kind, handler, [o])
                return
            log.warning("batch_write_failed_splitting", kind=kind, n=len(outcomes), error=describe(exc)[:200])
            for o in outcomes:
                await self._write(kind, handler, [o])

    async def _write_retrying(
        self, kind: str, handler: Handler, outcomes: list[Outcome], inference: dict[str, Any] | None = None
    ) -> None:
        """Write; when the connection breaks (server restart, failover) or the txn is rolled back (deadlock),
        write the same results again once a connection is back, rather than blaming the jobs for it.

        Bounded by about one lease: after that the jobs may belong to another worker (the guard drops ours).
        """
        deadline = time.monotonic() + max(self.settings.lease_seconds, 10.0)
        delay = 0.25
        while True:
            try:
                # a short wait for a connection: the pool's own 30 s would outlast the whole retry budget
                await self._write_txn(kind, handler, outcomes, timeout=max(1.0, min(5.0, deadline - time.monotonic())),
                                      inference=inference)
                return
            except psycopg.OperationalError as exc:
                if not transient(exc) or time.monotonic() + delay > deadline:
                    raise
                log.warning("batch_write_retrying", kind=kind, n=len(outcomes), retry_in=delay, error=describe(exc)[:200])
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _write_txn(
        self, kind: str, handler: Handler, outcomes: list[Outcome], timeout: float | None = None,
        inference: dict[str, Any] | None = None,
    ) -> None:
        assert self.pool is not None
        jobs = {o.job.id: o.job for o in outcomes}
        async with self.pool.connection(timeout=timeout) as conn, conn.transaction():
            cur = await conn.execute(q("lock_owned_jobs"), {"ids": list(jobs), "worker": self.worker_id})
            owned = {r["id"] for r in await cur.fetchall()}
            lost = len(jobs) - len(owned)
            if lost:
                log.warning("lease_lost_results_dropped", kind=kind, n=lost)
            mine = [o for o in outcomes if o.job.id in owned]
            ok = [o for o in mine if o.ok and o.skip_reason is None]
            report = await handler.write(conn, ok) if ok else WriteReport()
            done = report.written + [o.job.id for o in mine if o.ok and o.skip_reason is not None]
            if done:
                await conn.execute(q("complete_jobs"), {"ids": done, "worker": self.worker_id})
            for job_id in report.superseded:
                await conn.execute(
                    q("supersede_job"), {"id": job_id, "worker": self.worker_id, "error": "superseded: the row changed meanwhile"}
                )
            for o in mine:
                if not o.ok:
                    await self._fail_or_retry(conn, handler, o)
            if inference is not None:
                await conn.execute(q("log_inference"), inference)
            await handler.notify_written(conn, report, jobs)
        self.stats.add(self.stats.processed, kind, len(done) + len(report.superseded))
        metrics.observe_results(kind, (jobs[i].created_at for i in report.written))

    async def _fail_or_retry(self, conn: psycopg.AsyncConnection, handler: Handler, o: Outcome) -> None:
        params = {"id": o.job.id, "worker": self.worker_id, "error": o.error}
        if o.retry and o.job.attempts < self.settings.max_attempts:
            delay = backoff_delay(o.job.attempts, self.settings.retry_backoff_seconds, self.settings.retry_backoff_max_seconds)
            cur = await conn.execute(q("retry_job"), {**params, "delay": delay})
            if cur.rowcount:
                self.stats.add(self.stats.retried, o.job.kind)
                log.warning("job_retry_scheduled", kind=o.job.kind, job=o.job.id, ref=o.job.ref_id,
                            attempt=o.job.attempts, delay_s=delay, error=o.error)
            else:
                await conn.execute(q("supersede_job"), {**params, "error": f"superseded after error: {o.error}"})
            return
        cur = await conn.execute(q("fail_job"), params)
        if cur.rowcount:
            await handler.record_failure(conn, o.job, o.error or "unknown error")
            self.stats.add(self.stats.failed, o.job.kind)
            log.error("job_failed", kind=o.job.kind, job=o.job.id, ref=o.job.ref_id, attempts=o.job.attempts, error=o.error)
