"""Database access: resolve the server, open connections, wrap errors once at the boundary."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row, tuple_row

from pgsynapse.config import ENV_PREFIX, Settings, load_settings
from pgsynapse.embedded import EmbeddedPostgres
from pgsynapse.errors import DatabaseConfigError, DatabaseError
from pgsynapse.queries import q

APPLICATION_NAME = "pgsynapse"


# psycopg prepares a statement on the server once a connection has run it 5 times; through PgBouncer in
# transaction mode (before 1.21, or with max_prepared_statements = 0) the next transaction may land on another
# server connection, where that statement does not exist. pgsynapse never prepares: every connection it opens
# passes this (docs/operations.md, PgBouncer).
NO_PREPARE: dict[str, object] = {"prepare_threshold": None}


def session_url(settings: Settings, url: str) -> str:
    """Where session state may live (LISTEN, session advisory locks): ``listen_url`` when set (``url`` goes through
    a transaction pooler), else ``url`` itself."""
    return settings.listen_url or url


def tcp_params(url: str, settings: Settings | None = None) -> dict[str, object]:
    """libpq's TCP options for a connection to ``url``: keepalives and ``tcp_user_timeout`` from ``settings`` (their
    defaults without), and a 10 s ``connect_timeout``, minus any the URL sets itself (keyword arguments would win
    over it). A worker cut off from its server (a partition: no FIN, no RST) then loses each connection within
    about ``keepalives_idle + count x interval`` when it waits on the server (a statement in flight included),
    within ``tcp_user_timeout`` when what it sent is not acknowledged, instead of the kernel's hours or 15 minutes.
    libpq ignores all of them on a Unix socket."""
    def get(name: str) -> object:
        return getattr(settings, name) if settings is not None else Settings.model_fields[name].default

    params: dict[str, object] = {
        "keepalives": 1,
        "keepalives_idle": get("keepalives_idle_seconds"),
        "keepalives_interval": get("keepalives_interval_seconds"),
        "keepalives_count": get("keepalives_count"),
        "tcp_user_timeout": get("tcp_user_timeout_ms"),
        "connect_timeout": 10,
    }
    given = conninfo_to_dict(url)
    return {k: v for k, v in params.items() if k not in given}


def child_url(url: str, settings: Settings | None = None) -> str:
    """``url`` with :func:`tcp_params` (of ``settings``) written into it: for a process of pgsynapse's own that is
    given a URL and no settings (a trainer, learning/trainer_process.py), so that its connections notice a cut
    network as the worker's do. It connects with :data:`NO_PREPARE`."""
    return make_conninfo(url, **tcp_params(url, settings))


# the settings tcp_params reads
TCP_SETTINGS = ("keepalives_idle_seconds", "keepalives_interval_seconds", "keepalives_count", "tcp_user_timeout_ms")


