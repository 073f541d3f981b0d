"""The watchdog and /healthz judge the dispatcher loops: a batch slower than the idle stall limit but within its
deadline keeps both healthy; a batch hung past its deadline withholds the systemd watchdog pings and makes /healthz
answer 503; once its loop turns again, both recover and the job completes."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import anyio
import anyio.streams.stapled
import pytest
import yaml
from anyio.abc import SocketAttribute
from structlog.testing import capture_logs

from pgsynapse.daemon import Service, loop_stalled, tick_age
from pgsynapse.metrics import render
from pgsynapse.handlers.embed import EmbedHandler
from pgsynapse.listener.worker import Worker
from pgsynapse.sdnotify import Notifier
from tests.helpers import (SAFETY_TIMEOUT, aconn, fast_settings, free_port, http_get, insert_docs, metric_samples,
                           running_worker, wait_until)
from tests.notify_socket import NotifySocket

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).resolve().parents[2] / "docs"


class StuckEmbedHandler(EmbedHandler):
    """The real handler, with one fault injected: compute hangs until the test releases it."""

    def __init__(self, settings, models, entered: threading.Event, release: threading.Event) -> None:
        super().__init__(settings, models)
        self.entered, self.release = entered, release

    def compute(self, work):
        self.entered.set()
        self.release.wait(SAFETY_TIMEOUT)
        return super().compute(work)


class PingLog(Notifier):
    """The real notifier, which also notes each watchdog ping sent while the loops' tick age is past ``age``."""

    def __init__(self, address: str, worker: Worker, age: float) -> None:
        super().__init__(address)
        self.worker, self.age = worker, age
        self.late_ping = anyio.Event()

    def notify(self, *lines: str, wait: float = 0.0) -> bool:
        sent = super().notify(*lines, wait=wait)
        if sent and "WATCHDOG=1" in lines and tick_age(self.worker) > self.age:
            self.late_ping.set()
        return sent


def _overdue(service: Service) -> float:
    return next(m.samples[0].value for m in service.collector.collect() if m.name == "pgsynapse_loop_overdue_seconds")


async def test_a_long_batch_within_its_deadline_keeps_the_watchdog_and_healthz(db_url, models):
    # the operator's case: one healthy batch slower than poll_interval + stall_seconds (0.5 s here), its deadline
    # far off; its leases are renewed, so the watchdog keeps pinging and /healthz keeps answering 200
    settings = fast_settings(db_url, poll_interval=0.2, stall_seconds=0.3, batch_deadline_seconds=60.0)
    limit = settings.poll_interval + settings.stall_seconds
    entered, release = threading.Event(), threading.Event()
    worker = Worker(settings, db_url, models=models,
                    handlers={"embed": StuckEmbedHandler(settings, models, entered, release)})
    notify = NotifySocket(abstract=True)
    conn = await aconn(db_url)
    try:
        async with anyio.create_task_group() as tg:

            async def run_worker(*, task_status) -> None:
                await worker.run(task_status=task_status, handle_signals=False)
                tg.cancel_scope.cancel()

            await tg.start(run_worker)
            # a ping counts once the computing loop has been silent twice the idle limit
            pings = PingLog(notify.path, worker, 2 * limit)
            service = Service(worker, notifier=pings, watchdog_every=0.05)
            tg.start_soon(service.run)
            await anyio.to_thread.run_sync(notify.expect, "READY=1")

            try:
                insert_docs(db_url, [("slow", "a document whose embedding takes longer than the stall limit")])
                assert await anyio.to_thread.run_sync(entered.wait, SAFETY_TIMEOUT)
                withheld = []

                async def watch(scope: anyio.CancelScope) -> None:
                    await service.wait_watchdog(False)
                    withheld.append(tick_age(worker))
                    scope.cancel()

                # whichever comes first: a ping sent past twice the idle limit (the fix), or pings withheld (main)
                with anyio.fail_after(SAFETY_TIMEOUT):
                    async with anyio.create_task_group() as race:
                        race.start_soon(watch, race.cancel_scope)
                        await pings.late_ping.wait()
                        race.cancel_scope.cancel()
                assert not withheld, f"watchdog withheld after {withheld[0]:.2f}s in a batch within its deadline"
                assert tick_age(worker) > 2 * limit and worker.in_flight == 1
                assert loop_stalled(worker) is None and _overdue(service) == 0
                code, health = await service.health()
                assert code == 200 and health["status"] == "ok", health
                assert health["last_tick_age_seconds"] > health["stall_limit_seconds"]

                release.set()
                await wait_until(conn, "SELECT bool_and(status = 'embedded') FROM pgsynapse.documents")
                assert service.watchdog_ok
            finally:
                release.set()  # a failed check ends the test now, not after the hung compute's safety timeout
            worker.request_stop()
    finally:
        notify.close()
        await conn.close()


