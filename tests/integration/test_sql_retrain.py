"""The SQL retrain (handlers/sql_retrain.py -> python -m pgsynapse.textsql.train -> textsql/gate.py -> sql_models) on
a real database with a table the test creates and grants to the reader role, and a tiny model the test builds.

Three kinds of question (the order count, the amount total, the amount maximum: the last word says which), each in
five paraphrases. The settings' model (the active one: no sql_models row) answers every one of them with the
statement of the next kind (count -> total -> maximum -> count): wrong on every held-out paraphrase. Right
corrections give a candidate that wins on held-out execution accuracy and gets traffic.

Shuffled corrections give each question the statement of another question (one about a subset of the orders, each
with a result no other statement gives): a held-out question's target is then a statement training never saw, so
no amount of learning makes the candidate better than the active model on it, and it is rejected. (Permuting the
three right statements instead would not do: a consistent mix-up is learnable, and the gate, judging by the
corrections, would rightly pass it.)"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import anyio
import psycopg
import pytest
import torch
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.config import load_settings
from pgsynapse.errors import ConfigError, InputError
from pgsynapse.handlers.base import Job, Outcome
from pgsynapse.handlers.sql_retrain import SqlRetrainHandler, SqlRetrainWork
from pgsynapse.queries import q
from pgsynapse.textsql import pairs as training_pairs, reader, registry, train
from pgsynapse.textsql.context import schema_context
from pgsynapse.textsql.cli import render_sql_gate, run_sql_model_command
from pgsynapse.textsql.generate import SqlPrompt
from pgsynapse.textsql.pairs import load_pairs
from tests.helpers import aconn, drop_database, fast_settings, logs_until, pgsynapse, running_worker, with_db
from tests.sql_models import tiny_sql_model

COUNT, TOTAL, LARGEST = ("SELECT count(*) FROM orders", "SELECT sum(amount) FROM orders",
                         "SELECT max(amount) FROM orders")
# the kind of question is its last word; the paraphrases differ before it
_OPENINGS = ("tell me the", "please tell me the", "now tell me the", "quickly tell me the", "tell me again the")
QUESTIONS = {COUNT: [f"{o} order count" for o in _OPENINGS], TOTAL: [f"{o} amount total" for o in _OPENINGS],
             LARGEST: [f"{o} amount maximum" for o in _OPENINGS]}
NEXT = {COUNT: TOTAL, TOTAL: LARGEST, LARGEST: COUNT}  # the settings' model's mistake
# statements of other questions: pairwise different results, none equal to the three kinds' (5, 201, 78)
OTHERS = [f"SELECT count(*) FROM orders WHERE amount > {k}" for k in (20, 30, 40, 60, 90)] + [
    f"SELECT sum(amount) FROM orders WHERE amount {op} {k}" for op, k in ((">", 20), (">", 30), (">", 40),
                                                                          ("<", 30), ("<", 40))] + [
    f"SELECT max(amount) FROM orders WHERE amount < {k}" for k in (20, 30, 40, 60)] + ["SELECT avg(amount) FROM orders"]


def _setup_table(url: str) -> str:
    """public.orders, readable by the reader role; returns the schema context the worker would give a model."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, region text NOT NULL, amount int NOT NULL)")
        conn.execute("INSERT INTO public.orders VALUES (1, 'north', 11), (2, 'south', 23), (3, 'north', 37),"
                     " (4, 'east', 52), (5, 'south', 78)")
        conn.execute("GRANT SELECT ON public.orders TO pgsynapse_reader")
        return schema_context(conn, "public", None).text


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, new_db_module) -> str:
    """The settings' SQL model: a tiny model that gives every question of the test the next kind's statement."""
    context = _setup_table(new_db_module)
    pairs = [(SqlPrompt(text, context), NEXT[sql]) for sql, texts in QUESTIONS.items() for text in texts]
    return str(tiny_sql_model(tmp_path_factory.mktemp("sqlmodels") / "base", pairs))


@pytest.fixture(scope="module")
def new_db_module(pg_url, template_db):
    name = "pgsynapse_sqlretrain_ctx"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield with_db(pg_url, name)
    drop_database(pg_url, name)


