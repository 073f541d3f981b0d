"""The data-question commands as a user runs them, on the demo's table, with a tiny SQL model the test teaches the
demo's question (tests/sql_models.py): sql-ask prints the SQL and a table, sql-correct records training data, the
sql-model registry commands move sessions between models, status counts it all."""

from __future__ import annotations

import importlib.util
import json

import psycopg
import pytest

from pgsynapse.answerers.local_models import PRESETS, preset_not_installed
from pgsynapse.demo import DATA_QUESTION, SHOP_SQL
from tests.helpers import pgsynapse

def test_sql_commands_end_to_end(db_url, demo_sql_model, tmp_path):
    env = {"PGSYNAPSE_SQL_MODEL_PATH": demo_sql_model}
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SHOP_SQL)
        want = conn.execute("SELECT region, count(shipped) FROM demo_shop.orders GROUP BY 1 ORDER BY 2 DESC, 1"
                            ).fetchall()
    r = pgsynapse("sql-ask", DATA_QUESTION, "--schema", "demo_shop", url=db_url, env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == 'SQL: select region, count ( shipped ) from "demo_shop".orders group by region order by 2 desc, 1'
    assert lines[1].split("|")[0].strip() == "region" and set(lines[2]) <= {"-", "+"}
    assert [tuple(c.strip() for c in ln.split("|")) for ln in lines[3:3 + len(want)]] == [
        (region, str(n)) for region, n in want]
    assert f"({len(want)} rows)" in r.stdout and "answered in" in r.stdout and "ms by the configured SQL model (data question 1)" in r.stdout


    ok = pgsynapse("sql-correct", "1", "--approve", url=db_url)
    assert ok.returncode == 0 and "correction 1 recorded for data question 1" in ok.stdout, ok.stderr
    missing = pgsynapse("sql-correct", "99", "--sql", "select 1", url=db_url)
    assert missing.returncode == 1 and "no data question 99" in missing.stderr
    # what could never train is refused with why, not recorded and counted towards a retrain: an empty statement, a
    # write or a table outside the question's scope (the retrain checks each as the model's), an approval of a
    # statement that never ran
    with psycopg.connect(db_url, autocommit=True) as conn:
        failed = conn.execute("INSERT INTO pgsynapse.data_questions (text, target_schema, status, error) VALUES"
                              " ('how many refunds?', 'demo_shop', 'failed', 'no model') RETURNING id").fetchone()[0]
        conn.execute("DELETE FROM pgsynapse.jobs WHERE kind = 'sql_answer' AND ref_id = %s", (failed,))
    for args, said in [(["1", "--sql", " \n"], "data question 1: the corrected statement is empty"),
                       (["1", "--sql", "DELETE FROM demo_shop.orders"],
                        "data question 1: the corrected statement is refused: the statement writes (DELETE)"),
                       (["1", "--sql", "SELECT count(*) FROM pgsynapse.jobs"],
                        "data question 1: the corrected statement is refused: table pgsynapse.jobs is not allowed"),
                       # it parses but fails in PostgreSQL, as the retrain would run it (as the reader role)
                       (["1", "--sql", "SELECT nocol FROM demo_shop.orders"],
                        'data question 1: the corrected statement failed in PostgreSQL: column "nocol" does not '
                        "exist (SQLSTATE 42703)"),
                       (["1", "--sql", "SELECT count(*) / 0 FROM demo_shop.orders"],
                        "data question 1: the corrected statement failed in PostgreSQL: division by zero "
                        "(SQLSTATE 22012)"),
                       ([str(failed), "--approve"], f"data question {failed} cannot be approved: no statement "
                                                    "could be made for it (status failed, its error says why)")]:
        bad = pgsynapse("sql-correct", *args, url=db_url)
        assert bad.returncode == 1 and said in bad.stderr and not bad.stdout, (args, bad.stderr)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgsynapse.sql_corrections").fetchone()[0] == 1
    # one that runs is recorded
    right = pgsynapse("sql-correct", "1", "--sql", "SELECT region, count(shipped) FROM demo_shop.orders GROUP BY 1",
                      url=db_url)
    assert right.returncode == 0 and "correction 2 recorded for data question 1" in right.stdout, right.stderr

    # a path that is not there is refused before it is registered (every question routed to it would fail)
    nope = pgsynapse("sql-model", "add", "/no/such/model", url=db_url)
    assert nope.returncode == 78 and "SQL model path does not exist: /no/such/model" in nope.stderr, nope.stderr
    assert json.loads(pgsynapse("sql-model", "list", "--json", url=db_url).stdout) == []
    add = pgsynapse("sql-model", "add", demo_sql_model, "--name", "tiny", url=db_url)
    assert add.returncode == 0 and "SQL model 1 (transformers): candidate" in add.stdout, add.stderr
    assert "runtime transformers: not a GGUF model" in add.stdout  # no --runtime: it says which runtime, and why
    assert "SQL model 1 is active (was the settings' model)" in pgsynapse("sql-model", "promote", "1", url=db_url).stdout
    listed = json.loads(pgsynapse("sql-model", "list", "--json", url=db_url).stdout)
    assert [(m["id"], m["status"], float(m["traffic_percent"])) for m in listed] == [(1, "active", 100.0)]
    # the registered model serves the next question (its id on the row)
    served = json.loads(pgsynapse("sql-ask", DATA_QUESTION, "--schema", "demo_shop", "--json", url=db_url).stdout)
    assert served["status"] == "answered" and served["sql_model_id"] == 1
    assert served["rows"] == [list(w) for w in want]
    back = pgsynapse("sql-model", "rollback", url=db_url)
    assert "no SQL model is active: the settings' model serves again" in back.stdout, back.stderr
    retrain = pgsynapse("sql-model", "retrain", url=db_url)
    assert retrain.returncode == 0 and "sql_retrain queued (job" in retrain.stdout

    status = pgsynapse("status", url=db_url).stdout
    assert "data questions : 3 (0 pending, 2 answered, 0 refused, 1 failed, 0 blocked)" in status
    assert "SQL model 1" not in status  # a retired model is not listed

    # a GGUF model without --runtime: llama.cpp when llama-cpp-python is installed (not here), else transformers
    # with what to install (it registered transformers, ten times slower, and said nothing)
    (tmp_path / "model.gguf").write_bytes(b"")
    gguf = pgsynapse("sql-model", "add", str(tmp_path / "model.gguf"), url=db_url)
    assert gguf.returncode == 0 and "SQL model 2 (transformers): candidate" in gguf.stdout, gguf.stderr
    assert "llama-cpp-python is not installed" in gguf.stdout and "pgsynapse[llama]" in gguf.stdout


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed here")
def test_the_llama_cpp_runtime_is_refused_where_it_is_not_installed_unless_the_workers_run_elsewhere(db_url, tmp_path):
    # `sql-model add X.gguf --runtime llama-cpp` registered it without llama-cpp-python installed: every data question
    # routed to it failed later, in the worker
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    r = pgsynapse("sql-model", "add", str(gguf), "--runtime", "llama-cpp", url=db_url)
    assert r.returncode == 78 and not r.stdout, r.stdout + r.stderr
    assert r.stderr.startswith("pgsynapse: error: runtime llama-cpp needs llama-cpp-python, which is not installed "
                               "where this command runs: pip install 'pgsynapse[llama]'"), r.stderr
    assert "--no-runtime-check" in r.stderr
    assert json.loads(pgsynapse("sql-model", "list", "--json", url=db_url).stdout) == []
    # the workers run on another host, which has it: registered as asked
    r = pgsynapse("sql-model", "add", str(gguf), "--runtime", "llama-cpp", "--no-runtime-check", url=db_url)
    assert r.returncode == 0 and "SQL model 1 (llama-cpp): candidate" in r.stdout, r.stderr


def test_a_directory_with_no_model_or_a_preset_not_installed_here_is_refused_unless_the_workers_run_elsewhere(
        db_url, tmp_path):
    # `sql-model add DIR` registered any existing directory (an empty one, a folder of documents) as a transformers
    # model, and a preset as its name whether its packages were installed or not: every data question routed to it
    # failed later, in the worker (the worker refuses both at start for sql_model_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = pgsynapse("sql-model", "add", str(empty), url=db_url)
    assert r.returncode == 78 and not r.stdout, r.stdout + r.stderr
    assert r.stderr.startswith(f"pgsynapse: error: SQL model path {empty} is a directory without a model in it "
                               "(a transformers model has config.json; a GGUF model directory, exactly one .gguf "
                               "file)"), r.stderr
    assert json.loads(pgsynapse("sql-model", "list", "--json", url=db_url).stdout) == []
    missing = next((name for name in PRESETS if preset_not_installed(name)), None)
    if missing is None:
        pytest.skip("every SQL model preset is installed here")
    r = pgsynapse("sql-model", "add", missing, url=db_url)
    assert r.returncode == 78 and not r.stdout, r.stdout + r.stderr
    assert r.stderr.startswith(f"pgsynapse: error: SQL model preset {missing!r} is not installed where this command "
                               f"runs: {preset_not_installed(missing)}"), r.stderr
    assert "--no-runtime-check" in r.stderr
    assert json.loads(pgsynapse("sql-model", "list", "--json", url=db_url).stdout) == []
    # the workers run on another host, which has it: registered as asked
    r = pgsynapse("sql-model", "add", missing, "--runtime", "transformers", "--no-runtime-check", url=db_url)
    assert r.returncode == 0 and "SQL model 1 (transformers): candidate" in r.stdout, r.stderr
