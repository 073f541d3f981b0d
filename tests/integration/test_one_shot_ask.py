"""What `pgsynapse ask` and `sql-ask` say when a question is not answered, as a user runs them (cli.main in-process,
its stdout and stderr): the question that was never asked (its INSERT cancelled at the timeout), the failure of the
in-process worker that answers when no worker runs, and an answer that did not come; and what Ctrl-C or SIGTERM
does to `sql-ask` while its own worker generates (the command in a subprocess, as a terminal runs it)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest

from pgsynapse.cli import main
from pgsynapse.handlers.answer import AnswerHandler
from tests.helpers import SAFETY_TIMEOUT, WorkerProcess, aconn, wait_until, with_db
from tests.integration.test_answer_streaming_crash import _ctrl_c_as_on_a_terminal


@pytest.fixture
def locked(db_url):
    """Tables locked against writes (a long migration, say): ``lock(table, ...)``."""
    with psycopg.connect(db_url) as conn:
        yield lambda *tables: conn.execute(f"LOCK TABLE {', '.join(tables)} IN EXCLUSIVE MODE")
        conn.rollback()


@pytest.mark.parametrize("command", ["ask", "sql-ask"])
def test_a_question_not_asked_in_time_says_why_without_psycopg_warnings(db_url, locked, command, capsys):
    # it printed two library_log warnings of psycopg (a query of the in-process worker's maintenance cancelled as it
    # stopped: "query cancellation interrupted", "discarding closed connection"), and said "its INSERT waited (a
    # lock on pgsynapse.data_questions?)" of a timeout too short for any INSERT
    what, table = ("question", "questions") if command == "ask" else ("data question", "data_questions")
    # the question's INSERT waits, and so does the maintenance's cache cleanup: in flight when the worker stops
    locked(f"pgsynapse.{table}", "pgsynapse.inference_cache")
    assert main(["--database-url", db_url, command, "how many orders?", "--timeout", "0.001"]) == 1
    err = capsys.readouterr().err
    assert "library_log" not in err, err
    assert (f"pgsynapse: error: the {what} was not asked within 0.001s: the timeout was too short to even insert "
            "it (") in err and "give a longer timeout" in err and "lock" not in err, err
    # waiting long enough to mean one, a lock is named as what may hold it up
    assert main(["--database-url", db_url, command, "how many orders?", "--timeout", "1.5"]) == 1
    err = capsys.readouterr().err
    assert "library_log" not in err, err
    assert (f"pgsynapse: error: the {what} was not asked within 1.5s: its INSERT waited 1.5s and was cancelled "
            f"(a lock on pgsynapse.{table}?") in err, err


def test_a_question_the_in_process_worker_fails_prints_its_reason_once(db_url, capsys):
    # stderr showed an error-level job_failed beside the reason printed: a one-shot command's own question failed,
    # which it says (`pgsynapse run` still logs job_failed at error)
    assert main(["--database-url", db_url, "sql-ask", "how many orders?", "--schema", "nosuch"]) == 1
    out, err = capsys.readouterr()
    assert "failed: InputError: schema nosuch does not exist" in out
    assert "job_failed" not in err, err
    # nor the warning a long-running worker gives at its start (`pgsynapse run`): on every sql-ask it was noise
    assert "sql_reader_shares_worker_session" not in err, err
    assert main(["--database-url", db_url, "--log-level", "info", "sql-ask", "how many?", "--schema", "nosuch"]) == 1
    err = capsys.readouterr().err
    [said] = [line for line in err.splitlines() if "sql_reader_shares_worker_session" in line]
    assert "[info" in said and "set sql_reader_url" in said, said  # there for whoever asks for info


def _asked_meanwhile(db_url: str, argv: list[str], meanwhile: Callable[[], None]) -> int:
    """``main(argv)`` in a thread; ``meanwhile()`` once its question is queued (the enqueue trigger's NOTIFY); the
    command's exit code."""
    code: list[int] = []
    with psycopg.connect(db_url, autocommit=True) as watch:
        watch.execute("LISTEN pgsynapse_jobs")
        asking = threading.Thread(target=lambda: code.append(main(["--database-url", db_url, *argv])))
        asking.start()
        assert next(watch.notifies(timeout=SAFETY_TIMEOUT), None) is not None, "the question was never queued"
        meanwhile()
        asking.join(SAFETY_TIMEOUT)
    assert code, "the command did not end"
    return code[0]


def test_an_answer_that_did_not_come_says_the_clients_reason_with_the_sql_to_read_it(db_url, capsys):
    # `ask` and `sql-ask` replaced every timeout of a question asked with "the worker answering ... may be slower than
    # that, busy or stuck": the Client's reason (no running worker takes the kind; PostgreSQL out of reach: "its
    # answer can still come once PostgreSQL is reachable") was lost, and it exited 1 where 69 says "retry later"
    # a worker ran when it asked (its LISTEN connection: none is started in-process), and stopped before answering
    worker = psycopg.connect(db_url, autocommit=True, application_name="pgsynapse-listener")
    assert _asked_meanwhile(db_url, ["ask", "how do I create an index?", "--timeout", "3"], worker.close) == 1
    err = capsys.readouterr().err
    assert ("pgsynapse: error: no answer to question 1 within 3s: no running worker takes answer jobs on this "
            "database: start one (`pgsynapse run`") in err, err
    assert err.rstrip().endswith("the question stays pending and is answered once one runs: "
                                 "SELECT status, answer FROM pgsynapse.questions WHERE id = 1"), err

    # PostgreSQL out of reach while it waits (a restart, say): exit 69
    worker = psycopg.connect(db_url, autocommit=True, application_name="pgsynapse-listener")
    admin = psycopg.connect(with_db(db_url, "postgres"), autocommit=True)  # a database's own sessions may not close it
    dbname = worker.info.dbname

    def unreachable() -> None:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = %s AND "
                      "application_name = 'pgsynapse-client'", (dbname,))
    try:
        code = _asked_meanwhile(db_url, ["sql-ask", "how many orders?", "--timeout", "3"], unreachable)
    finally:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        admin.close()
        worker.close()
    err = capsys.readouterr().err
    assert code == 69, err
    assert "pgsynapse: error: no answer to data question 1 within 3s: cannot connect to PostgreSQL: " in err, err
    assert "not currently accepting connections" in err, err
    assert err.rstrip().endswith("its answer can still come once PostgreSQL is reachable: "
                                 "SELECT status, sql, error FROM pgsynapse.data_questions WHERE id = 1"), err