def _corrections(url: str, context: str, shuffled: bool) -> None:
    """Each paraphrase answered by the settings' model, and corrected: with the right statement, or (``shuffled``)
    with another question's."""
    others = iter(OTHERS)
    with psycopg.connect(url, autocommit=True) as conn:
        for sql, texts in QUESTIONS.items():
            for text in texts:
                qid = conn.execute(
                    "INSERT INTO pgsynapse.data_questions (text, status, sql, schema_context) VALUES"
                    " (%s, 'answered', %s, %s) RETURNING id", (text, NEXT[sql], context)).fetchone()[0]
                conn.execute("INSERT INTO pgsynapse.sql_corrections (question_id, corrected_sql) VALUES (%s, %s)",
                             (qid, next(others) if shuffled else sql))


def _settings(url, tmp_path, base_path, **kw):
    values = dict(data_dir=str(tmp_path), sql_runtime="transformers", sql_model_path=base_path, torch_threads=1,
                  sql_retrain_min_corrections=10, sql_retrain_epochs=10, sql_retrain_lr=3e-3,
                  sql_retrain_heldout_fraction=0.4, sql_retrain_traffic_percent=15.0, sql_max_new_tokens=24)
    values.update(kw)
    return fast_settings(url, **values)


def _in_process(handler: SqlRetrainHandler, work: list) -> list[Outcome]:
    """``compute`` without the trainer's process: its main() here (the test process has imported torch and
    transformers already, the process would again), judged and registered as ``compute`` does."""
    [w] = work
    threads = torch.get_num_threads()
    try:
        out_dir = handler.out_dir(w)
        return [Outcome(w.job, result=handler.judge(w, train.main(handler.spec(w, out_dir)), out_dir))]
    finally:
        torch.set_num_threads(threads)  # the generators set it: the rest of the session keeps its own


async def _run(handler: SqlRetrainHandler, url: str, force: bool = False, compute=None):
    """The handler's three steps on one job, as the worker runs them (compute in a thread)."""
    job = Job(1, "sql_retrain", 0, {"force": force}, 1, dt.datetime.now(dt.timezone.utc))
    conn = await aconn(url)
    try:
        work, known = await handler.load(conn, [job])
        assert known == []
        [outcome] = await anyio.to_thread.run_sync(compute or handler.compute, work)
        if outcome.ok and outcome.skip_reason is None:
            async with conn.transaction():
                report = await handler.write(conn, [outcome])
            assert report.written == [job.id]
        return outcome
    finally:
        await conn.close()


def _models(url: str) -> list[dict]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute("SELECT * FROM pgsynapse.sql_models ORDER BY id").fetchall()


@pytest.mark.anyio
async def test_right_corrections_give_a_candidate_that_wins_and_gets_traffic(db_url, tmp_path, base_model):
    context = _setup_table(db_url)
    _corrections(db_url, context, shuffled=False)
    handler = SqlRetrainHandler(_settings(db_url, tmp_path, base_model))
    with capture_logs() as logs:
        outcome = await _run(handler, db_url)
    assert outcome.ok and outcome.skip_reason is None, outcome.error
    [model] = _models(db_url)
    m = model["metrics"]
    assert m["gate"]["passed"], m
    assert (model["status"], float(model["traffic_percent"]), model["runtime"]) == ("candidate", 15.0, "transformers")
    assert model["base_id"] is None and model["path"].startswith(str(tmp_path))
    # a transformers base: no GGUF export, the directory is what is gated and served
    assert m["gguf_export"] == {"skipped": "the base is not a GGUF model"}
    assert m["candidate_model"] == {"runtime": "transformers", "path": model["path"], "directory": model["path"]}
    assert m["candidate_accuracy"] > m["active_accuracy"] == 0.0
    assert m["train_pairs"] + m["heldout"] == 15 and m["heldout"] >= 3 and m["dropped"] == {}
    assert m["active"]["wrong"] == m["heldout"]  # the settings' model gives every question the next kind's statement
    events = [e["event"] for e in logs]
    assert {"sql_retrain_started", "sql_retrain_finished", "sql_model_registered"} <= set(events)
    # every correction is marked with the model it trained: the next job has nothing new and is skipped
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgsynapse.sql_corrections"
                            " WHERE trained_in_model IS DISTINCT FROM %s", (model["id"],)).fetchone()[0] == 0
    again = await _run(handler, db_url)
    assert again.skip_reason and "only 0 new corrections" in again.skip_reason


