"""SIGKILL during a backfill: a worker backfilling a model added by `pgsynapse model add` (another dimension) is
killed after its second batch committed, while the application keeps writing documents; the next worker resumes
from the killed step's cursor. Every chunk ends with exactly one vector of each version, none written twice, no
job failed, and the version is served only once it is complete."""

from __future__ import annotations

import signal

import psycopg
import pytest
from psycopg.rows import dict_row

from pgsynapse.learning.registry import add_model
from tests.chaos.invariants import QUIET, assert_exactly_once
from tests.embed_models import tiny_embedding_model
from tests.helpers import aconn, insert_docs, spawn_worker, wait_until

pytestmark = pytest.mark.anyio

# small steps so the kill lands between two of them, a short lease so the killed step comes back soon; otherwise
# the defaults: the default runtime (the added model is exported to it before it may serve)
ENV = {"PGSYNAPSE_BACKFILL_BATCH": "4", "PGSYNAPSE_LEASE_SECONDS": "2"}


def _docs(n: int, start: int = 0) -> list[tuple[str, str]]:
    return [(f"Doc {i}", f"Document {i} is about table {i}, its index and its rows.") for i in range(start, start + n)]


async def test_sigkill_during_backfill_resumes_and_loses_or_duplicates_nothing(db_url, record, tmp_path):
    model = tiny_embedding_model(tmp_path / "tiny-64", 64)
    conn = await aconn(db_url)
    insert_docs(db_url, _docs(40))
    worker = spawn_worker(db_url, env=ENV)
    try:
        await wait_until(conn, QUIET)
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sconn:
            v2 = add_model(sconn, model, name="tiny-64")["id"]
        first = worker.wait_event("backfill_progress")
        worker.wait_event("backfill_progress", start=worker.events.index(first) + 1)
        # the second step is writing: the first committed before it began
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(30)
    finally:
        worker.stop()
    row = await (await conn.execute(
        "SELECT (SELECT count(*) FROM pgsynapse.embeddings WHERE model_version_id = %(v)s) AS vectors,"
        " (SELECT count(*) FROM pgsynapse.chunks) AS chunks,"
        " (SELECT backfilled_at FROM pgsynapse.model_versions WHERE id = %(v)s) AS backfilled_at",
        {"v": v2})).fetchone()
    assert 4 <= row["vectors"] < row["chunks"] and row["backfilled_at"] is None, row  # killed half way
    routable = await (await conn.execute(
        "SELECT traffic_percent FROM pgsynapse.model_versions WHERE id = %s", (v2,))).fetchone()
    assert float(routable["traffic_percent"]) == 0

    insert_docs(db_url, _docs(8, start=40))  # the application goes on while no worker runs
    worker = spawn_worker(db_url, env=ENV)  # what ships: no fault
    try:
        await wait_until(conn, "SELECT backfilled_at IS NOT NULL AND NOT runtime_pending"
                               " FROM pgsynapse.model_versions WHERE id = %s", (v2,))
        await wait_until(conn, QUIET)
    finally:
        worker.stop()
    result = assert_exactly_once(db_url)  # incl. every chunk x serving version once, no embedding written twice
    dims = await (await conn.execute(
        "SELECT model_version_id AS v, vector_dims(embedding) AS d, count(*) AS n FROM pgsynapse.embeddings"
        " GROUP BY 1, 2 ORDER BY 1")).fetchall()
    chunks = result["totals"]["chunks"]
    assert [(r["v"], r["d"], r["n"]) for r in dims] == [(1, 384, chunks), (v2, 64, chunks)]
    failed = await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.jobs WHERE status = 'failed'")).fetchone()
    assert failed["n"] == 0
    await conn.close()
    record(killed_after_vectors=row["vectors"], chunks=chunks, **result["violations"])
