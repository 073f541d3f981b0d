"""What `pgsynapse ask` and `sql-ask` say when a question is not answered, as a user runs them (cli.main in-process,
its stdout and stderr): the question that was never asked (its INSERT cancelled at the timeout), the failure of the
in-process worker that answers when no worker runs, and an answer that did not come."""

from __future__ import annotations


from pgsynapse.cli import main


def test_a_question_the_in_process_worker_fails_prints_its_reason_once(db_url, capsys):
    # stderr showed an error-level job_failed beside the reason printed: a one-shot command's own question failed,
    # which it says (`pgsynapse run` still logs job_failed at error)
    assert main(["--database-url", db_url, "sql-ask", "how many orders?", "--schema", "nosuch"]) == 1
    out, err = capsys.readouterr()
    assert "failed: InputError: schema nosuch does not exist" in out
    assert "job_failed" not in err, err