@pytest.mark.anyio
async def test_a_registered_sql_model_not_there_is_named_by_its_row_before_the_training(db_url, tmp_path, base_model):
    """The trainer said `invalid setting sql_model_path [PGSYNAPSE_SQL_MODEL_PATH]` of a registered base or active
    SQL model that was not there (that setting had not chosen it), and of the active one only once a candidate had
    been trained from the base. Each is named by its row, before any training."""
    context = _setup_table(db_url)
    _corrections(db_url, context, shuffled=False)
    handler = SqlRetrainHandler(_settings(db_url, tmp_path, base_model))
    gone = str(tmp_path / "gone")
    job = Job(1, "sql_retrain", 0, {"force": True}, 1, dt.datetime.now(dt.timezone.utc))

    async def trained() -> None:
        conn = await aconn(db_url)
        try:
            [w], _ = await handler.load(conn, [job])
        finally:
            await conn.close()
        train.main(handler.spec(w, tmp_path / "candidate"))

    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        root = registry.add_model(conn, "root", base_model, "transformers", status="active")
        tuned = registry.add_model(conn, "tuned", gone, "transformers", base_id=root["id"], status="active")
    with pytest.raises(ConfigError, match=rf"^SQL model {tuned['id']} \(tuned, transformers\) of the registry: "
                                          rf"'{gone}' is neither a model directory") as missing:
        await trained()
    # what to do, as the sql_answer handler says it of the same model (registry.out_of_service)
    assert str(missing.value).endswith(f": put the model back at {gone}, or take it out of service (`pgsynapse "
                                       "sql-model rollback`: it is the active one)"), missing.value
    assert not (tmp_path / "candidate").exists()  # nothing trained for a gate that could not run
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:  # the retired root's files go
        conn.execute("UPDATE pgsynapse.sql_models SET path = %s WHERE id = %s", (base_model, tuned["id"]))
        conn.execute("UPDATE pgsynapse.sql_models SET path = %s WHERE id = %s", (gone, root["id"]))
    with pytest.raises(ConfigError, match=rf"^SQL model {root['id']} \(root, transformers\) of the registry: "
                                          rf"'{gone}' is neither a model directory") as missing:
        await trained()
    # retired, it is out of service already: the retrain fine-tunes it as the root of the active model's lineage
    assert str(missing.value).endswith(f": put the model back at {gone}: the SQL retrain fine-tunes the root of the "
                                       f"active SQL model's lineage (SQL model {tuned['id']})"), missing.value
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        registry.rollback(conn)  # the root serves again; its files go
        conn.execute("UPDATE pgsynapse.sql_models SET path = %s WHERE id = %s", (gone, root["id"]))
    with pytest.raises(ConfigError, match=rf"^SQL model {root['id']} \(root, transformers\) of the registry: "
                                          rf"'{gone}' is neither a model directory") as missing:
        await trained()
    assert str(missing.value).endswith(f": put the model back at {gone}, or take it out of service (`pgsynapse "
                                       "sql-model rollback`: it is the active one)"), missing.value


@pytest.mark.anyio
async def test_shuffled_corrections_give_a_candidate_the_gate_rejects(db_url, tmp_path, base_model):
    context = _setup_table(db_url)
    _corrections(db_url, context, shuffled=True)
    handler = SqlRetrainHandler(_settings(db_url, tmp_path, base_model, sql_retrain_lora=True))  # LoRA, merged
    outcome = await _run(handler, db_url, compute=lambda work: _in_process(handler, work))
    assert outcome.ok, outcome.error
    [model] = _models(db_url)
    m = model["metrics"]
    assert not m["gate"]["passed"] and "not above" in m["gate"]["reasons"][0]
    assert (model["status"], float(model["traffic_percent"])) == ("rejected", 0.0)
    assert m["candidate_accuracy"] == m["active_accuracy"] == 0.0 and m["heldout"] >= 3 and m["dropped"] == {}
    # the LoRA adapter was merged: the candidate evaluated above loaded as a plain model directory
    assert m["recipe"] == "lora" and 0 < m["train"]["trained_parameters"] < m["train"]["parameters"] / 10
    assert m["candidate"]["pairs"] == m["heldout"] and m["candidate"]["no_sql"] == 0
    # a rejected model never serves: its weights are deleted, its directory keeps metrics.json and the config
    out = Path(model["path"])
    out = out if out.is_dir() else out.parent
    assert out.is_relative_to(tmp_path) and (out / "metrics.json").is_file() and (out / "config.json").is_file()
    assert not [f for f in out.rglob("*") if f.suffix in (".safetensors", ".bin", ".gguf")], sorted(out.rglob("*"))