async def test_a_batch_hung_past_its_deadline_withholds_watchdog_and_fails_healthz(db_url, models):
    # the deadline, not the idle limit (0.5 s), catches a model call that hangs
    settings = fast_settings(db_url, poll_interval=0.2, stall_seconds=0.3, batch_deadline_seconds=1.5)
    entered, release = threading.Event(), threading.Event()
    worker = Worker(settings, db_url, models=models,
                    handlers={"embed": StuckEmbedHandler(settings, models, entered, release)})
    notify = NotifySocket(abstract=True)
    conn = await aconn(db_url)
    try:
        async with anyio.create_task_group() as tg:

            async def run_worker(*, task_status) -> None:
                await worker.run(task_status=task_status, handle_signals=False)
                tg.cancel_scope.cancel()  # drained: end the service duties too (as daemon.serve does)

            await tg.start(run_worker)
            service = Service(worker, notifier=Notifier(notify.path), watchdog_every=0.05)
            tg.start_soon(service.run)
            ready = await anyio.to_thread.run_sync(notify.expect, "READY=1")
            assert notify.messages[ready] == "READY=1\nSTATUS=processing embed"
            await anyio.to_thread.run_sync(notify.expect, "WATCHDOG=1", ready)
            code, health = await service.health()
            assert code == 200 and health["status"] == "ok", health

            try:
                insert_docs(db_url, [("stuck", "a document whose embedding hangs for a while")])
                assert await anyio.to_thread.run_sync(entered.wait, SAFETY_TIMEOUT)
                with anyio.fail_after(SAFETY_TIMEOUT):
                    await service.wait_watchdog(False)
                assert loop_stalled(worker) is not None and _overdue(service) > 0
                code, health = await service.health()
                assert code == 503 and health["status"] == "unhealthy" and health["db_reachable"], health
                assert health["last_tick_age_seconds"] > settings.batch_deadline_seconds, health
                assert health["loop_overdue_seconds"] > 0, health

                release.set()
                with anyio.fail_after(SAFETY_TIMEOUT):
                    await service.wait_watchdog(True)
                await wait_until(conn, "SELECT bool_and(status = 'embedded') FROM pgsynapse.documents")
                code, health = await service.health()
                assert code == 200 and health["loop_overdue_seconds"] == 0, health
            finally:
                release.set()  # a failed check ends the test now, not after the hung compute's safety timeout
            worker.request_stop()
    finally:
        notify.close()
        await conn.close()


async def test_a_request_that_fails_answers_500_and_the_worker_goes_on(db_url, models):
    """An error in answering /metrics or /healthz (a bug, a metric that cannot be read) ended the HTTP task, and the
    task group with it: the whole worker. It answers 500, logs the error, and the next request is answered."""
    worker = Worker(fast_settings(db_url), db_url, models=models)
    http = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = http.extra(SocketAttribute.local_address)[1]
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: worker.run(task_status=task_status, handle_signals=False))
        service = Service(worker, http=http, notifier=Notifier(None), watchdog_every=0)
        health = service.health

        async def broken():
            raise ValueError("a bug in the health check")

        service.health = broken  # type: ignore[method-assign]
        tg.start_soon(service.run)
        with capture_logs() as logs:
            code, body = await anyio.to_thread.run_sync(http_get, f"http://127.0.0.1:{port}/healthz")
        assert code == 500 and b"see the worker's log" in body
        [failed] = [e for e in logs if e["event"] == "http_request_failed"]
        assert failed["path"] == "/healthz" and "a bug in the health check" in failed["error"]
        service.health = health  # type: ignore[method-assign]
        code, body = await anyio.to_thread.run_sync(http_get, f"http://127.0.0.1:{port}/healthz")
        assert code == 200 and not worker.stopping.is_set(), body
        worker.request_stop()
        tg.cancel_scope.cancel()


