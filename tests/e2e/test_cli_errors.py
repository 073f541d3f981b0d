"""The CLI's errors end to end: bad settings, databases and data dirs, refused data, JSON logs (split from
tests/e2e/test_cli.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsynapse.cli import main
from tests.helpers import SAFETY_TIMEOUT, pgsynapse, spawn_worker


def test_invalid_setting_stops_with_one_line_naming_it():
    r = pgsynapse("status", env={"PGSYNAPSE_POLL_INTERVAL": "-1", "DATABASE_URL": "postgresql://x/y"})
    assert r.returncode == 78
    assert r.stderr.strip().splitlines() == [
        "pgsynapse: error: invalid setting poll_interval [PGSYNAPSE_POLL_INTERVAL]: Input should be greater than 0 (got '-1')"]


def test_unreachable_database_is_a_clear_error():
    r = pgsynapse("status", url="postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert r.returncode == 69
    assert r.stderr.startswith("pgsynapse: error: cannot connect to PostgreSQL")


@pytest.mark.parametrize("params, says", [
    ({"user": "pgsynapse_no_such_role"}, 'role "pgsynapse_no_such_role" does not exist'),  # 28000
    ({"dbname": "pgsynapse_no_such_db"}, 'database "pgsynapse_no_such_db" does not exist'),  # 3D000
    ({"port": "99999", "password": "s3cret-pw"}, 'invalid port number: "99999"'),  # libpq, before connecting
    ({"sslmode": "bogus", "password": "s3cret-pw"}, 'invalid sslmode value: "bogus"'),
])
def test_a_database_url_that_cannot_work_stops_the_restarts(pg_url, params, says):
    """Exit 78 (RestartPreventExitStatus), not 69: restarting every 5 s cannot fix a login, a database name or a
    URL; one line that says what is wrong and never the password."""
    r = pgsynapse("status", url=make_conninfo(pg_url, connect_timeout=5, **params))
    assert r.returncode == 78, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("pgsynapse: error: cannot connect to PostgreSQL: ") and says in line
    assert "s3cret-pw" not in line
    if "dbname" in params:
        assert "CREATE DATABASE" in line


def test_a_server_not_there_yet_is_retried():
    # the socket of a local server that has not started yet: a restart may find it (exit 69)
    r = pgsynapse("status", url="host=/tmp/pgsynapse-no-server-here user=u dbname=d")
    assert r.returncode == 69
    assert r.stderr.startswith("pgsynapse: error: cannot connect to PostgreSQL")


@pytest.mark.parametrize("where", ["file", "/proc/pgsynapse-data", "/root/pgsynapse-data"])
def test_an_unusable_data_dir_is_a_configuration_error(tmp_path, where):
    if where == "file":
        (tmp_path / "file").write_text("")
        where = str(tmp_path / "file")
    elif where.startswith("/root") and os.geteuid() != 0:
        pytest.skip("refused only as root (the embedded server would chmod /root)")
    r = pgsynapse("--data-dir", where, "status")
    assert r.returncode == 78, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("pgsynapse: error: ") and f"data_dir {where}" in line


def test_a_pgdata_that_is_no_postgresql_data_directory_says_so(tmp_path):
    """DATA_DIR/pgdata holding something else: initdb refused it, and the command said only that initdb "returned
    non-zero exit status 1" (its reason in a long library_log line), exit 69, restarted for ever."""
    (tmp_path / "pgdata").mkdir()
    (tmp_path / "pgdata" / "notes.txt").write_text("not a database")
    r = pgsynapse("--data-dir", str(tmp_path), "status")
    assert r.returncode == 78, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line == (f"pgsynapse: error: data_dir {tmp_path}: {tmp_path / 'pgdata'} is not empty and holds no "
                    "PostgreSQL data directory (no PG_VERSION): move what it holds away, or set PGSYNAPSE_DATA_DIR "
                    "to another directory")
    assert (tmp_path / "pgdata" / "notes.txt").read_text() == "not a database"  # left as it was


