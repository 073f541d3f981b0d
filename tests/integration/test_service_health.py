"""The watchdog and /healthz judge the dispatcher loops: a loop stuck in a model call withholds the systemd
watchdog pings and makes /healthz answer 503; once it turns again, both recover and the job completes."""

from __future__ import annotations

import threading

import anyio
import pytest

from pgsynapse.daemon import Service, loop_stalled
from pgsynapse.handlers.embed import EmbedHandler
from pgsynapse.listener.worker import Worker
from pgsynapse.sdnotify import Notifier
from tests.helpers import SAFETY_TIMEOUT, aconn, fast_settings, insert_docs, wait_until
from tests.notify_socket import NotifySocket

pytestmark = pytest.mark.anyio


class StuckEmbedHandler(EmbedHandler):
    """The real handler, with one fault injected: compute hangs until the test releases it."""

    def __init__(self, settings, models, entered: threading.Event, release: threading.Event) -> None:
        super().__init__(settings, models)
        self.entered, self.release = entered, release

    def compute(self, work):
        self.entered.set()
        self.release.wait(SAFETY_TIMEOUT)
        return super().compute(work)


async def test_stuck_loop_withholds_watchdog_and_fails_healthz(db_url, models):
    settings = fast_settings(db_url, poll_interval=0.2, stall_seconds=0.3)
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

            insert_docs(db_url, [("stuck", "a document whose embedding hangs for a while")])
            assert await anyio.to_thread.run_sync(entered.wait, SAFETY_TIMEOUT)
            with anyio.fail_after(SAFETY_TIMEOUT):
                await service.wait_watchdog(False)
            assert loop_stalled(worker) is not None
            code, health = await service.health()
            assert code == 503 and health["status"] == "unhealthy" and health["db_reachable"], health
            assert health["last_tick_age_seconds"] > health["stall_limit_seconds"]

            release.set()
            with anyio.fail_after(SAFETY_TIMEOUT):
                await service.wait_watchdog(True)
            await wait_until(conn, "SELECT bool_and(status = 'embedded') FROM pgsynapse.documents")
            code, health = await service.health()
            assert code == 200, health
            worker.request_stop()
    finally:
        release.set()
        notify.close()
        await conn.close()
