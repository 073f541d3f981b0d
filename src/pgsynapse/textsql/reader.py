"""The connection generated statements run on: the reader role's own login, so that none can leave that role.

``execute.run_readonly`` runs a statement after ``SET LOCAL ROLE`` to the reader role. PostgreSQL checks a later
``set_config('role', ...)``, ``RESET ROLE`` or ``set_config('session_authorization', ...)`` against the *session*
user: on the worker's own connection a statement that got past the parser check (textsql/safety.py) could become the
worker again (a superuser on the embedded server). On a connection whose login is the reader role (or a login that
is a member of it and of no other role) the server refuses that: ``permission denied to set role``. So:

- ``sql_reader_url`` set: statements run on that login, checked at start (:func:`check_login`), with the password
  of ``sql_reader_password`` when the URL holds none (:func:`login_password`); ``pgsynapse reader-login`` gives the
  reader role a password for it on a server of yours (:func:`set_password`);
- the embedded server (pgsynapse's own): the worker lets the reader role log in (``ALTER ROLE ... LOGIN``; the
  server trusts only its private socket) and connects as it through the same socket (:func:`embedded_url`);
- neither: the worker's connection, as before, and a warning at start (``sql_reader_shares_worker_session``; at
  info in a one-shot command's own worker, ``sql-ask``).

The sql_answer handler runs its questions there, and the SQL retrain (textsql/train.py) its corrections and the
models' statements at its gate; ``pgsynapse sql-correct`` and the benchmark (bench/text_to_sql.py) theirs through
:func:`for_command`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from pgsynapse.db import NO_PREPARE, connection_error
from pgsynapse.errors import ConfigError, DatabaseConfigError, DatabaseSetupError
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)

FILE = "textsql.sql"
# the job kinds that run generated statements (the retrain: corrections and the models' statements at its gate)
KINDS = ("sql_answer", "sql_retrain")


def reader_url(url: str, settings: Any) -> str | None:
    """Where generated statements run: ``sql_reader_url``; on the embedded server (``settings.embedded``, ``url``
    its URL) the same socket and database as the reader role; else None (the worker's own connection)."""
    if settings.sql_reader_url:
        return settings.sql_reader_url
    return make_conninfo(url, user=settings.sql_reader_role, password=None) if settings.embedded else None


def login_password(settings: Any) -> dict[str, str]:
    """libpq's ``password`` for the reader's login: ``sql_reader_password`` (PGSYNAPSE_SQL_READER_PASSWORD, the one
    `pgsynapse reader-login` sets), which no URL has to hold, so any character may be in it; none when
    ``sql_reader_url`` holds its own password (that one was written for the worker: it stands, as before)."""
    password = settings.sql_reader_password
    if not password or conninfo_to_dict(settings.sql_reader_url).get("password"):
        return {}
    return {"password": password}


def check_login(conn: psycopg.Connection, role: str) -> None:
    """Raise :class:`ConfigError` unless ``conn`` (``sql_reader_url``) logs in as ``role``, or as a role that is a
    member of ``role`` and of no other role and is no superuser: a statement could otherwise SET ROLE to that other."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q("reader_login", FILE), {"role": role}).fetchone()
    assert row is not None
    if row["login"] == role:
        return
    why = ("is a superuser" if row["superuser"] else
           f"is not a member of {role}" if not row["member"] else
           f"is also a member of {', '.join(row['others'])}" if row["others"] else None)
    if why:
        raise ConfigError(f"sql_reader_url logs in as {row['login']}, which {why}: generated statements could use "
                          f"its rights; log in as {role} itself (`pgsynapse reader-login` gives it a password) or as a "
                          f"role granted {role} and nothing else (docs/text-to-sql.md, Safety)")


def set_password(conn: psycopg.Connection, role: str, password: str) -> None:
    """Let ``role`` log in with ``password`` (``pgsynapse reader-login``), as psql's ``\\password`` sets one: libpq
    computes its SCRAM-SHA-256 verifier here (PQencryptPasswordConn, a fresh salt) and only the verifier is sent, so
    the password reaches neither the server's log (``log_statement = ddl``) nor pg_stat_statements. A role missing,
    or one this login may not alter: :class:`DatabaseSetupError`, saying what to do."""
    if conn.execute(q("reader_can_log_in", FILE), {"role": role}).fetchone() is None:
        raise DatabaseSetupError(f"role {role} does not exist: `pgsynapse migrate` makes pgsynapse_reader (a "
                                 "sql_reader_role of another name is yours to create); then run reader-login again")
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()
    statement = pgsql.SQL(q("reader_set_password", FILE)).format(pgsql.Identifier(role), pgsql.Literal(verifier))
    try:
        conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise DatabaseSetupError(f"{conn.info.user} may not give {role} a password ({str(exc).strip()}): run "
                                 "reader-login as a superuser, or as the role that ran `pgsynapse migrate` when "
                                 "it has CREATEROLE") from None
    log.info("sql_reader_password_set", role=role)


def prepare_at_start(url: str, settings: Any, *, one_off: bool = False) -> None:
    """At a worker's start (``url``: its database): on the embedded server, let the reader role log in; then check
    the reader's login (:func:`check_login`); with none, say once that statements share the worker's session: a
    warning, or at info for a one-shot command's own worker (``one_off``: ``sql-ask`` said it at every question;
    the long-running worker, ``pgsynapse run``, warns of the same setting at its start)."""
    role = settings.sql_reader_role
    if settings.embedded:
        with psycopg.connect(url, autocommit=True, **NO_PREPARE) as conn:
            found = conn.execute(q("reader_can_log_in", FILE), {"role": role}).fetchone()
            if found is not None and not found[0]:
                conn.execute(pgsql.SQL(q("reader_allow_login", FILE)).format(pgsql.Identifier(role)))
                log.info("sql_reader_may_log_in", role=role)
    login = reader_url(url, settings)
    if login is None:
        (log.info if one_off else log.warning)("sql_reader_shares_worker_session", role=role,
                    advice=f"set sql_reader_url to a login as {role} (`pgsynapse reader-login` gives it a password): "
                           "a statement past the parser check could otherwise set its role back to the worker's "
                           "(docs/text-to-sql.md, Safety)")
        return
    with connect(settings.model_copy(update={"sql_reader_url": login})) as conn:
        check_login(conn, role)


@contextlib.contextmanager
def connect(settings: Any) -> Iterator[psycopg.Connection]:
    """An autocommit connection for ``execute.run_readonly``: the reader's own login (``sql_reader_url``, with
    :func:`login_password`) when set, else the worker's (``database_url``)."""
    if not settings.sql_reader_url:
        with psycopg.connect(settings.database_url or "", autocommit=True, **NO_PREPARE) as conn:
            yield conn
        return
    login = make_conninfo(settings.sql_reader_url, **login_password(settings))
    try:
        conn = psycopg.connect(login, autocommit=True, **NO_PREPARE)
    except psycopg.OperationalError as exc:
        err = connection_error(exc, login)  # the password redacted, wherever it came from
        if isinstance(err, DatabaseConfigError):  # a login refused, a wrong URL: the same at every retry
            raise ConfigError(f"sql_reader_url: {err}".replace(
                "set the connection string's password",
                "set PGSYNAPSE_SQL_READER_PASSWORD (or the URL's password)")) from None
        raise err from None
    with conn:
        yield conn


@contextlib.contextmanager
def for_command(url: str, settings: Any, *, one_off: bool = True) -> Iterator[psycopg.Connection]:
    """A command's connection for the statements it runs (``url``: its database), as a worker makes one: the reader
    role's login on the embedded server (let log in first) or ``sql_reader_url`` (checked), else ``url``'s own
    with ``sql_reader_shares_worker_session`` said (:func:`prepare_at_start`; at info when ``one_off``)."""
    prepare_at_start(url, settings, one_off=one_off)
    with connect(settings.model_copy(update={"database_url": url, "sql_reader_url": reader_url(url, settings)})) as conn:
        yield conn
