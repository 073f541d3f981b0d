"""`pgsynapse reader-login` gives the reader role a password (its SCRAM verifier only), and the worker logs in as
the reader with it: in sql_reader_url, or in sql_reader_password, which no URL has to hold."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
import pytest

from pgsynapse.config import load_settings
from pgsynapse.errors import ConfigError
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
                                         "PGSYNAPSE_SQL_READER_PASSWORD (an empty one is unset) or the config file's "
                                         "sql_reader_password, or give it on stdin with --password-stdin")
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


# compose put SQL_READER_PASSWORD into the worker's sql_reader_url as written: each of these broke the URL
ANY_CHARACTERS = "p@ss/w:rd#50%?x"


@pytest.fixture
def password_login(db_url):
    """A login granted pgsynapse_reader and nothing else (check_login takes one), of which the server asks its
    password: a pg_hba.conf line for it alone before the test server's own (its socket trusts every login), so a
    wrong password or none is refused, as on a server of yours. Yields its URL, which holds no password. Roles and
    pg_hba.conf are the cluster's: both as they were after."""
    role = f"reader_pw_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
        if not os.access(hba, os.W_OK):
            pytest.skip("the server's pg_hba.conf cannot be written here (not the embedded test server)")
        conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE pgsynapse_reader")
        before = hba.read_text()
        hba.write_text(f"local all {role} scram-sha-256\n{before}")
        conn.execute("SELECT pg_reload_conf()")
    url = make_conninfo(db_url, user=role, password=None)
    try:
        deadline = time.monotonic() + 60
        while True:  # until the postmaster has read the line (pg_reload_conf only signals it)
            try:
                psycopg.connect(url).close()
            except psycopg.OperationalError as exc:
                assert "password" in str(exc), exc
                break
            assert time.monotonic() < deadline, "the server never asked the login for its password"
        yield role, url
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            hba.write_text(before)
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(f"DROP ROLE {role}")


def test_the_worker_logs_in_as_the_reader_with_a_password_no_url_could_hold(db_url, password_login, tmp_path):
    """docker compose wrote SQL_READER_PASSWORD into the worker's sql_reader_url
    (postgresql://pgsynapse_reader:PASSWORD@db:5432/pgsynapse), so a password with @ / : # ? % broke the URL; only
    `reader-login` read PGSYNAPSE_SQL_READER_PASSWORD. The worker reads it too (sql_reader_password) and gives it to
    libpq as it is, beside a URL that holds none. A URL that holds its own password logs in with that one, as
    before, even with the variable set (reader-login's, in the same environment); a wrong one is refused without
    being shown. reader-login takes the password of a config file's sql_reader_password too (the worker's)."""
    role, url = password_login
    config = tmp_path / "pgsynapse.toml"
    config.write_text(f'sql_reader_password = "{ANY_CHARACTERS}"\n')
    done = _reader_login(db_url, PGSYNAPSE_SQL_READER_ROLE=role, PGSYNAPSE_CONFIG=str(config))
    assert done.returncode == 0, done.stderr
    with pytest.raises(psycopg.ProgrammingError):  # the URL compose wrote
        psycopg.connect(f"postgresql://{role}:{ANY_CHARACTERS}@/{conninfo_to_dict(db_url)['dbname']}").close()
    def logs_in(settings) -> None:
        reader.prepare_at_start(db_url, settings)  # the worker's check at its start, on that login
        with reader.connect(settings) as conn:  # where the worker runs the statements
            assert conn.execute("SELECT session_user, current_user").fetchone() == (role, role)

    worker = load_settings(environ={"DATABASE_URL": db_url, "PGSYNAPSE_SQL_READER_URL": url,
                                    "PGSYNAPSE_SQL_READER_PASSWORD": ANY_CHARACTERS})  # compose's worker now
    logs_in(worker)
    assert ANY_CHARACTERS not in repr(worker)
    in_url = make_conninfo(url, password=ANY_CHARACTERS)  # its key=value form quotes any character
    logs_in(fast_settings(db_url, sql_reader_url=in_url))
    logs_in(fast_settings(db_url, sql_reader_url=in_url, sql_reader_password="reader-login's, maybe older"))
    wrong = "wrong-" + ANY_CHARACTERS
    with pytest.raises(ConfigError, match=f'sql_reader_url: .*password authentication failed for user "{role}"') as refused:
        reader.prepare_at_start(db_url, fast_settings(db_url, sql_reader_url=url, sql_reader_password=wrong))
    assert ANY_CHARACTERS not in str(refused.value)
    with pytest.raises(ConfigError, match="no password supplied: set PGSYNAPSE_SQL_READER_PASSWORD"):
        reader.prepare_at_start(db_url, fast_settings(db_url, sql_reader_url=url))  # none given: the hint names it


