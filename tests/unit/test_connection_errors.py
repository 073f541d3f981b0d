"""Which failed connections restarting cannot fix (exit 78), from libpq's text: psycopg gives them no SQLSTATE."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.errors import FinishedPGconn

from pgsynapse.cli import _retry_later
from pgsynapse.db import connection_error
from pgsynapse.errors import DatabaseConfigError, DatabaseError

URL = "postgresql://app:s3cret-pw@db.example:5432/app"
AT = 'connection failed: connection to server at "10.0.0.5", port 5432 failed: '


@pytest.mark.parametrize("message", [
    AT + 'FATAL:  password authentication failed for user "app"',  # 28P01
    AT + 'FATAL:  role "app" does not exist',  # 28000
    AT + 'FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "app", database "app", no encryption',  # 28000
    AT + 'FATAL:  database "app" does not exist',  # 3D000
    'connection is bad: invalid port number: "99999"',
    'connection is bad: invalid sslmode value: "bogus"',
    AT + "server does not support SSL, but SSL was required",  # sslmode=require
    AT + 'FATAL:  invalid value for parameter "statement_timeout": "bogus"',  # 22023: options=-c ...
    AT + 'FATAL:  unrecognized configuration parameter "no_such_param"',  # 42704
    AT + 'FATAL:  1 kB is outside the valid range for parameter "work_mem" (64 kB .. 2147483647 kB)',  # 22023
])
def test_what_restarting_cannot_fix(message):
    err = connection_error(psycopg.OperationalError(message), URL)
    assert type(err) is DatabaseConfigError
    assert str(err).startswith(f"cannot connect to PostgreSQL: {message}: ")


@pytest.mark.parametrize("message", [
    AT + "FATAL:  the database system is starting up",  # 57P03
    AT + "FATAL:  the database system is shutting down",  # 57P03
    AT + "FATAL:  sorry, too many clients already",  # 53300
    AT + "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?",
    'connection is bad: connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: No such file or '
    "directory",  # a local server not started yet
    "failed to resolve host 'db.example': [Errno -3] Temporary failure in name resolution",
    "connection timeout expired",
    AT + "FATAL:  la authentification par mot de passe a échoué pour l'utilisateur « app »",  # unknown: as before
])
def test_what_a_restart_may_fix(message):
    err = connection_error(psycopg.OperationalError(message), URL)
    assert type(err) is DatabaseError
    assert str(err) == f"cannot connect to PostgreSQL: {message.splitlines()[0]}"


def test_no_password_given_is_known_by_libpq_not_by_its_text():
    exc = psycopg.OperationalError(AT + "fe_sendauth: no password supplied", pgconn=FinishedPGconn(needs_password=True))
    assert isinstance(connection_error(exc, URL), DatabaseConfigError)


def test_the_password_is_never_echoed():
    err = connection_error(psycopg.OperationalError('connection is bad: invalid URI "s3cret-pw"'), URL)
    assert "s3cret-pw" not in str(err) and '"***"' in str(err)


@pytest.mark.parametrize(("sqlstate", "later"), [
    (None, True),  # no server answer: the connection failed or was lost
    ("53300", True), ("53100", True),  # too many connections, disk full: insufficient resources
    ("57014", True), ("57P01", True),  # statement timeout, admin shutdown
    ("40001", True), ("40P01", True), ("55P03", True),  # serialization failure, deadlock, lock timeout
    ("54000", False), ("54011", False),  # program limit exceeded: a text too long, too many columns
    ("42601", False), ("0A000", False), ("XX000", False),  # a syntax error, a feature not supported, a bug
])
def test_which_server_errors_a_later_run_may_not_meet(sqlstate, later):
    # every error no library function wrapped exited 69, "retry later": a text past a limit of PostgreSQL too
    exc = psycopg.errors.lookup(sqlstate)("x") if sqlstate else psycopg.OperationalError("x")
    assert _retry_later(exc) is later
