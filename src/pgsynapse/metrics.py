"""Prometheus metrics of one worker process.

Two sources:
- histograms and counters the worker feeds as it goes (:func:`observe_batch`, :func:`observe_results`, and the
  inference cache's :func:`cache_hit` / :func:`cache_miss`), process-wide;
- a collector read at scrape time: the worker's own counters (jobs processed/failed/retried/lease-expired by kind,
  LISTEN reconnects, fallback polls, loop tick age, how far the most overdue loop is past its limit) and a database
  snapshot (jobs pending, running and failed and the oldest pending age by kind, model versions and their traffic
  split) that :meth:`WorkerCollector.refresh` takes with a short timeout just before each scrape. The snapshot reads the jobs table through its partial indexes
  only (``queue_depth`` in ops.sql): done jobs, most of the table, are never counted at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import anyio
import psycopg
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pgsynapse.learning.routing import served_shares
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

if TYPE_CHECKING:
    from pgsynapse.listener.worker import Worker

log = get_logger(__name__)

_VERSION_LABELS = ["kind", "model_version", "runtime"]

BATCH_SIZE = Histogram(
    "pgsynapse_batch_size",
    "Jobs per processed batch, by job kind and the model versions that served it",
    _VERSION_LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    registry=None,
)
INFERENCE_SECONDS = Histogram(
    "pgsynapse_inference_seconds",
    "Time to load and compute one batch outside any transaction (reading rows, chunking, forward passes of every "
    "serving version)",
    _VERSION_LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=None,
)
RESULT_LATENCY = Histogram(
    "pgsynapse_insert_to_result_seconds",
    "From the job's creation (the triggering INSERT/UPDATE), or its retry-failed, to its result committed",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, 14400),
    registry=None,
)
CACHE_HITS = Counter(
    "pgsynapse_inference_cache_hits", "Inference results served from the cache", ["model_version"], registry=None
)
CACHE_MISSES = Counter(
    "pgsynapse_inference_cache_misses", "Inference results computed because the cache had none", ["model_version"],
    registry=None,
)
ANSWER_CACHE = Counter(
    "pgsynapse_answer_cache_lookups", "Semantic answer cache lookups by outcome (hit: answered from an earlier answer)",
    ["model_version", "outcome"], registry=None,
)
KNN_EXACT_SCANS = Counter(
    "pgsynapse_knn_exact_scans", "kNN searches whose HNSW result was all one vector (many identical chunks trap the "
    "index) and that scanned the version's vectors exactly instead", ["model_version"], registry=None,
)
PROCESS_METRICS: tuple[Collector, ...] = (BATCH_SIZE, INFERENCE_SECONDS, RESULT_LATENCY, CACHE_HITS, CACHE_MISSES,
                                          ANSWER_CACHE, KNN_EXACT_SCANS)


def observe_batch(kind: str, n: int, seconds: float, versions: Sequence[dict[str, Any]] = ()) -> None:
    """One batch of ``n`` jobs computed in ``seconds``; ``versions`` are the model versions that served it."""
    for v in versions or [{"id": "", "runtime": ""}]:
        labels = (kind, str(v.get("id", "")), str(v.get("runtime", "")))
        BATCH_SIZE.labels(*labels).observe(n)
        INFERENCE_SECONDS.labels(*labels).observe(seconds)


def observe_results(kind: str, queued_at: Iterable[datetime | None]) -> None:
    """Results committed now for jobs queued at ``queued_at``: created, or put back by retry-failed (insert ->
    result latency)."""
    now = datetime.now(timezone.utc)
    for t in queued_at:
        if t is not None:
            RESULT_LATENCY.labels(kind).observe(max(0.0, (now - t).total_seconds()))


def cache_hit(model_version: int | str, n: int = 1) -> None:
    CACHE_HITS.labels(str(model_version)).inc(n)


def cache_miss(model_version: int | str, n: int = 1) -> None:
    CACHE_MISSES.labels(str(model_version)).inc(n)


def _zero_counters(model_version: str) -> None:
    """The serving version's counters at 0 until they count: a labelled series that first appears at its first count
    has no earlier sample, so ``increase()`` (alert PgsynapseKnnTrapped) and ``rate()`` (the dashboard's cache hit
    ratio) miss that rise."""
    for counter in (KNN_EXACT_SCANS, CACHE_HITS, CACHE_MISSES):
        counter.labels(model_version)


def answer_cache_outcome(model_version: int | str, outcome: str) -> None:
    ANSWER_CACHE.labels(str(model_version), outcome).inc()


class WorkerCollector(Collector):
    """Counters and gauges read from a running :class:`Worker` and its database at scrape time."""

    def __init__(self, worker: Worker, *, db_timeout: float = 2.0) -> None:
        self.worker = worker
        self.db_timeout = db_timeout
        self.db_up = False
        self.queue: list[dict[str, Any]] = []
        self.versions: list[dict[str, Any]] = []
        self.routed: set[int] = set()  # the versions that get sessions now (routable_versions)

    async def refresh(self) -> None:
        """Take the database snapshot; on error or timeout ``pgsynapse_db_up`` reads 0 and the queue is unknown."""
        pool = self.worker.pool
        try:
            if pool is None:
                raise RuntimeError("worker not started")
            with anyio.fail_after(self.db_timeout):
                async with pool.connection() as conn:
                    self.queue = list(await (await conn.execute(q("queue_depth", "ops.sql"))).fetchall())
                    versions = await (await conn.execute(q("model_versions_metrics", "ops.sql"))).fetchall()
                    routable = await (await conn.execute(q("routable_versions", "answers.sql"))).fetchall()
                    self.versions = served_shares(versions, routable)
                    self.routed = {v["id"] for v in routable}
            for v in routable:
                _zero_counters(str(v["id"]))
            self.db_up = True
        except (psycopg.Error, OSError, TimeoutError, RuntimeError) as exc:
            log.warning("metrics_db_snapshot_failed", error=" ".join(str(exc).split())[:200] or type(exc).__name__)
            self.db_up, self.queue, self.versions = False, [], []

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        for name, doc, table in (
            ("pgsynapse_jobs_processed", "Jobs completed by this process (written, skipped or superseded)", w.stats.processed),
            ("pgsynapse_jobs_failed", "Jobs marked failed after their last attempt by this process", w.stats.failed),
            ("pgsynapse_jobs_retried", "Job attempts that failed and were scheduled again", w.stats.retried),
            ("pgsynapse_jobs_lease_expired", "Jobs whose lease expired (their worker died or hung) that this process "
             "returned to the queue", w.stats.lease_expired),
        ):
            c = CounterMetricFamily(name, doc, labels=["kind"])
            for kind in [*w.kinds, *(k for k in table if k not in w.kinds)]:  # the reaper's: a dead worker's kinds
                c.add_metric([kind], table.get(kind, 0))
            yield c
        yield CounterMetricFamily("pgsynapse_listen_reconnects", "LISTEN connection re-established after a loss",
                                  value=w.listener.reconnects)
        yield CounterMetricFamily("pgsynapse_listen_outages", "Times the LISTEN connection was lost (server restart, "
                                  "terminated backend, network)", value=w.listener.outages)
        yield CounterMetricFamily("pgsynapse_fallback_polls", "Dispatcher wake-ups by the fallback poll while LISTEN was down",
                                  value=w.stats.fallback_polls)
        yield GaugeMetricFamily("pgsynapse_listen_connected", "1 while the LISTEN connection is up",
                                value=int(w.listener.connected))
        yield GaugeMetricFamily("pgsynapse_loop_tick_age_seconds",
                                "Seconds since the least recently turning dispatcher loop came round (a loop in a batch "
                                "comes round after it)", value=w.stats.tick_age())
        stalled = w.stalled_loop()
        yield GaugeMetricFamily("pgsynapse_loop_overdue_seconds",
                                "Seconds the most overdue dispatcher loop is past its limit (idle: poll_interval + "
                                "stall_seconds since it came round; in a batch: the batch's deadline), 0 while none is: "
                                "above 0, /healthz answers 503 and the systemd watchdog is not pinged",
                                value=stalled[0] if stalled else 0.0)
        yield GaugeMetricFamily("pgsynapse_starting", "1 while the worker starts (migrations, model loads, a first "
                                "start's runtime export: /healthz names the step), 0 once it serves", value=0)
        yield GaugeMetricFamily("pgsynapse_in_flight_batches", "Batches being computed or written now", value=w.in_flight)
        yield GaugeMetricFamily("pgsynapse_db_up", "1 when the last scrape's database snapshot succeeded", value=int(self.db_up))
        depth = GaugeMetricFamily("pgsynapse_queue_jobs", "Jobs pending, running or failed by kind (all workers; done "
                                  "jobs are counted per worker by pgsynapse_jobs_processed)", labels=["kind", "status"])
        age = GaugeMetricFamily("pgsynapse_queue_oldest_pending_seconds",
                                "Age of the oldest pending job by kind (0 when none is pending)", labels=["kind"])
        if self.db_up:
            # every kind this worker serves has its series, 0 when the queue holds none of it
            empty = {"pending": 0, "running": 0, "failed": 0, "oldest_pending_seconds": None}
            rows = {k: {"kind": k, **empty} for k in w.kinds} | {r["kind"]: r for r in self.queue}
            for r in rows.values():
                for status in ("pending", "running", "failed"):
                    depth.add_metric([r["kind"], status], r[status])
                age.add_metric([r["kind"]], float(r["oldest_pending_seconds"] or 0))
        yield depth
        yield age
        info = GaugeMetricFamily("pgsynapse_model_version_info", "Model versions (1 per version; labels describe it)",
                                 labels=["model_version", "name", "runtime", "status"])
        traffic = GaugeMetricFamily("pgsynapse_model_traffic_percent", "Share of sessions routed to each model version "
                                    "now (0 for one not routed: a candidate backfilling or waiting for its runtime "
                                    "export, whatever share it is set to get then)", labels=["model_version"])
        for v in self.versions:
            info.add_metric([str(v["id"]), v["name"], v["runtime"], v["status"]], 1)
            traffic.add_metric([str(v["id"])], float(v["traffic_percent"]) if v["id"] in self.routed else 0.0)
        yield info
        yield traffic


def make_registry(collector: WorkerCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for m in PROCESS_METRICS:
        registry.register(m)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