def test_a_question_whose_in_process_worker_fails_to_start_says_it_stays_pending_and_why(db_url, monkeypatch,
                                                                                         capsys):
    # it said only "model path does not exist: /nonexistent/model": not that question 1 was asked and stays pending
    # for a worker (asked while the worker starts, it was, unless the start failed before the INSERT: a race, now
    # settled by waiting for the INSERT in flight)
    monkeypatch.setenv("PGSYNAPSE_MODEL_PATH", "/nonexistent/model")
    assert main(["--database-url", db_url, "ask", "how do I create an index?", "--timeout", "20"]) == 78
    err = capsys.readouterr().err  # exit 78: the start's own reason decides (a model that does not load)
    assert err.strip().splitlines()[-1] == (
        "pgsynapse: error: question 1 stays pending: this command's worker failed to start (model path does not "
        "exist: /nonexistent/model); it is answered once a worker runs (`pgsynapse run`): "
        "SELECT status, answer FROM pgsynapse.questions WHERE id = 1"), err
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT status FROM pgsynapse.questions").fetchall() == [("pending",)]


@pytest.mark.parametrize("command", ["ask", "sql-ask"])
def test_a_question_on_a_database_never_migrated_says_to_migrate_and_changes_nothing(new_db, command, capsys):
    # ask and sql-ask applied all the migrations to a DATABASE_URL database never migrated (a wrong database_url, a
    # production database before its owner's migrate), where every other one-shot command exits 78 saying so
    url = new_db()
    assert main(["--database-url", url, command, "how many orders?"]) == 78
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    err = capsys.readouterr().err
    assert err.startswith(f'pgsynapse: error: database "{name}" has no pgsynapse schema: run `pgsynapse migrate` '
                          "on it (it applies all "), err
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regnamespace('pgsynapse')").fetchone()[0] is None