async def test_metrics_listening_names_every_address_bound(db_url, models):
    """metrics_host resolving to several addresses ("localhost": 127.0.0.1 and ::1) gets a socket each, served
    together (a MultiListener): metrics_listening named only the first, as if the other were not served."""
    port = free_port()
    try:
        http = anyio.streams.stapled.MultiListener([await anyio.create_tcp_listener(local_host=host, local_port=port)
                                                    for host in ("127.0.0.1", "::1")])
    except OSError:
        pytest.skip("no IPv6 on this host")
    worker = Worker(fast_settings(db_url), db_url, models=models)
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: worker.run(task_status=task_status, handle_signals=False))
        with capture_logs() as logs:
            tg.start_soon(Service(worker, http=http, notifier=Notifier(None), watchdog_every=0).run)
            for url in (f"http://127.0.0.1:{port}/healthz", f"http://[::1]:{port}/healthz"):
                code, body = await anyio.to_thread.run_sync(http_get, url)  # served: its start was logged
                assert code == 200, (url, body)
        [listening] = [e for e in logs if e["event"] == "metrics_listening"]
        assert (listening["hosts"], listening["port"]) == (["127.0.0.1", "::1"], port), listening
        worker.request_stop()
        tg.cancel_scope.cancel()


def _queries() -> list[str]:
    alerts = yaml.safe_load((DOCS / "prometheus-alerts.yaml").read_text())
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    return ([r["expr"] for g in alerts["groups"] for r in g["rules"]]
            + [t["expr"] for p in dashboard["panels"] for t in p["targets"]])


async def test_every_metric_the_alerts_and_the_dashboard_query_is_scraped_with_the_labels_they_use(db_url, models):
    """After a document and a question, the worker's scrape has every series docs/prometheus-alerts.yaml and
    docs/grafana-dashboard.json query, with the labels they select and group by, and a label grouped by is never
    empty. Answer batches were labelled model_version="", runtime="" (the "by model version" panel lumped every
    version's answers together), and pgsynapse_knn_exact_scans_total only appeared at its first count, which
    PgsynapseKnnTrapped's increase() cannot see (the series had no earlier sample)."""
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url), models) as worker:
        insert_docs(db_url, [("Vacuum", "VACUUM reclaims storage held by dead tuples.")])
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'")
        await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('how is storage reclaimed?')")
        await wait_until(conn, "SELECT bool_and(status = 'answered') FROM pgsynapse.questions",
                         channel="pgsynapse_answers")
        service = Service(worker, notifier=Notifier(None), watchdog_every=0)
        await service.collector.refresh()
        scraped = metric_samples(render(service.registry).decode())
    await conn.close()
    labels: dict[str, list[dict[str, str]]] = {}
    for name, pairs in scraped:
        labels.setdefault(name, []).append(dict(pairs))
    for expr in _queries():
        grouped = {g.strip() for by in re.findall(r"\bby \(([^)]*)\)", expr) for g in by.split(",")} - {"le"}
        for name, matchers in re.findall(r"\b(pgsynapse_[a-z_]+)(\{[^}]*\})?", expr):
            assert name in labels, f"{expr}: {name} is not in the scrape"
            used = grouped | set(re.findall(r"([a-z_]+)\s*[=!]~?", matchers))
            for sample in labels[name]:
                assert used <= sample.keys(), f"{expr}: {name} has no label {sorted(used - sample.keys())}"
                if sample.get("kind") in ("embed", "answer"):  # batches computed by the text model versions
                    assert all(sample[g] for g in grouped), f"{expr}: {name} {sample} has an empty label"


