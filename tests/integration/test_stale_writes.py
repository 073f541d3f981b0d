"""Stale-write guards of backfills: a result computed from a row that changed while the job ran is
never written over the newer row. Each test drives the worker's steps by hand (claim, load, compute, then the
row changes, then the write), so the interleaving is certain without any timing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from pgsynapse.handlers.base import Outcome
from pgsynapse.learning.registry import retire
from pgsynapse.listener.worker import Worker
from tests.helpers import aconn, fast_settings, insert_docs, running_worker, wait_until

pytestmark = pytest.mark.anyio

ALL_EMBEDDED = "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'"


@contextlib.asynccontextmanager
async def stepped_worker(settings, models) -> AsyncIterator[Worker]:
    """A worker with its pool open and no loops running: the test calls claim, load, compute and write itself."""
    worker = Worker(settings, settings.database_url, models=models)
    worker.pool = AsyncConnectionPool(settings.database_url, min_size=1, max_size=2, open=False,
                                      kwargs={"row_factory": dict_row, "autocommit": True}, configure=worker._configure)
    await worker.pool.open()
    try:
        yield worker
    finally:
        await worker.pool.close()


async def _run_until_write(worker: Worker, kind: str) -> list[Outcome]:
    jobs = await worker.claim(kind, 10)
    assert jobs
    handler = worker.handlers[kind]
    async with worker.pool.connection() as c:
        work, known = await handler.load(c, jobs)
    return known + handler.compute(work)


async def _jobs(conn, kind: str) -> list[dict]:
    return list(await (await conn.execute(
        "SELECT status, last_error FROM pgsynapse.jobs WHERE kind = %s ORDER BY id", (kind,))).fetchall())


async def test_a_backfill_batch_of_a_version_retired_meanwhile_is_superseded(db_url, models):
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    insert_docs(db_url, [(f"Doc {i}", f"Document {i} about checkpoints and the write-ahead log.") for i in range(3)])
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await wait_until(conn, ALL_EMBEDDED)
    # a candidate version whose backfill starts now (the same weights: what matters is the guard)
    await conn.execute(
        "INSERT INTO pgsynapse.model_versions (id, name, base_version_id, artifact_path, dim, status)"
        " SELECT 2, 'candidate', 1, artifact_path, dim, 'candidate' FROM pgsynapse.model_versions WHERE id = 1")
    await conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id) VALUES ('backfill', 2)")
    async with stepped_worker(settings, models) as worker:
        outcomes = await _run_until_write(worker, "backfill")
        assert outcomes[0].ok and len(outcomes[0].result[1]) == 3
        with psycopg.connect(db_url, row_factory=dict_row) as admin:
            retire(admin, 2)  # while the batch computes
        await worker._write("backfill", worker.handlers["backfill"], outcomes)
    n = await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.embeddings WHERE model_version_id = 2")).fetchone()
    jobs = await _jobs(conn, "backfill")
    await conn.close()
    assert n["n"] == 0
    # superseded, and no next step queued for a retired version
    assert len(jobs) == 1 and jobs[0]["status"] == "done" and "superseded" in jobs[0]["last_error"]