def test_sql_ask_with_migrate_applies_the_migrations_first(new_db, capsys):
    url = new_db()  # never migrated: --migrate asks for the migrations, as the embedded default applies them
    assert main(["--database-url", url, "sql-ask", "how many orders?", "--schema", "nosuch", "--migrate"]) == 1
    out, err = capsys.readouterr()
    assert "failed: InputError: schema nosuch does not exist" in out, out + err
    assert "schema_migrated_before_asking" in err, err


@pytest.mark.parametrize(("argv", "code", "last"), [
    (["ask", "how do I create an index?"], 0, "  answered in "),
    (["ask", "how do I create an index?", "--json"], 0, '  "cached_from": null'),
    (["sql-ask", "how many orders?", "--schema", "nosuch"], 1, "failed: InputError: schema nosuch does not exist"),
])
def test_ask_prints_its_answer_before_its_in_process_worker_stops(db_url, monkeypatch, argv, code, last):
    # the answer's last lines (sources, "answered in") came only once the in-process worker had stopped, and the
    # embedded server with it: 0.3 to 8.7 s after the answer had arrived. stdout and stderr in one stream, as on a
    # terminal: the answer is printed before the worker's stop begins
    said = io.StringIO()
    monkeypatch.setattr(sys, "stdout", said)
    monkeypatch.setattr(sys, "stderr", said)  # the log handler writes to the stderr of its configuration
    assert main(["--database-url", db_url, "--log-level", "info", *argv]) == code, said.getvalue()
    lines = said.getvalue().splitlines()
    printed = [i for i, line in enumerate(lines) if line.startswith(last)]
    stopping = [i for i, line in enumerate(lines) if "worker_stopping" in line]
    assert printed and stopping and printed[0] < stopping[0], said.getvalue()


def test_an_answer_printed_stays_answered_when_the_in_process_worker_fails_at_its_stop(db_url, monkeypatch, capsys):
    # the answer printed, a failure of the in-process worker as it then stopped said "question 1 stays pending: this
    # command's worker stopped (...)" of the question just answered, and ended in a traceback
    async def failing(self) -> None:
        raise RuntimeError("the replica pool would not close")

    monkeypatch.setattr(AnswerHandler, "aclose", failing)
    assert main(["--database-url", db_url, "ask", "how do I create an index?"]) == 0
    out, err = capsys.readouterr()
    assert "answered in " in out and "(question 1)" in out, out
    assert "stays pending" not in err and "own_worker_stop_failed" in err and "would not close" in err, err
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT status FROM pgsynapse.questions").fetchall() == [("answered",)]