def test_data_the_database_refuses_is_exit_1_not_retried(db_url, tmp_path):
    """A constraint of the database refusing what a command writes (a CHECK, a unique index: here the user's own on
    pgsynapse.documents) exited 69, which systemd and scripts read as "unreachable, retry later": the same data is
    refused again. Exit 1 (a command refused what it was asked), one line saying what the database refused."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgsynapse.documents ADD CONSTRAINT body_under_40 CHECK (length(body) < 40)")
        conn.execute("CREATE UNIQUE INDEX documents_title_once ON pgsynapse.documents (title)")
    for name, body in (("long", "a body of more than forty characters, which the CHECK refuses"),
                       ("a", "one short body"), ("b", "another short body")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text(body)
    long = pgsynapse("ingest", "--no-progress", str(tmp_path / "long"), url=db_url)
    assert long.returncode == 1, long.stderr
    assert long.stderr.strip().splitlines()[-1] == (
        'pgsynapse: error: the database refused the data: new row for relation "documents" violates check constraint '
        '"body_under_40" (SQLSTATE 23514): change the data, or the constraint or trigger that refuses it')
    assert pgsynapse("ingest", "--no-progress", str(tmp_path / "a"), url=db_url).returncode == 0
    twice = pgsynapse("ingest", "--no-progress", str(tmp_path / "b"), url=db_url)  # the same title again
    assert twice.returncode == 1, twice.stderr
    assert twice.stderr.strip().splitlines()[-1].startswith(
        'pgsynapse: error: the database refused the data: duplicate key value violates unique constraint '
        '"documents_title_once" (SQLSTATE 23505)')


def test_output_into_a_closed_pipe_ends_without_a_traceback(db_url):
    """`pgsynapse status --json | head -1`: the reader is gone before the command writes. It ended in a
    BrokenPipeError traceback."""
    env = {**os.environ, "DATABASE_URL": db_url}
    proc = subprocess.Popen([sys.executable, "-m", "pgsynapse", "status", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, cwd="/tmp")
    proc.stdout.close()  # before it has written anything
    _, err = proc.communicate(timeout=SAFETY_TIMEOUT)
    assert err.decode() == "" and proc.returncode == 141, err.decode()[-2000:]


def test_json_logs_are_structured_events(new_db):
    url = new_db()
    r = pgsynapse("--log-format", "json", "migrate", url=url)
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert {"event": "migration_applied", "version": 1, "name": "0001_init.sql"}.items() <= events[0].items()


def test_json_logs_stay_json_when_a_library_logs_through_the_standard_library(db_url, pg_url):
    """A database outage under a running worker: psycopg_pool's "error connecting in 'pool-1'" records (standard
    library logging) came out as plain two-line text between the JSON events; journalctl -o cat | jq broke on them."""
    dbname = conninfo_to_dict(db_url)["dbname"]
    worker = spawn_worker(db_url, env={"PGSYNAPSE_POLL_INTERVAL": "0.2"})  # --log-format json
    try:
        with psycopg.connect(pg_url, autocommit=True) as admin:  # the outage: every connection cut, none let in
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))
        with worker._cond:  # the pool's first failed reconnection, as whatever line it came out
            assert worker._cond.wait_for(lambda: any("error connecting in" in json.dumps(e) for e in worker.events),
                                         timeout=SAFETY_TIMEOUT), worker.tail()
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        worker.stop()
    assert not [e["line"] for e in worker.events if e["event"] == "raw"]  # every line parsed as JSON
    [pool] = [e for e in worker.events if "error connecting in" in e.get("message", "")][:1]
    assert {"event": "library_log", "logger": "psycopg.pool", "level": "warning"}.items() <= pool.items()
    assert pool["message"].startswith("error connecting in 'pool-1': ") and "timestamp" in pool


@pytest.mark.parametrize("args, env, code, error", [
    (["--log-format", "json", "--database-url", "host=/tmp/pgsynapse-no-server-here dbname=d", "status"], {}, 69,
     "cannot connect to PostgreSQL: "),
    # settings that do not load: the format of PGSYNAPSE_LOG_FORMAT (the systemd unit's)
    (["status"], {"PGSYNAPSE_LOG_FORMAT": "json", "PGSYNAPSE_POLL_INTERVAL": "-1"}, 78,
     "invalid setting poll_interval [PGSYNAPSE_POLL_INTERVAL]: Input should be greater than 0 (got '-1')"),
    # a command line the CLI refuses (a typo in the unit's ExecStart): argparse's usage and `error:` lines, plain text
    (["run", "--kinds", "embedd"], {"PGSYNAPSE_LOG_FORMAT": "json"}, 2,
     "pgsynapse run: argument --kinds: unknown job kind(s) 'embedd'"),
    (["--log-format", "json", "ask"], {}, 2, "pgsynapse ask: the following arguments are required: text"),
    (["feedback", "3", "--helpful", "--rating", "1", "--log-format=json"], {}, 2,
     "pgsynapse feedback: --helpful contradicts --rating 1"),
])
def test_a_fatal_error_with_json_logs_is_a_json_event(args, env, code, error):
    # its last line was `pgsynapse: error: ...`, plain text
    r = pgsynapse(*args, env=env)
    assert r.returncode == code
    assert r.stdout == ""
    events = [json.loads(line) for line in r.stderr.splitlines()]
    assert {"event": "fatal_error", "level": "error", "exit_code": code}.items() <= events[-1].items()
    assert events[-1]["error"].startswith(error)


@pytest.mark.parametrize("toml, env, error", [
    ('log_format = "json"\npoll_interval = -1\n', {}, "invalid setting poll_interval [poll_interval in "),
    ('[pgsynapse]\nlog_format = "json"\npoll_intervall = 1\n', {}, "invalid setting poll_intervall [poll_intervall in "),
    # a bad variable of the environment, the file's format
    ('log_format = "json"\n', {"PGSYNAPSE_POLL_INTERVAL": "-1"}, "invalid setting poll_interval [PGSYNAPSE_"),
])
def test_a_fatal_error_before_the_settings_load_takes_the_config_file_s_log_format(tmp_path, toml, env, error,
                                                                                     monkeypatch, capsys):
    # a config file's log_format = "json" was ignored: its bad setting came out as a plain `pgsynapse: error:` line
    config = tmp_path / "pgsynapse.toml"
    config.write_text(toml)
    # in-process (cli.main), three commands a test: a subprocess each cost a second of CPU to import the package
    monkeypatch.delenv("DATABASE_URL", raising=False)
    for name, value in {"PGSYNAPSE_LOG_FORMAT": "", **env}.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert main(["--config", str(config), "status"]) == 78
    r = capsys.readouterr()
    assert r.out == ""
    [event] = [json.loads(line) for line in r.err.splitlines()]
    assert {"event": "fatal_error", "exit_code": 78}.items() <= event.items() and event["error"].startswith(error)
    # the flag (after the command too) and the environment win over the file
    for args, extra in ((["status", "--log-format", "console"], {}), (["status"], {"PGSYNAPSE_LOG_FORMAT": "console"})):
        for name, value in extra.items():
            monkeypatch.setenv(name, value)
        assert main(["--config", str(config), *args]) == 78
        r = capsys.readouterr()
        assert r.err.startswith(f"pgsynapse: error: {error}"), r.err