def test_reader_login_and_the_worker_take_the_password_by_one_rule(db_url, tmp_path):
    """reader-login read PGSYNAPSE_SQL_READER_PASSWORD itself, beside the sql_reader_password setting the worker
    reads, with another rule: an empty variable beside a config file's sql_reader_password made reader-login refuse
    ("the password ... is empty") while the worker took the file's, and an empty sql_reader_password in the file
    made it say "no password: set PGSYNAPSE_SQL_READER_PASSWORD" while the worker started and failed at its login.
    Both take the setting now: the variable when it holds a value, else the file's (an empty variable is unset, as
    every PGSYNAPSE_ variable); an empty value in the file is refused by both, naming it."""
    config = tmp_path / "pgsynapse.toml"
    config.write_text('sql_reader_password = "from-the-file"\n')
    reader_url = make_conninfo(db_url, user="pgsynapse_reader", password=None)
    try:
        for variable, taken in (("from-the-variable", "from-the-variable"), ("", "from-the-file"),
                                (None, "from-the-file")):
            done = _reader_login(db_url, password=variable, PGSYNAPSE_CONFIG=str(config))
            assert done.returncode == 0, (variable, done.stderr)
            assert _scram_matches(_reader_role(db_url)[1], taken), variable
            environ = {"DATABASE_URL": db_url, "PGSYNAPSE_CONFIG": str(config), "PGSYNAPSE_SQL_READER_URL": reader_url,
                       **({"PGSYNAPSE_SQL_READER_PASSWORD": variable} if variable is not None else {})}
            worker = load_settings(environ=environ)  # the worker's, in the same environment
            assert reader.login_password(worker) == {"password": taken}, variable
        before = _reader_role(db_url)
        config.write_text('sql_reader_password = ""\n')
        for variable in ("", None):
            refused = _reader_login(db_url, password=variable, PGSYNAPSE_CONFIG=str(config))
            assert refused.returncode == 78, refused.stderr
            assert refused.stderr.startswith(f"pgsynapse: error: invalid setting sql_reader_password "
                                             f"[sql_reader_password in {config}]: is empty"), refused.stderr
        assert _reader_role(db_url) == before
        with pytest.raises(ConfigError, match=rf"sql_reader_password in {re.escape(str(config))}\]: is empty"):
            load_settings(environ={"DATABASE_URL": db_url, "PGSYNAPSE_CONFIG": str(config)})  # the worker's start
        # the variable's value stands over the file's empty one, for both
        done = _reader_login(db_url, password="from-the-variable", PGSYNAPSE_CONFIG=str(config))
        assert done.returncode == 0 and _scram_matches(_reader_role(db_url)[1], "from-the-variable"), done.stderr
        # an empty variable and no file: no password at all, said as such
        config.unlink()
        nothing = _reader_login(db_url, password="")
        assert nothing.returncode == 1, nothing.stderr
        assert nothing.stderr.startswith("pgsynapse: error: no password for pgsynapse_reader: set "
                                         "PGSYNAPSE_SQL_READER_PASSWORD (an empty one is unset)"), nothing.stderr
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:  # roles are cluster-wide
            conn.execute("ALTER ROLE pgsynapse_reader NOLOGIN PASSWORD NULL")