def tcp_settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings :func:`tcp_params` reads, from their ``PGSYNAPSE_*`` variables (the rest left at their
    defaults): what a :class:`~pgsynapse.client.Client` given no settings connects with, so that it notices a cut
    network within the bounds the worker does. Only these are read: an application's environment need not hold a
    valid worker configuration. A bad value raises :class:`ConfigError` naming its variable."""
    environ = os.environ if environ is None else environ
    names = {ENV_PREFIX + name.upper() for name in TCP_SETTINGS}
    return load_settings(environ={k: v for k, v in environ.items() if k in names})


def pool_kwargs(url: str, settings: Settings, application_name: str) -> dict[str, object]:
    """The connection arguments of a worker's pool to ``url``: autocommit dict rows, no session state (they may go
    through PgBouncer in transaction mode: :data:`NO_PREPARE`) and :func:`tcp_params`."""
    return {"row_factory": dict_row, "application_name": application_name, "autocommit": True, **NO_PREPARE,
            **tcp_params(url, settings)}


def _connect_kwargs(url: str, application_name: str, settings: Settings | None) -> dict[str, object]:
    return {**NO_PREPARE, "application_name": application_name, **tcp_params(url, settings)}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text


# What restarting cannot fix when a connection fails. psycopg gives a failed connection no SQLSTATE, only libpq's
# text (psycopg/psycopg#1188), so these read it: the server's refusals by their (English) messages, each named by
# the SQLSTATE it stands for, and libpq's rejection of an option, which comes before any connection attempt
# (psycopg: "connection is bad"). A message matched by none (a server that speaks another language, a refused
# connection, a timeout, a server starting up or shutting down: 57P03) stays a DatabaseError, retried (exit 69).
CONNECTION_REFUSALS: tuple[tuple[re.Pattern[str], str], ...] = (
    # 28P01 (password), 28000 (peer, ident, cert, ...): "<method> authentication failed for user"
    (re.compile(r"authentication failed for user"), "check the user and password of the connection string"),
    # 28000
    (re.compile(r'role ".*" does not exist|no pg_hba\.conf entry for|pg_hba\.conf rejects connection|'
                r'is not permitted to log in'), "check the user and password of the connection string"),
    # 3D000: a database created later (by an orchestrator) is no reason to retry a typo every 5 s
    (re.compile(r'database ".*" does not exist'),
     "create it (CREATE DATABASE) or fix the connection string, then start pgsynapse again"),
    # 42501
    (re.compile(r"permission denied for database"), "GRANT CONNECT ON DATABASE to the connection string's user"),
    # libpq's option checks (a port number, an sslmode, a timeout): no server was asked
    (re.compile(r"^connection is bad: (invalid |could not match )"), "fix the connection string"),
    # libpq, sslmode=require (verify-ca, verify-full) and a server without SSL
    (re.compile(r"server does not support SSL, but SSL was required"),
     "enable SSL on the server, or set the connection string's sslmode to prefer or disable"),
    # 22023, 42704: a setting of the connection string's options (-c name=value) the server refuses
    (re.compile(r'invalid value for parameter "|unrecognized configuration parameter "|'
                r'is outside the valid range for parameter "'), "fix the setting in the connection string's options"),
)


def _redact(text: str, url: str) -> str:
    """``text`` without the password of ``url`` (libpq quotes some of a URL back)."""
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.ProgrammingError:
        return text
    return text.replace(str(password), "***") if password else text


def connection_error(exc: psycopg.Error, url: str) -> DatabaseError:
    """A failed connection to ``url``, wrapped: a :class:`DatabaseConfigError` when restarting cannot fix it (a
    login refused, no such database, an option libpq rejects), else a :class:`DatabaseError`."""
    detail = _redact(_describe(exc), url)
    pgconn = getattr(exc, "pgconn", None)
    if getattr(pgconn, "needs_password", False):  # the server asked for a password and none was given
        return DatabaseConfigError(f"cannot connect to PostgreSQL: {detail}: set the connection string's password")
    for pattern, fix in CONNECTION_REFUSALS:
        if pattern.search(detail):
            return DatabaseConfigError(f"cannot connect to PostgreSQL: {detail}: {fix}")
    return DatabaseError(f"cannot connect to PostgreSQL: {detail}")


def connect(url: str, *, autocommit: bool = False, application_name: str = APPLICATION_NAME,
            settings: Settings | None = None) -> psycopg.Connection:
    """A connection to ``url`` with dict rows, no prepared statements and :func:`tcp_params` (of ``settings``)."""
    try:
        return psycopg.connect(url, autocommit=autocommit, row_factory=dict_row,
                               **_connect_kwargs(url, application_name, settings))
    except psycopg.OperationalError as exc:
        raise connection_error(exc, url) from exc


async def aconnect(
    url: str, *, autocommit: bool = False, application_name: str = APPLICATION_NAME, settings: Settings | None = None
) -> psycopg.AsyncConnection:
    """:func:`connect`, async."""
    try:
        return await psycopg.AsyncConnection.connect(
            url, autocommit=autocommit, row_factory=dict_row, **_connect_kwargs(url, application_name, settings)
        )
    except psycopg.OperationalError as exc:
        raise connection_error(exc, url) from exc


def worker_takes(conn: psycopg.Connection, kind: str) -> bool:
    """Whether a running worker of this database takes ``kind`` jobs: one listening, and among the workers seen
    lately one that runs the kind, or none registered yet (a worker registers just before its worker_started). A
    worker started with other kinds (PGSYNAPSE_KINDS=embed) listens too, and never takes them."""
    listening, seen, taking = conn.cursor(row_factory=tuple_row).execute(
        q("workers_answering", "ops.sql"), {"kind": kind}).fetchone()
    return workers_take(listening, seen, taking)


def workers_take(listening: int, seen: int, taking: int) -> bool:
    """:func:`worker_takes` from the counts of ops.sql's ``workers_answering``."""
    return listening > 0 and (taking > 0 or seen == 0)


