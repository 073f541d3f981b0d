"""`pgsynapse reader-login` gives the reader role a password (its SCRAM verifier only), and the worker logs in as
the reader with it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo
import pytest

from pgsynapse.textsql import reader
from tests.helpers import fast_settings


def _scram_matches(stored: str, password: str) -> bool:
    """Whether a SCRAM-SHA-256 verifier (pg_authid.rolpassword) is of ``password`` (ASCII: SASLprep keeps it)."""
    iterations, salt, stored_key = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):.+", stored).groups()
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hashlib.sha256(client_key).digest() == base64.b64decode(stored_key)


def _reader_login(url: str, *args: str, password: str | None = None, stdin: str = "",
                  data_dir: Path | None = None, **settings: str) -> subprocess.CompletedProcess[str]:
    """`pgsynapse reader-login` on ``url`` (none: the embedded server of ``data_dir``), the password in
    PGSYNAPSE_SQL_READER_PASSWORD when given, ``stdin`` its input, ``settings`` in the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PGSYNAPSE_SQL_READER_PASSWORD")}
    env.update({"DATABASE_URL": url} if url else {"PGSYNAPSE_DATA_DIR": str(data_dir)}, **settings)
    if password is not None:
        env["PGSYNAPSE_SQL_READER_PASSWORD"] = password
    return subprocess.run([sys.executable, "-m", "pgsynapse", "reader-login", *args], input=stdin, text=True,
                          capture_output=True, env=env, timeout=120)


def _reader_role(url: str) -> tuple[bool, str | None]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = 'pgsynapse_reader'"
                            ).fetchone()


def test_reader_login_sends_the_scram_verifier_never_the_password(db_url):
    """compose's reader-login step ran `ALTER ROLE pgsynapse_reader LOGIN PASSWORD :'reader_password'` in psql
    (docker/reader-login.sql, also the docs' recipe for a server of yours): the password itself went to the server,
    into its log under log_statement = ddl or all, and pg_stat_statements. `pgsynapse reader-login` computes the
    SCRAM-SHA-256 verifier here, as psql's \\password does, and sends only it: the reader logs in with the password
    (quotes and all; from PGSYNAPSE_SQL_READER_PASSWORD or stdin, never the command line), and a worker accepts
    that login as its sql_reader_url. Run again, it sets the password again (each `docker compose up` runs it)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        server_log = Path(conn.execute("SHOW data_directory").fetchone()[0]) / "log"
    if not server_log.is_file():
        pytest.skip("the server's log cannot be read here (not the embedded test server)")
    logged = make_conninfo(db_url, options="-c log_statement=all")  # each statement it sends, in the server's log
    secrets = [uuid.uuid4().hex for _ in range(2)]
    try:
        for password, how in ((f"it's a se'cret {secrets[0]}", {}), (f"from stdin {secrets[1]}", {"stdin": True})):
            done = (_reader_login(logged, "--password-stdin", stdin=f"{password}\n", password="not this one")
                    if how else _reader_login(logged, password=password))
            assert done.returncode == 0, done.stderr
            assert "pgsynapse_reader may log in" in done.stdout and password not in done.stdout + done.stderr
            login, stored = _reader_role(db_url)
            assert login and _scram_matches(stored, password), stored  # the test server trusts its socket: look
        url = make_conninfo(db_url, user="pgsynapse_reader", password=password)
        reader.prepare_at_start(db_url, fast_settings(db_url, sql_reader_url=url))  # the worker's check
        text = server_log.read_text(errors="replace")
        assert 'statement: ALTER ROLE "pgsynapse_reader" LOGIN PASSWORD \'SCRAM-SHA-256$' in text
        assert not [s for s in secrets if s in text]
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:  # roles are cluster-wide
            conn.execute("ALTER ROLE pgsynapse_reader NOLOGIN PASSWORD NULL")


def test_reader_login_refuses_without_a_password_and_on_the_embedded_server(db_url, tmp_path):
    """No password given (none in the environment, no --password-stdin, no terminal to ask on), an empty one, or the
    embedded server (its reader logs in on the private socket, with no password): one line saying what to do, exit
    1, and the role is left as it was."""
    before = _reader_role(db_url)
    no_password = _reader_login(db_url)
    assert no_password.returncode == 1, no_password.stderr
    assert no_password.stderr.startswith("pgsynapse: error: no password for pgsynapse_reader: set "
                                         "PGSYNAPSE_SQL_READER_PASSWORD, or give it on stdin with --password-stdin")
    empty = _reader_login(db_url, "--password-stdin", stdin="\n")
    assert empty.returncode == 1 and "the password for pgsynapse_reader is empty" in empty.stderr, empty.stderr
    assert _reader_role(db_url) == before
    embedded = _reader_login("", password="secret", data_dir=tmp_path / "data")
    assert embedded.returncode == 1 and "the embedded server" in embedded.stderr, embedded.stderr
    assert not (tmp_path / "data").exists()  # refused before any server was started
    missing = _reader_login(db_url, password="secret", PGSYNAPSE_SQL_READER_ROLE="no_such_reader")
    assert missing.returncode == 78, missing.stderr  # as a database not set up: running it again will not help
    assert missing.stderr.startswith("pgsynapse: error: role no_such_reader does not exist: `pgsynapse migrate` "
                                     "makes pgsynapse_reader"), missing.stderr
    with psycopg.connect(db_url, autocommit=True) as conn:  # a login that may not alter roles (no CREATEROLE)
        conn.execute("CREATE ROLE reader_login_app LOGIN")
    try:
        refused = _reader_login(make_conninfo(db_url, user="reader_login_app"), password="secret")
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:  # roles are cluster-wide
            conn.execute("DROP ROLE reader_login_app")
    assert refused.returncode == 78, refused.stderr
    assert refused.stderr.startswith("pgsynapse: error: reader_login_app may not give pgsynapse_reader a password ("
                                     "permission denied to alter role"), refused.stderr
    assert "run reader-login as a superuser" in refused.stderr
    assert _reader_role(db_url) == before

