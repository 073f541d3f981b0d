"""Housekeeping the worker's maintenance loop runs now and then: the caches' bounds, the done jobs' retention and
the weight files of retired model versions.

Each step takes the worker's pool and settings and owes nothing else to the worker, so it runs (and is tested)
on its own; the leases and the heartbeat, which are the worker's own state, stay in :mod:`pgsynapse.listener.worker`.
"""

from __future__ import annotations

from pathlib import Path

import anyio
from psycopg_pool import AsyncConnectionPool

from pgsynapse.answer_cache import expire
from pgsynapse.artifacts import drop_weights, inside_models_root
from pgsynapse.cache import cleanup
from pgsynapse.config import Settings
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)

MAX_STATEMENTS = 100  # per query and run: the next run takes the rest


async def cleanup_caches(pool: AsyncConnectionPool, settings: Settings) -> None:
    """Enforce the inference cache's TTL and size bound, and the answer cache's max age."""
    async with pool.connection() as conn:
        removed = await cleanup(conn, ttl_seconds=settings.cache_ttl_seconds, max_rows=settings.cache_max_rows)
        expired = await expire(conn, settings.answer_cache_max_age_seconds)
    if removed:
        log.info("inference_cache_cleaned", removed=removed)
    if expired:
        log.info("answer_cache_expired", removed=expired)


async def prune_done_jobs(pool: AsyncConnectionPool, settings: Settings, batch: int = 10_000) -> int:
    """Delete done jobs (and ``inference_log`` rows) past ``done_job_retention_seconds``, ``batch`` rows per
    statement. Returns the jobs removed."""
    retention = settings.done_job_retention_seconds
    if retention <= 0:
        return 0
    params = {"retention": retention, "limit": batch}
    async with pool.connection() as conn:

        async def delete_in_batches(query: str) -> int:
            removed = 0
            for _ in range(MAX_STATEMENTS):
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


async def drop_unused_weights(pool: AsyncConnectionPool, settings: Settings) -> int:
    """Delete the weight files of retired model versions (and gate-rejected ones) that pgsynapse made and no version
    in service needs (the query ``unused_model_files`` says which), inside this host's ``DATA_DIR/models``: every
    host's worker cleans its own copy. Each directory keeps ``metrics.json`` and its configs, as a rejected
    candidate's does. Returns the bytes freed (a directory already cleaned frees none and logs nothing)."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(q("unused_model_files", "learning.sql"))).fetchall()
    freed = 0
    for row in rows:
        path = Path(row["path"])
        if not inside_models_root(path, settings.data_dir):
            continue  # another host's models folder: not this worker's to delete (nor to warn about)
        n = await anyio.to_thread.run_sync(drop_weights, path, settings.data_dir)
        if n:
            log.info("unused_weights_deleted", version=row["id"], status=row["status"], path=str(path),
                     freed_mb=round(n / 2**20, 1))
        freed += n
    return freed