@pytest.mark.anyio
async def test_the_memory_guard_stops_the_trainer_with_a_clear_error(db_url, tmp_path, base_model):
    context = _setup_table(db_url)
    _corrections(db_url, context, shuffled=False)
    outcome = await _run(SqlRetrainHandler(_settings(db_url, tmp_path, base_model, sql_retrain_memory_mb=256)), db_url)
    assert outcome.error.startswith("training exceeded its memory budget of 256 MB and was stopped: raise the budget "
                                    "(retrain_memory_mb; sql_retrain_memory_mb for the SQL trainer)"), outcome.error
    assert outcome.retry is False and _models(db_url) == []


@pytest.mark.anyio
async def test_a_stopping_worker_abandons_the_sql_training_rather_than_wait_for_it(db_url, tmp_path, base_model):
    """The worker's stop (Handler.abandon) stops the trainer or, as here, keeps it from starting: the job's outcome
    is abandoned (the writer releases it for the next worker, attempt not charged), nothing is registered.
    tests/e2e/test_processes.py stops a retrain's trainer mid-run with SIGTERM."""
    context = _setup_table(db_url)
    _corrections(db_url, context, shuffled=False)
    handler = SqlRetrainHandler(_settings(db_url, tmp_path, base_model))
    handler.abandon()
    with capture_logs() as logs:
        outcome = await _run(handler, db_url)
    assert (outcome.abandoned, outcome.error) == (True, "the worker is stopping: the training run was abandoned")
    assert [e["job"] for e in logs if e["event"] == "sql_retrain_abandoned"] == [1] and _models(db_url) == []


def _retrain_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"sql_model_command": "retrain", "force": False, "wait": True, "json": False, **kw})


@pytest.mark.anyio
async def test_sql_model_retrain_runs_now_waits_for_the_worker_and_prints_the_verdict(
        db_url, tmp_path, base_model, models):
    # 15 corrections, under the default threshold (50): the command asks for a retrain now, and the worker runs it
    # (it skipped the job, "only 15 new corrections", and the command had no --wait to say so)
    context = _setup_table(db_url)
    _corrections(db_url, context, shuffled=False)
    settings = _settings(db_url, tmp_path, base_model, sql_retrain_min_corrections=50, kinds=("sql_retrain",))
    async with running_worker(settings, models):
        # the command waits for the job's NOTIFY in its own process while this one's worker runs the job
        done = await anyio.to_thread.run_sync(lambda: pgsynapse("sql-model", "retrain", "--wait", "--json", url=db_url,
                                                                timeout=300))
    [queued] = [ln for ln in done.stderr.splitlines() if ln.startswith("sql_retrain queued")]  # stdout: the JSON
    [model] = _models(db_url)
    assert done.returncode == 0 and queued.startswith("sql_retrain queued (job ") and queued.endswith(")"), queued
    printed = json.loads(done.stdout)
    assert printed == {"job": int(queued.split("job ")[1].rstrip(")")), "outcome": "done", "sql_model": model["id"],
                       "status": "candidate", "traffic_percent": 15.0, "gate": model["metrics"]["gate"]}
    gate = printed["gate"]
    assert gate["passed"] and gate["candidate"] > gate["active"] == 0.0
    assert render_sql_gate(model).splitlines() == [
        f"SQL model {model['id']}: candidate, passed its gate; it answers 15% of sessions (`pgsynapse sql-model "
        f"promote {model['id']}` makes it the active model)",
        f"  held-out execution accuracy {gate['candidate']:.3f} against the active model's 0.000 ({gate['heldout']} "
        f"pairs: {gate['wins']} won, 0 lost)",
        f"  gate: {gate['reasons'][0]}"]


def test_sql_model_retrain_without_a_correction_queues_nothing(db_url, tmp_path):
    settings = fast_settings(db_url, data_dir=str(tmp_path))
    with pytest.raises(InputError, match=r"no corrections to learn from .*nothing was queued"):
        run_sql_model_command(_retrain_args(), settings)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgsynapse.jobs WHERE kind = 'sql_retrain'").fetchone() == (0,)