# the advisory lock of a model version's export to the workers' runtime (pgsynapse/export/register.py): here, so
# that the commands which read whether a worker is starting load none of the export's libraries
EXPORT_LOCK = "pgsynapse.runtime_export"
# the application_name of the connection that holds EXPORT_LOCK: a worker's (the name of its pool's connections too),
# or `pgsynapse model export --switch`'s, followed by " vN" once it has read the version N it exports
# (:func:`export_command_name`); ops.sql's runtime_export_state reads it to tell the two apart
WORKER_APPLICATION_NAME = "pgsynapse-worker"
EXPORT_COMMAND_APPLICATION_NAME = "pgsynapse-model-export"
EXPORT_COMMAND = "`pgsynapse model export --switch`"


def export_command_name(version: int) -> str:
    """The application_name of `pgsynapse model export --switch`'s connection once it has read ``version``."""
    return f"{EXPORT_COMMAND_APPLICATION_NAME} v{version}"


def runtime_export(conn: psycopg.Connection) -> dict[str, Any]:
    """A model version's export to the workers' runtime, as ops.sql's ``runtime_export_state`` reads it:
    ``exporting`` (the sessions holding EXPORT_LOCK: 0 or 1), ``waiting`` (those waiting for it), ``seconds`` (since
    the export began), ``by`` (``"command"``: `pgsynapse model export --switch` holds it; ``"worker"``: a worker at
    its start, or any other session; None: nobody), ``version`` (the version the command exports, once it has read
    it, else None) and ``workers_waiting`` (the waiting sessions that are not such a command: workers at their
    start)."""
    row = dict(conn.cursor(row_factory=dict_row).execute(
        q("runtime_export_state", "ops.sql"),
        {"lock": EXPORT_LOCK, "command": EXPORT_COMMAND_APPLICATION_NAME}).fetchone())
    holder = row.pop("holder")
    by_command = row["exporting"] > 0 and holder is not None and (
        holder == EXPORT_COMMAND_APPLICATION_NAME or holder.startswith(EXPORT_COMMAND_APPLICATION_NAME + " v"))
    row["by"] = None if not row["exporting"] else "command" if by_command else "worker"
    version = holder.removeprefix(EXPORT_COMMAND_APPLICATION_NAME + " v") if by_command else ""
    row["version"] = int(version) if version.isdigit() else None
    return row


def starting_export(conn: psycopg.Connection) -> dict[str, Any] | None:
    """:func:`runtime_export` while none is registered lately and the export lock is held, else None: a worker
    starting (a first start exports the active version before the worker registers and listens: minutes on a small
    host), or `pgsynapse model export --switch` exporting, which a worker started meanwhile waits for
    (:func:`worker_starting` tells these apart)."""
    _, seen, _ = conn.cursor(row_factory=tuple_row).execute(q("workers_answering", "ops.sql"), {"kind": ""}).fetchone()
    if seen:
        return None
    export = runtime_export(conn)
    return export if export["exporting"] else None


def worker_starting(conn: psycopg.Connection) -> bool:
    """Whether a worker is starting: none registered lately, and a model version's export to the workers' runtime
    under way, by a worker (a first start exports the active version before the worker registers and listens:
    minutes on a small host), or by `pgsynapse model export --switch` while a worker waits for it. `pgsynapse
    status` says "none registered yet: a worker is starting" then. The command's export with no worker waiting is
    no worker starting: :func:`command_exporting` says what it is."""
    return a_worker_starts(starting_export(conn))


def a_worker_starts(export: dict[str, Any] | None) -> bool:
    """Whether ``export`` (:func:`starting_export`) is a worker starting: its own export, or its wait for `pgsynapse
    model export --switch`'s."""
    return export is not None and (export["by"] == "worker" or export["workers_waiting"] > 0)


def exported_version(export: dict[str, Any]) -> str:
    """The version `pgsynapse model export --switch` exports (``export``: :func:`runtime_export`), in words: "model
    version 3", or "a model version" for the moment before it has read it."""
    return f"model version {export['version']}" if export.get("version") is not None else "a model version"


def command_exporting(export: dict[str, Any]) -> str:
    """What `pgsynapse model export --switch` holding the export lock does (``export``: :func:`runtime_export`)."""
    return f"{EXPORT_COMMAND} is exporting {exported_version(export)} to the workers' runtime (minutes on a small host)"


LOCK_WAIT_SLICE_MS = 1000