async def test_an_answer_batch_that_computed_nothing_is_no_unlabelled_series(db_url, models):
    """An answer batch whose every question was refused at its load (over max_question_chars) computed nothing with any
    model version, and was observed as model_version="", runtime="": the series the per-version panels group by
    had an empty label (docs/operations.md: empty only for the kinds no text model version computes)."""
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url, kinds=("answer",), max_question_chars=10), models) as worker:
        await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('how is storage reclaimed?')")
        await wait_until(conn, "SELECT bool_and(status = 'failed') FROM pgsynapse.questions",
                         channel="pgsynapse_answers")
        service = Service(worker, notifier=Notifier(None), watchdog_every=0)
        await service.collector.refresh()
        scraped = metric_samples(render(service.registry).decode())
    await conn.close()
    unlabelled = [(name, dict(pairs)) for name, pairs in scraped
                  if name.startswith(("pgsynapse_batch_size", "pgsynapse_inference_seconds"))
                  and dict(pairs).get("kind") == "answer" and not dict(pairs).get("model_version")]
    assert unlabelled == [], unlabelled


def test_an_embed_batch_that_computed_nothing_is_not_observed(db_url, models):
    """The embed handler's batch labels were its serving versions whatever it computed: a batch whose load failed
    before any version was read was observed as model_version="" (the fresh-clone run found such a series left by
    another test in its process). Nothing computed, nothing observed; computed work, every serving version."""
    handler = EmbedHandler(fast_settings(db_url), models)
    assert handler.served_by([]) is None
    handler.versions = [{"id": 1, "runtime": "torch"}]
    assert handler.served_by([]) is None and handler.served_by(["work"]) == handler.versions  # type: ignore[list-item]


async def test_the_traffic_gauge_is_the_share_each_version_is_routed_now(db_url, models):
    """pgsynapse_model_traffic_percent ("share of sessions routed") gave a candidate still backfilling the share it
    will get once backfilled (here 30) while it got none: the dashboard's split summed to 130 %. A candidate not
    routed is 0 until it serves; a routed one has its share, the active version what they leave."""
    conn = await aconn(db_url)
    ids = {}
    for name, backfilled, share in (("routed", True, 10), ("filling", False, 30)):
        ids[name] = (await (await conn.execute(
            "INSERT INTO pgsynapse.model_versions (name, dim, status, backfilled_at, traffic_percent)"
            " VALUES (%s, 384, 'candidate', CASE WHEN %s THEN now() END, %s) RETURNING id",
            (name, backfilled, share))).fetchone())["id"]
    await conn.close()
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models) as worker:
        service = Service(worker, notifier=Notifier(None), watchdog_every=0)
        await service.collector.refresh()
        scraped = metric_samples(render(service.registry).decode())
    traffic = {int(dict(labels)["model_version"]): value for (name, labels), value in scraped.items()
               if name == "pgsynapse_model_traffic_percent"}
    assert traffic == {1: 90.0, ids["routed"]: 10.0, ids["filling"]: 0.0}, traffic


async def test_a_retired_version_has_no_model_series(db_url, models):
    """A retired version (its vectors dropped, never to serve again) kept its pgsynapse_model_version_info series
    (status="retired") and a pgsynapse_model_traffic_percent of 0 for as long as the worker ran: one more each
    retrain, on every dashboard. Its series go, as Prometheus expects of a thing that no longer exists; a rejected
    candidate (still searched until it is retired) keeps its own."""
    conn = await aconn(db_url)
    ids = {}
    for name, status in (("gone", "retired"), ("refused", "rejected")):
        ids[name] = (await (await conn.execute(
            "INSERT INTO pgsynapse.model_versions (name, dim, status) VALUES (%s, 384, %s) RETURNING id",
            (name, status))).fetchone())["id"]
    await conn.close()
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models) as worker:
        service = Service(worker, notifier=Notifier(None), watchdog_every=0)
        await service.collector.refresh()
        scraped = metric_samples(render(service.registry).decode())
    info = {dict(labels)["model_version"]: dict(labels)["status"] for (name, labels), value in scraped.items()
            if name == "pgsynapse_model_version_info"}
    traffic = {dict(labels)["model_version"] for (name, labels), value in scraped.items()
               if name == "pgsynapse_model_traffic_percent"}
    # main: the retired version's series too, {'1': 'active', '2': 'retired', '3': 'rejected'}
    assert info == {"1": "active", str(ids["refused"]): "rejected"}, info
    assert traffic == {"1", str(ids["refused"])}, traffic
