"""The metrics scrape reads the queue from the partial indexes: on a jobs table that is mostly done rows (the
history a busy installation keeps for `done_job_retention_seconds`), no query of a scrape scans the table."""

from __future__ import annotations

from types import SimpleNamespace

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from pgsynapse.metrics import WorkerCollector

pytestmark = pytest.mark.anyio

DONE = 60_000


class RecordingConnection(psycopg.AsyncConnection):
    """A real connection that remembers the statements it was given (the scrape's queries, as sent)."""

    statements: list[str] = []

    async def execute(self, query, params=None, **kw):  # type: ignore[override]
        RecordingConnection.statements.append(str(query))
        return await super().execute(query, params, **kw)


def _seed(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgsynapse.jobs (kind, ref_id, status, attempts, created_at, finished_at, completions)"
            " SELECT (ARRAY['embed', 'answer'])[1 + i %% 2], i, 'done', 1, now() - interval '1 day', now(), 1"
            " FROM generate_series(1, %s) i", (DONE,))
        conn.execute(
            "INSERT INTO pgsynapse.jobs (kind, ref_id, status, created_at) VALUES"
            " ('embed', 1, 'pending', now() - interval '90 seconds'), ('embed', 2, 'pending', now()),"
            " ('answer', 3, 'pending', now() - interval '10 seconds')")
        conn.execute(
            "INSERT INTO pgsynapse.jobs (kind, ref_id, status, attempts, worker, lease_until) VALUES"
            " ('embed', 4, 'running', 1, 'w', now() + interval '1 minute')")
        conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id, status, attempts, last_error) VALUES"
                     " ('embed', 5, 'failed', 5, 'x'), ('backfill', 6, 'failed', 5, 'x')")
        conn.execute("ANALYZE pgsynapse.jobs")


async def test_scrape_counts_the_queue_without_scanning_the_jobs_table(db_url):
    _seed(db_url)
    RecordingConnection.statements.clear()
    async with AsyncConnectionPool(db_url, connection_class=RecordingConnection, kwargs={"row_factory": dict_row},
                                   min_size=1, max_size=1, open=False) as pool:
        collector = WorkerCollector(SimpleNamespace(pool=pool))  # type: ignore[arg-type]
        await collector.refresh()
        assert collector.db_up
        on_jobs = [s for s in RecordingConnection.statements if "pgsynapse.jobs" in s]
        assert on_jobs, RecordingConnection.statements
        async with pool.connection() as conn:
            for sql in on_jobs:
                plan = "\n".join(r["QUERY PLAN"] for r in await (await conn.execute("EXPLAIN " + sql)).fetchall())
                assert "Seq Scan on jobs" not in plan, plan

    by_kind = {r["kind"]: r for r in collector.queue}
    assert (by_kind["embed"]["pending"], by_kind["embed"]["running"], by_kind["embed"]["failed"]) == (2, 1, 1)
    assert (by_kind["answer"]["pending"], by_kind["answer"]["failed"]) == (1, 0)
    assert by_kind["backfill"]["failed"] == 1
    assert 90 <= float(by_kind["embed"]["oldest_pending_seconds"]) < 600