def take_xact_lock(conn: psycopg.Connection, query: str, params: Mapping[str, Any], *,
                   waiting: Callable[[], None] | None = None) -> None:
    """Take a transaction advisory lock with ``query`` (a blocking ``pg_advisory_xact_lock``) in the transaction open
    on ``conn``, however long another transaction holds it, in waits of at most LOCK_WAIT_SLICE_MS each: a server
    backend in one lock wait notices its client gone only once the lock is granted, so a waiter killed meanwhile
    left its backend waiting for nobody; between two waits the backend answers its client, and exits when it is
    gone. Each wait in a savepoint, so that one that times out undoes nothing else; the transaction's lock_timeout is
    as it was after. ``waiting()`` is called once, when the first wait times out: a wait of a moment is not worth a
    word, a longer one is."""
    was = conn.cursor(row_factory=tuple_row).execute(q("lock_timeout_now")).fetchone()[0]
    _wait_in_slices(conn, query, params, waiting)  # a lock taken in a savepoint is the transaction's once released
    conn.execute(q("lock_timeout_restore"), {"value": was})


def _wait_in_slices(conn: psycopg.Connection, query: str, params: Mapping[str, Any],
                    waiting: Callable[[], None] | None = None) -> None:
    """Run ``query`` (a blocking lock) until it gets its lock, each try in its own transaction (a savepoint within
    one) with a lock_timeout of LOCK_WAIT_SLICE_MS; ``waiting()`` once, when the first try times out."""
    said = waiting is None
    while True:
        try:
            with conn.transaction():
                conn.execute(q("lock_wait_slice"), {"ms": LOCK_WAIT_SLICE_MS})
                conn.execute(query, params)
            return
        except psycopg.errors.LockNotAvailable:
            if not said:
                waiting()
                said = True


# what a statement meets on a database that was never migrated, or is a migration behind
SCHEMA_ERRORS = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedFunction,
                 psycopg.errors.InvalidSchemaName)


MESSAGE_CHARS = 500  # of a server error's message in describe_db_error


def describe_db_error(exc: psycopg.Error, doing: str = "") -> str:
    """One readable line for a server error: its message, SQLSTATE and hint; privilege errors say what to grant."""
    diag = getattr(exc, "diag", None)
    msg = (getattr(diag, "message_primary", None) or _describe(exc)).strip()
    if len(msg) > MESSAGE_CHARS:  # a message that quotes the input back (a text of a megabyte): cut, not flooded
        msg = f"{msg[:MESSAGE_CHARS]}... ({len(msg)} characters)"
    parts = [f"{doing}: {msg}" if doing else msg]
    if getattr(exc, "sqlstate", None):
        parts.append(f"(SQLSTATE {exc.sqlstate})")
    hint = getattr(diag, "message_hint", None)
    if hint:
        parts.append(f"hint: {hint.strip()}")
    if isinstance(exc, psycopg.errors.InsufficientPrivilege) and 'extension "vector"' in msg:
        parts.append(
            "- pgvector is not a trusted extension: have a superuser (on a managed service, its admin role) run "
            "CREATE EXTENSION vector; in this database, then run `pgsynapse migrate` again (docs/operations.md, roles)"
        )
    elif isinstance(exc, psycopg.errors.InsufficientPrivilege):
        parts.append(
            "- the database user lacks a privilege pgsynapse needs: run `pgsynapse migrate` as the database owner, "
            "then grant this user the role that fits it: GRANT pgsynapse_worker TO <user> for a worker, pgsynapse_app "
            "for an application, pgsynapse_admin for guardrail, promote, rollback, traffic, retire and the other "
            "commands of people (docs/operations.md, roles)"
        )
    return " ".join(parts)


class Database:
    """Where the database is: ``DATABASE_URL`` if given, else the embedded server in the data dir.

    Use as a context manager; the embedded server is released on exit (and by its guardian if we die).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url: str = settings.database_url or ""
        self._embedded = None

    def __enter__(self) -> Database:
        if not self.url:
            self._embedded = EmbeddedPostgres(self.settings.data_dir)
            self.url = self._embedded.start()
        return self

    @property
    def listen_url(self) -> str:
        """Where session state may live: :func:`session_url` of :attr:`url`."""
        return session_url(self.settings, self.url)

    def __exit__(self, *exc: object) -> None:
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    @contextlib.contextmanager
    def connect(self, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
        conn = connect(self.url, autocommit=autocommit, settings=self.settings)
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.asynccontextmanager
    async def aconnect(self, *, autocommit: bool = False) -> AsyncIterator[psycopg.AsyncConnection]:
        conn = await aconnect(self.url, autocommit=autocommit, settings=self.settings)
        try:
            yield conn
        finally:
            await conn.close()


# the least time the server waits for a silent client inside one of pgsynapse's transactions before it ends it
# (idle_in_transaction_session_timeout): bounded_transaction, the writer's retry budget, a data question's statement
MIN_IDLE_SECONDS = 10.0
# how many times that a whole transaction may last (transaction_timeout): a long write is not a silent one
TOTAL_PER_SILENT = 2.0
# the first server version with transaction_timeout
TRANSACTION_TIMEOUT_VERSION = 170000


@dataclass(frozen=True)
class TransactionBounds:
    """How long the server lets one of the worker's transactions run: ``silent`` seconds without a word from the
    worker between statements, ``total`` seconds in all."""

    silent: float
    total: float

    def parameters(self) -> dict[str, str]:
        """The bounds as queries.sql's ``bound_transaction`` and ``bound_idle_in_transaction`` take them."""
        return {"silent_ms": str(round(self.silent * 1000)), "total_ms": str(round(self.total * 1000))}


