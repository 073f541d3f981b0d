"""A registry's table lock (``LOCK TABLE ... IN SHARE ROW EXCLUSIVE MODE``: one change of its statuses at a time),
taken so that a long wait says so.

The lock waits for every transaction holding a conflicting lock on the table (a worker's write, a session left open
in psql, another registry command): without a word, a command looked hung. :func:`lock_table` waits in slices
(db.take_xact_lock) and, past the first second, logs ``registry_lock_waiting`` with the sessions holding the table;
:func:`alock_table` does the same on an async connection (a worker's retrain writes).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row, tuple_row

from pgsynapse.db import LOCK_WAIT_SLICE_MS, take_xact_lock
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)


NOTE = ("another transaction holds this table (a worker writing, a session left open, another registry command): "
        "waiting for it to end; pg_terminate_backend(pid) ends a holder that should not be there")


def lock_table(conn: psycopg.Connection, query: str, table: str) -> None:
    """Run ``query`` (a blocking ``LOCK TABLE`` of ``table``, schema-qualified) in the transaction open on ``conn``;
    a wait of more than a second is logged (a warning: the quiet commands show it)."""
    take_xact_lock(conn, query, {}, waiting=lambda: log.warning(
        "registry_lock_waiting", table=table, holders=holders(conn, table), note=NOTE))


async def alock_table(conn: psycopg.AsyncConnection, query: str, table: str) -> None:
    """:func:`lock_table` on an async connection, in a transaction opened with ``conn.transaction()``: each wait of at
    most LOCK_WAIT_SLICE_MS in a savepoint (one that times out undoes nothing else), the first one past it logged;
    the transaction's lock_timeout is as it was after."""
    was = (await (await conn.cursor(row_factory=tuple_row).execute(q("lock_timeout_now"))).fetchone())[0]
    said = False
    while True:
        try:
            async with conn.transaction():
                await conn.execute(q("lock_wait_slice"), {"ms": LOCK_WAIT_SLICE_MS})
                await conn.execute(query)
            break
        except psycopg.errors.LockNotAvailable:
            if not said:
                said = True
                rows = await (await conn.cursor(row_factory=dict_row).execute(
                    q("table_lock_holders", "ops.sql"), {"table": table})).fetchall()
                log.warning("registry_lock_waiting", table=table, holders=[dict(r) for r in rows], note=NOTE)
    await conn.execute(q("lock_timeout_restore"), {"value": was})


def holders(conn: psycopg.Connection, table: str) -> list[dict[str, Any]]:
    """The other sessions holding a lock on ``table`` that conflicts with SHARE ROW EXCLUSIVE (what pg_stat_activity
    shows this role: another role's session has no state or transaction age unless pg_read_all_stats)."""
    return [dict(r) for r in conn.cursor(row_factory=psycopg.rows.dict_row).execute(
        q("table_lock_holders", "ops.sql"), {"table": table})]