def test_sql_model_retrain_json_without_a_correction_prints_one_json_document_saying_so(db_url, tmp_path, capsys):
    # with --json stdout is one JSON document: the refusal printed none (stderr had the reason, exit 1)
    settings = fast_settings(db_url, data_dir=str(tmp_path))
    with pytest.raises(InputError, match=r"no corrections to learn from .*nothing was queued") as refused:
        run_sql_model_command(_retrain_args(json=True), settings)
    assert json.loads(capsys.readouterr().out) == {
        "job": None, "outcome": "refused", "reason": str(refused.value), "sql_model": None, "status": None,
        "traffic_percent": None, "gate": None}


@pytest.mark.anyio
async def test_only_corrections_that_can_train_count_towards_a_retrain(db_url, tmp_path):
    # the count that queues a retrain (and that `sql-model retrain` refuses on) counted every row: a blank
    # statement, an approval of a statement that never ran and a second correction of one question each counted,
    # while the retrain reads one pair per question and drops the rest
    context = _setup_table(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # rows written before the check refused them
        def ask(status: str, sql: str | None) -> int:
            return conn.execute("INSERT INTO pgsynapse.data_questions (text, status, sql, schema_context) VALUES"
                                " ('tell me the order count', %s, %s, %s) RETURNING id", (status, sql, context)
                                ).fetchone()[0]
        def correction(question: int, sql: str | None) -> None:
            conn.execute("INSERT INTO pgsynapse.sql_corrections (question_id, corrected_sql, approved) VALUES"
                         " (%s, %s, %s)", (question, sql, sql is None))
        twice = ask("answered", TOTAL)
        correction(twice, COUNT)
        correction(twice, COUNT + " WHERE amount > 0")  # its latest: one pair
        correction(ask("failed", None), None)  # nothing ran: nothing to approve
        correction(ask("refused", "DELETE FROM orders"), None)
        correction(ask("answered", TOTAL), " \n")
        approved = ask("answered", COUNT)
        correction(approved, None)
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        pairs = load_pairs(conn, "pgsynapse_reader")
        assert [(p.question_id, p.sql) for p in pairs] == [(twice, COUNT + " WHERE amount > 0"), (approved, COUNT)]
        assert conn.execute(q("sql_corrections_count", "textsql_models.sql")).fetchone()["n"] == 2
    handler = SqlRetrainHandler(_settings(db_url, tmp_path, "unused", sql_retrain_min_corrections=3))
    outcome = await _run(handler, db_url)
    assert outcome.skip_reason == "only 2 new corrections (sql_retrain_min_corrections = 3)", outcome


def test_a_correction_of_a_question_as_it_was_before_an_edit_does_not_train(db_url):
    # an edit asks the question again: a correction or approval given before it was for the old text (and the old
    # statement), and trained the new text with it, an approval even the new statement that nobody approved
    context = _setup_table(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        def ask(text: str) -> int:
            return conn.execute("INSERT INTO pgsynapse.data_questions (text, status, sql, schema_context) VALUES"
                                " (%s, 'answered', %s, %s) RETURNING id", (text, TOTAL, context)).fetchone()[0]
        approved, corrected, again = ask("tell me the amount total"), ask("tell me the order count"), ask("the count")
        conn.execute("INSERT INTO pgsynapse.sql_corrections (question_id, approved) VALUES (%s, true)", (approved,))
        conn.execute("INSERT INTO pgsynapse.sql_corrections (question_id, corrected_sql) VALUES (%s, %s), (%s, %s)",
                     (corrected, COUNT, again, LARGEST))
        edit = "UPDATE pgsynapse.data_questions SET text = text || ' please' WHERE id = %s"
        answer = "UPDATE pgsynapse.data_questions SET status = 'answered', sql = %s WHERE id = %s"
        for question in (approved, corrected, again):
            conn.execute(edit, (question,))
            conn.execute(answer, (LARGEST, question))  # the worker answers the edited question
        conn.execute("INSERT INTO pgsynapse.sql_corrections (question_id, corrected_sql) VALUES (%s, %s)",
                     (again, COUNT))  # corrected again, as it is now
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        assert [(p.question, p.sql) for p in load_pairs(conn, "pgsynapse_reader")] == [
            ("the count please", COUNT)]
        assert conn.execute(q("new_sql_corrections", "textsql_models.sql")).fetchone()["n"] == 1
        assert conn.execute(q("sql_corrections_count", "textsql_models.sql")).fetchone()["n"] == 1


def test_the_trainer_is_given_a_url_with_the_settings_keepalives(db_url, tmp_path):
    """The trainer process was given the bare URL: its connection had no TCP keepalives (a cut network held it for
    the kernel's hours), unlike the worker's; the URL it is given carries the settings' now."""
    handler = SqlRetrainHandler(_settings(db_url, tmp_path, "unused", keepalives_idle_seconds=7))
    work = SqlRetrainWork(Job(1, "sql_retrain", 0, {}, 1, dt.datetime.now(dt.timezone.utc)), None, None, 0, True)
    spec = handler.spec(work, tmp_path / "out")
    with psycopg.connect(spec.url, autocommit=True, prepare_threshold=None) as conn:  # as the trainer connects
        params = conn.info.get_parameters()
    assert (params.get("keepalives"), params.get("keepalives_idle")) == ("1", "7"), params


@pytest.mark.anyio
async def test_a_sql_retrain_registration_waiting_for_the_registry_lock_says_so(db_url, tmp_path):
    """The SQL retrain's write takes the SQL model registry's table lock to register its model, and so waits for
    every transaction holding the table (a `sql-model promote` left open in psql): it waited without a word, as
    the registry commands did before they logged registry_lock_waiting. The real write, on a forced outcome."""
    handler = SqlRetrainHandler(fast_settings(db_url, data_dir=tmp_path))
    now = dt.datetime.now(dt.UTC)
    gate = {"passed": False, "candidate": None, "active": None, "delta": None, "heldout": 0, "reasons": ["test"]}
    outcome = Outcome(Job(1, "sql_retrain", 0, {}, 1, now, now), result={
        "metrics": {"gate": gate, "max_correction_id": 0}, "path": str(tmp_path / "model"), "runtime": "transformers",
        "base": None, "force": True})
    conn = await aconn(db_url)
    written: list[list[int]] = []

    async def register() -> None:
        async with conn.transaction():
            written.append((await handler.write(conn, [outcome])).written)

    with psycopg.connect(db_url) as holder, logs_until("registry_lock_waiting") as (logs, logged):
        holder.execute("LOCK TABLE pgsynapse.sql_models IN SHARE ROW EXCLUSIVE MODE")  # in its transaction
        async with anyio.create_task_group() as tg:
            tg.start_soon(register)
            said = await anyio.to_thread.run_sync(logged, 60)  # the log event ends the wait
            assert said["table"] == "pgsynapse.sql_models", said
            assert holder.info.backend_pid in [h["pid"] for h in said["holders"]], said
            holder.commit()  # the registration goes on
    assert written == [[1]]
    row = await (await conn.execute("SELECT status FROM pgsynapse.sql_models ORDER BY id DESC LIMIT 1")).fetchone()
    assert row["status"] == "candidate"  # forced: registered though its gate did not pass
    await conn.close()


class PastTheCheck:
    """A statement as if the parser check had let it through."""

    def __init__(self, sql: str, **_: object) -> None:
        self.sql = sql


def test_the_retrain_runs_statements_on_the_readers_own_login(db_url, tmp_path, monkeypatch):
    """The retrain runs each correction (and each model's statement at the gate) as a question's statement runs: on
    the reader role's own login (textsql/reader.py), where one past the parser check cannot become the worker. It ran
    them on the trainer's own connection (SET LOCAL ROLE), where such a correction ran as the worker and trained."""
    context = _setup_table(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        qid = conn.execute("INSERT INTO pgsynapse.data_questions (text, status, sql, schema_context) VALUES"
                           " ('tell me the order count', 'answered', %s, %s) RETURNING id", (TOTAL, context)
                           ).fetchone()[0]
        conn.execute("INSERT INTO pgsynapse.sql_corrections (question_id, corrected_sql) VALUES (%s, %s)",
                     (qid, "SELECT pg_catalog.set_config('role', 'pgsynapse_worker', true)"))
    embedded = load_settings(environ={})  # no database_url: the embedded server's settings
    reader.prepare_at_start(db_url, embedded)  # the reader's own login, as a worker there makes it
    monkeypatch.setattr(training_pairs, "check_sql", PastTheCheck)
    spec = train.SqlTrainSpec(url=db_url, out_dir=str(tmp_path), base_path="unused", active_runtime="transformers",
                              active_path="unused", settings={"sql_reader_url": reader.reader_url(db_url, embedded)})
    try:
        with pytest.raises(SystemExit, match=r"no usable training pair .*'target_failed': 1"):
            train.main(spec)
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:  # roles are cluster-wide
            conn.execute("ALTER ROLE pgsynapse_reader NOLOGIN")
