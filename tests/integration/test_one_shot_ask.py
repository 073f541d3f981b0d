"""What `pgsynapse ask` and `sql-ask` say when a question is not answered, as a user runs them (cli.main in-process,
its stdout and stderr): the question that was never asked (its INSERT cancelled at the timeout), the failure of the
in-process worker that answers when no worker runs, and an answer that did not come."""

from __future__ import annotations

import psycopg
import pytest

from pgsynapse.cli import main


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
