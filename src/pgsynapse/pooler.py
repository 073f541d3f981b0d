"""Seeing a connection pooler between a client's LISTEN and PostgreSQL (the worker's listener has its own check,
listener/listener.py ``_say_if_pooled``).

A pooler (PgBouncer, in any mode) hands the client a backend pid of its own making at login, so it differs from
``pg_backend_pid()`` on the server. Its mode cannot be seen: a session-mode pooler is fine for LISTEN, a
transaction-mode one is not, so an explicit ``listen_url`` is taken as meant and only the default is checked.
"""

from __future__ import annotations

import psycopg
from psycopg.rows import dict_row

from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)

# the URLs already warned about in this process: an application may open a Client per request
_said: set[str] = set()


async def say_if_client_listen_pooled(conn: psycopg.AsyncConnection, url: str, recheck_seconds: float) -> None:
    """Warn, once per ``url`` in this process, when the Client's LISTEN connection ``conn`` (on ``url``, no
    ``listen_url`` given) goes through a pooler: through a transaction pooler its LISTEN goes back to the pool, so
    no answer's NOTIFY reaches it and an ask finds its answer only at its re-check every ``recheck_seconds``."""
    if url in _said:
        return
    row = await (await conn.cursor(row_factory=dict_row).execute(q("session_backend_pid"))).fetchone()
    if row is None or row["pid"] == conn.info.backend_pid:
        return
    _said.add(url)
    log.warning(
        "client_listen_through_pooler",
        client_backend_pid=conn.info.backend_pid,
        server_backend_pid=row["pid"],
        effect=(f"a connection pooler sits between this Client's LISTEN and PostgreSQL (the backend pid it gave is "
                f"not the server's). In transaction pooling mode (PgBouncer pool_mode = transaction) the LISTEN goes "
                f"back to the pool with its server connection: no answer's NOTIFY reaches this Client, and an ask "
                f"finds its answer only at its re-check, every {recheck_seconds} s"),
        fix=("give the Client a direct URL of the same database, or a pool_mode = session entry, for its LISTEN: "
             "Client(url, listen_url=...), or PGSYNAPSE_LISTEN_URL for `pgsynapse ask` / `sql-ask` (a "
             "session-mode pooler is fine: naming it as listen_url silences this); docs/operations.md, PgBouncer"),
    )
