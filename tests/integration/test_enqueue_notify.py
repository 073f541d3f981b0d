"""The enqueue triggers' NOTIFY switched off (``pgsynapse queue-notify off``, migration 0018): jobs are still
queued and done, the workers find them by polling every ``quiet_poll_interval``; with it on, the insert's commit
NOTIFYs. The worker here has a one-hour ``poll_interval``: without the quiet poll it would not find the job (tried:
the wait times out)."""

from __future__ import annotations

import subprocess
import sys

import anyio
import psycopg
import pytest

from pgsynapse.handlers.embed import EmbedHandler
from pgsynapse.listener.worker import Worker
from tests.helpers import aconn, fast_settings, wait_until

WAIT = 120.0  # safety net only


def when_idle(worker: Worker, kind: str) -> anyio.Event:
    """An event set once every dispatcher loop of ``kind`` waits for a wake-up at the same time (each has found
    the queue empty): a job queued after that is found only by a wake-up or a poll. Patched in before the worker
    runs, so no wait escapes it."""
    loops = getattr(worker.handlers[kind], "concurrency", 2)
    idle, waiting, original = anyio.Event(), [0], worker.wakeups.wait

    async def wait(k: str, timeout: float) -> bool:
        if k != kind:
            return await original(k, timeout)
        waiting[0] += 1
        if waiting[0] >= loops:
            idle.set()
        try:
            return await original(k, timeout)
        finally:
            waiting[0] -= 1

    worker.wakeups.wait = wait  # type: ignore[method-assign]
    return idle


@pytest.mark.anyio
@pytest.mark.parametrize("notify", [True, False])
async def test_jobs_are_done_with_or_without_the_enqueue_notify(db_url, models, notify):
    settings = fast_settings(db_url, kinds=("embed",), poll_interval=3600.0, quiet_poll_interval=0.05)
    conn = await aconn(db_url)
    await conn.execute("UPDATE pgsynapse.queue_settings SET notify_on_enqueue = %s", (notify,))
    jobs_channel = psycopg.connect(db_url, autocommit=True)
    jobs_channel.execute("LISTEN pgsynapse_jobs")
    worker = Worker(settings, db_url, models=models, handlers={"embed": EmbedHandler(settings, models)})
    idle = when_idle(worker, "embed")
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: worker.run(task_status=task_status, handle_signals=False))
        await idle.wait()
        cur = await conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('Vacuum', "
                                 "'VACUUM reclaims storage occupied by dead tuples.') RETURNING id")
        doc = (await cur.fetchone())["id"]
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,),
                         timeout=WAIT)
        worker.request_stop()
    jobs_channel.execute("SELECT 1")  # the insert committed long ago: its NOTIFY, if any, is here
    got = [n.payload for n in jobs_channel.notifies(timeout=0)]
    jobs_channel.close()
    assert got == (['{"kind" : "embed", "n" : 1}'] if notify else []), got
    await conn.close()


def test_queue_notify_command(db_url):
    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "pgsynapse", "--database-url", db_url, "queue-notify", *args],
                              capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
        return done.stdout

    assert "enqueue NOTIFY: on" in cli()
    assert "enqueue NOTIFY: off" in cli("off")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT notify_on_enqueue FROM pgsynapse.queue_settings").fetchone() == (False,)
    assert "enqueue NOTIFY: on" in cli("on")