@pytest.mark.anyio
@pytest.mark.parametrize("command", ["ask", "sql-ask"])
async def test_sigterm_while_the_question_waits_exits_143_and_leaves_nothing_running(db_url, locked, command):
    """SIGTERM killed `ask` and `sql-ask` at once (shell status 143 from the kernel, not the program): a job their own
    worker held stayed `running` until its lease ran out. Now it stops them as Ctrl-C does, at any point (here: the
    question's INSERT waiting on a lock), and they exit 143 themselves, their worker stopped and deregistered."""
    table = "questions" if command == "ask" else "data_questions"
    locked(f"pgsynapse.{table}")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    asker = subprocess.Popen([sys.executable, "-m", "pgsynapse", "--database-url", db_url, command, "how many orders?"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    conn = await aconn(db_url)
    try:
        await wait_until(conn, "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                               " AND query LIKE %s)", (f"%INSERT INTO pgsynapse.{table}%",))
        asker.send_signal(signal.SIGTERM)
        out, err = asker.communicate(timeout=SAFETY_TIMEOUT)
        workers = (await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.workers")).fetchone())["n"]
    finally:
        asker.kill()
        await conn.close()
    assert asker.returncode == 143, err
    assert "Traceback" not in err and out == "", (out, err)
    assert workers == 0  # its worker stopped and deregistered, as after a Ctrl-C


class HeldSql(BaseHTTPRequestHandler):
    """An OpenAI-compatible SQL endpoint that says ``SELECT count(*) FROM orders``; the first request is answered
    only once ``release`` is set (``came`` says it arrived): a generation in progress, held by the test."""

    requests: list[dict] = []
    came = threading.Event()
    release = threading.Event()

    def do_POST(self):  # noqa: N802 - http.server's name
        HeldSql.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        if len(HeldSql.requests) == 1:
            HeldSql.came.set()
            HeldSql.release.wait(SAFETY_TIMEOUT)
        n = HeldSql.requests[-1].get("n", 1)
        choice = {"message": {"role": "assistant", "content": "SELECT count(*) FROM orders"}, "finish_reason": "stop"}
        body = json.dumps({"choices": [{"index": i, **choice} for i in range(n)]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def held_sql():
    HeldSql.requests, HeldSql.came, HeldSql.release = [], threading.Event(), threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), HeldSql)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    HeldSql.release.set()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_of_sql_ask_stops_its_own_workers_generation_and_puts_the_question_back_at_once(db_url, held_sql,
                                                                                                stop, code):
    """`pgsynapse sql-ask` with no worker running answers with a worker of its own. Ctrl-C while that worker
    generated waited for the whole generation (every candidate and fix turn: tens of seconds with a local model),
    wrote a result nobody was shown, and only then exited; SIGTERM killed the command at once, its job left leased.
    Now the generation stops at its next step (here: before the sampled candidates' request), the job goes back to
    the queue at once (its attempt not charged, nothing written to the row), and the command exits 130 (143)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int); GRANT SELECT ON orders TO pgsynapse_reader")
    env = {**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"}, "PGSYNAPSE_SQL_RUNTIME": "openai",
           "PGSYNAPSE_OPENAI_BASE_URL": held_sql, "PGSYNAPSE_SQL_MODEL_PATH": "m", "PGSYNAPSE_SQL_CANDIDATES": "3",
           "PGSYNAPSE_LOG_LEVEL": "info"}
    asker = subprocess.Popen([sys.executable, "-m", "pgsynapse", "--database-url", db_url, "--log-format", "json",
                              "sql-ask", "how many orders?"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_ctrl_c_as_on_a_terminal)
    logs = WorkerProcess(asker)
    threading.Thread(target=logs._pump, daemon=True).start()
    try:
        assert HeldSql.came.wait(SAFETY_TIMEOUT), f"no request for the statement: {logs.tail()}"
        asker.send_signal(stop)
        logs.wait_event("worker_stopping")
        HeldSql.release.set()  # the greedy statement comes, once the stop was asked
        try:  # before the sampled candidates' request; before, after it, the check and the run of all three
            asker.wait(SAFETY_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`pgsynapse sql-ask` still generates {SAFETY_TIMEOUT} s after its stop: {logs.tail()}")
        out = asker.stdout.read()
    finally:
        HeldSql.release.set()
        asker.kill()
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT status, sql, result, error FROM pgsynapse.data_questions").fetchone()
        job = conn.execute("SELECT status, attempts, lease_until FROM pgsynapse.jobs WHERE kind = 'sql_answer'"
                           ).fetchone()
    assert asker.returncode == code, logs.tail()
    assert len(HeldSql.requests) == 1, HeldSql.requests
    assert row == ("pending", None, None, None), row
    assert job == ("pending", 0, None), job
    assert not out, out  # no result: none was made
    stopped = logs.wait_event("sql_generation_stopped")
    assert stopped["reason"] == "abandoned", stopped
