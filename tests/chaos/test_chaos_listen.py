"""LISTEN dropped: the listener's backend is terminated (``pg_terminate_backend``) three times under a worker
process whose fallback poll is 600 s. Each time the worker reconnects by itself and the next insert is embedded
through NOTIFY, long before any poll could have found it; each outage is counted."""

from __future__ import annotations

import pytest

from tests.chaos.invariants import QUIET, assert_exactly_once
from tests.helpers import aconn, insert_docs, spawn_worker, wait_until

pytestmark = pytest.mark.anyio

DROPS = 3


async def test_listen_dropped_then_next_insert_is_processed_without_the_poll(db_url, record):
    worker = spawn_worker(db_url, env={"PGSYNAPSE_POLL_INTERVAL": "600"})
    conn = await aconn(db_url)
    try:
        at = 0
        for i in range(DROPS):
            row = await (await conn.execute(
                "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity"
                " WHERE application_name = 'pgsynapse-listener' AND datname = current_database()")).fetchone()
            assert row["n"] == 1
            back = worker.wait_event("listen_reconnected", start=at)
            at = worker.events.index(back, at) + 1
            assert back["outages"] == back["reconnects"] == i + 1
            [doc] = insert_docs(db_url, [(f"After drop {i}", f"Inserted after listener drop number {i}.")])
            # the safety timeout is far under the 600 s poll: only NOTIFY can make this pass
            await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,),
                             timeout=60)
        await wait_until(conn, QUIET)
        result = assert_exactly_once(db_url)
    finally:
        await conn.close()
        assert worker.stop() == 0
    assert result["totals"]["documents"] == DROPS
    record(listen_drops=DROPS, reconnected=DROPS, inserts_after_drop_embedded=DROPS, poll_interval_s=600,
           lost=result["lost"], duplicated=result["duplicated"])
