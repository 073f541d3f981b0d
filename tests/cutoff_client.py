"""A worker's pool connection cut off from its server (tests/integration/test_partition_timeouts.py): run inside the
partition's network namespace as ``python -m tests.cutoff_client URL MODE``, with the TCP settings in the
environment (``PGSYNAPSE_KEEPALIVES_IDLE_SECONDS`` ...). It opens a pool with the worker's own connection arguments
(:func:`pgsynapse.db.pool_kwargs`), prints ``{"ready": backend pid}`` and then, ``in_flight``: runs a long
statement (the test cuts the link while it runs); ``after_cut``: waits for a line on stdin (the test cuts, then
writes it) and runs a short one. It prints ``{"failed": error}`` or ``{"returned": rows}`` when the statement ends."""

from __future__ import annotations

import json
import os
import sys

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from pgsynapse.config import load_settings
from pgsynapse.db import pool_kwargs


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def main(url: str, mode: str) -> None:
    settings = load_settings(environ=dict(os.environ), database_url=url)
    pool = AsyncConnectionPool(url, min_size=1, max_size=1, kwargs=pool_kwargs(url, settings, "pgsynapse-cutoff"),
                               open=False)
    await pool.open(wait=True, timeout=30)
    try:
        async with pool.connection() as conn:
            say(ready=conn.info.backend_pid)
            if mode == "after_cut":
                await anyio.to_thread.run_sync(sys.stdin.readline)
            sql = "SELECT pg_sleep(300)" if mode == "in_flight" else "SELECT 1"
            try:
                rows = await (await conn.execute(sql)).fetchall()
            except psycopg.OperationalError as exc:
                say(failed=" ".join(str(exc).split())[:300])
            else:
                say(returned=len(rows))
    finally:
        await pool.close(timeout=1)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