def bounds_for(seconds: float) -> TransactionBounds:
    """The bounds of a transaction whose client may rightly be silent in it for ``seconds`` (a lease, a statement's
    run): that, at least :data:`MIN_IDLE_SECONDS`, and :data:`TOTAL_PER_SILENT` times it in all."""
    silent = max(seconds, MIN_IDLE_SECONDS)
    return TransactionBounds(silent, silent * TOTAL_PER_SILENT)


def transaction_bounds(settings: Settings) -> TransactionBounds:
    """The bounds of the worker's own transactions: a lease (bounded_transaction, the writer's retry budget)."""
    return bounds_for(settings.lease_seconds)


@contextlib.asynccontextmanager
async def bounded_transaction(conn: psycopg.AsyncConnection, settings: Settings, *,
                              whole: bool = True) -> AsyncIterator[None]:
    """A transaction that the server ends (with its session) once its client stays silent in it for a lease, at
    least 10 s (the writer's retry budget: past it the jobs may belong to another worker anyway), or once it has
    lasted twice that. A worker cut off from the database mid-transaction (a network partition: no FIN, no RST)
    would otherwise keep its row locks until the server's TCP keepalive gives up (hours with the kernel's
    defaults), and no other worker could take its jobs over (tests/chaos/test_chaos_partition.py).

    The silent bound (``idle_in_transaction_session_timeout``) is armed only while the server waits at a
    ReadyForQuery; a cut that lands while a statement is on the wire leaves the server 'active', reading the rest
    of its message. The total bound (``transaction_timeout``, PostgreSQL 17+; older servers have the silent one
    only) ends that one too (tests/integration/test_bounded_transaction.py). ``whole=False`` leaves it out, for a
    transaction whose length grows with the data and not with a batch (a bulk job's expansion: one INSERT of as
    many rows as the application inserted), whose statements are small enough never to be cut on the wire. SET
    LOCAL: this transaction only, so it is safe through PgBouncer in transaction mode."""
    query = ("bound_transaction" if whole and conn.info.server_version >= TRANSACTION_TIMEOUT_VERSION
             else "bound_idle_in_transaction")
    async with conn.transaction():
        await conn.execute(q(query), transaction_bounds(settings).parameters())
        yield


def columns(rows: Sequence[Sequence[Any]], *names: str) -> dict[str, list[Any]]:
    """``rows`` as one list per column, named ``names``: the parameters of an ``INSERT ... SELECT FROM unnest(...)``,
    the worker's way of writing many rows in one statement (never COPY FROM STDIN or a pipeline: queries.sql
    ``insert_chunks`` says why)."""
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    if len(cols) != len(names):
        raise ValueError(f"rows of {len(cols)} columns, {len(names)} names")
    return {name: list(col) for name, col in zip(names, cols, strict=True)}


async def next_notifies(conn: psycopg.AsyncConnection, timeout: float) -> list[psycopg.Notify]:
    """The next NOTIFYs on a LISTENing connection (those that came in together: one packet may carry several), or
    none after ``timeout`` seconds. Never leave psycopg's generator after the first: it drops the rest."""
    return [notice async for notice in conn.notifies(timeout=timeout, stop_after=1)]


def connection_lost(conn: psycopg.AsyncConnection) -> bool:
    """Whether an idle connection is gone: closed, broken, or closed by its server meanwhile (a restart, an
    administrator's ``pg_terminate_backend``: the server's last message and the end of the stream wait in the
    socket). Reads what is there without waiting: no round trip."""
    if connection_broken(conn):
        return True
    try:
        for _ in range(2):  # the server's FATAL message, then the end of the stream
            conn.pgconn.consume_input()
    except psycopg.OperationalError:
        return True
    return conn.closed


def connection_broken(conn: psycopg.AsyncConnection) -> bool:
    """Whether the error a statement just raised on ``conn`` lost the connection (not an error of the statement)."""
    return conn.closed or conn.broken
