"""Second-stage rankers (issue 20): a cross-encoder orders the vector candidates of answers and `search`; it is a
model in its own registry (routed by session, promoted, rolled back); `pgsynapse ranker train` trains one from the
feedback and corpus pairs, gates it and registers it. Tiny random models: these tests check that the ranker's
order is the one served and what the registry does, not how well a random ranker ranks (bench/ranker.py does)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from structlog.testing import capture_logs
from psycopg.rows import dict_row
from transformers import BertForSequenceClassification

from pgsynapse.cli import main
from pgsynapse.errors import ConfigError, InputError, ModelError, RegistryError
from pgsynapse.learning.abreport import ab_report
from pgsynapse.learning.abreport import render as render_ab
from pgsynapse.learning.registry import add_model, reject, retire
from pgsynapse.learning.trainer_process import TrainingFailed
from pgsynapse.ranking.cli import render_trained, run_ranker_command
from pgsynapse.ranking.export import export_onnx, spearman
from pgsynapse.ranking.learn import ranker_spec, train_ranker
from pgsynapse.ranking.registry import REGISTRY
from pgsynapse.ranking.rescore import check_teacher, teacher_path
from pgsynapse.ranking.scorer import Ranker, passage_text, rerank
from pgsynapse.ranking.train import TeacherOrder, load_data
from pgsynapse.search import search
from pgsynapse.status import render, snapshot
from tests.embed_models import tiny_cross_encoder, tiny_embedding_model
from tests.helpers import aconn, connections_opened, fast_settings, insert_docs, running_worker, wait_until

pytestmark = pytest.mark.anyio

TOPICS = ["savepoints", "vacuum", "indexes", "roles", "sequences", "views", "triggers", "schemas"]
DOCS = [(f"{t.title()} {i}", f"{t.title()} are described on page {i}. The {t} page {i} explains {t} in PostgreSQL.")
        for t in TOPICS for i in range(5)]
QUESTION = "how do savepoints work in a transaction?"


@pytest.fixture(scope="module")
def ranker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tiny_cross_encoder(tmp_path_factory.mktemp("rankers") / "tiny-ce")
    export_onnx(path)  # model.onnx and model_int8.onnx beside the weights: the default runtime
    return path


async def _ask(conn) -> dict:
    """INSERT the question, wait for its answer (the row leaves pending), return the row."""
    q = await (await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (%s) RETURNING id",
                                  (QUESTION,))).fetchone()
    await wait_until(conn, "SELECT status <> 'pending' FROM pgsynapse.questions WHERE id = %s", (q["id"],),
                     channel="pgsynapse_answers")
    return await (await conn.execute("SELECT id, status, sources, cached_from, ranker_id FROM pgsynapse.questions"
                                     " WHERE id = %s", (q["id"],))).fetchone()


async def _examples_per_page(conn) -> None:
    """Feedback as its trigger leaves it: for every page, its title as the question and its first passage as the
    one that answered it."""
    await conn.execute(
        "INSERT INTO pgsynapse.training_examples (query, positive_chunk_id)"
        " SELECT lower(d.title), min(c.id) FROM pgsynapse.documents d"
        " JOIN pgsynapse.chunks c ON c.document_id = d.id GROUP BY d.id, d.title")


async def _embedded(db_url: str, models) -> None:
    insert_docs(db_url, DOCS)
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status <> 'embedded'")
    await conn.close()


def test_int8_ranker_scores_follow_the_weights(ranker_dir):
    row = {"id": 1, "name": "tiny", "path": str(ranker_dir)}
    int8, fp32 = Ranker({**row, "runtime": "onnx-int8"}), Ranker({**row, "runtime": "torch"})
    passages = [passage_text(t, b) for t, b in DOCS[:12]]
    a, b = int8.score(QUESTION, passages), fp32.score(QUESTION, passages)
    assert a.shape == (12,) and np.isfinite(a).all()
    assert spearman(a, b) > 0.8
    # the question is never cut: a passage far over max_length still scores, and the same as its first part does
    long = "savepoints " * 2000
    assert np.isfinite(int8.score(QUESTION, [long])).all()


async def test_the_ranker_orders_the_candidates_of_answers_and_search(db_url, models, ranker_dir, tmp_path):
    await _embedded(db_url, models)
    settings = fast_settings(db_url, kinds=("answer",), data_dir=tmp_path, rank_candidates=20, answer_top_k=5,
                             answer_cache=False, not_found_threshold=-1)  # always an answer, with its citations
    conn = await aconn(db_url)
    vector = await search(conn, models, QUESTION, k=20, hybrid=False)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        row = REGISTRY.add_model(sync, "tiny", str(ranker_dir), "onnx-int8", status="active")
    ranker = Ranker(row)
    expected = rerank(ranker, QUESTION, vector, lambda h: passage_text(h.title, h.text), lambda h: h.score)
    assert [h.chunk_id for h in expected[:5]] != [h.chunk_id for h in vector[:5]]  # it does change the order

    ranked = await search(conn, models, QUESTION, k=5, ranker=ranker, candidates=20)
    assert [h.chunk_id for h in ranked] == [h.chunk_id for h in expected[:5]]
    assert [h.score for h in ranked] == [h.score for h in expected[:5]]  # scores stay the cosine similarities

    async with running_worker(settings, models):
        answered = await _ask(conn)
    assert answered["status"] == "answered" and answered["ranker_id"] == row["id"]
    assert answered["sources"], answered
    for src in answered["sources"]:  # each cited passage sits at its rank in the ranker's order
        assert expected[src["rank"] - 1].chunk_id == src["chunk_id"], (src, [h.chunk_id for h in expected[:5]])

    # rolled back (no ranker active): the vector order serves again, and the row says so
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        assert REGISTRY.rollback(sync) == {"active": None, "previous": row["id"]}
    async with running_worker(settings, models):
        plain = await _ask(conn)
    assert plain["ranker_id"] is None
    for src in plain["sources"]:
        assert vector[src["rank"] - 1].chunk_id == src["chunk_id"]
    await conn.close()


async def test_a_broken_ranker_leaves_the_vector_order_and_says_so(db_url, models, tmp_path):
    await _embedded(db_url, models)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no weights, no graph
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        REGISTRY.add_model(sync, "broken", str(broken), "onnx-int8", status="active")
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url, kinds=("answer",), answer_cache=False), models):
        row = await _ask(conn)
    assert (row["status"], row["ranker_id"]) == ("answered", None)
    await conn.close()


def test_ranker_registry_routes_sessions_and_refuses(db_url, ranker_dir):
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        assert REGISTRY.routable_models(conn) == []
        assert REGISTRY.choose([], "s1") is None  # no ranker: the vector order
        a = REGISTRY.add_model(conn, "a", str(ranker_dir), "onnx-int8", traffic=25)
        rows = REGISTRY.routable_models(conn)
        routed = [REGISTRY.choose(rows, f"ranker:s{i}") for i in range(400)]
        share = sum(r is not None for r in routed)
        assert 60 <= share <= 140 and all(r is None or r["id"] == a["id"] for r in routed)
        with pytest.raises(RegistryError, match="unknown ranker runtime"):
            REGISTRY.add_model(conn, "x", "/x", "transformers")
        with pytest.raises(RegistryError, match="no ranker 999"):
            REGISTRY.promote(conn, 999)
        assert REGISTRY.promote(conn, a["id"]) == {"active": a["id"], "previous": None}
        with pytest.raises(RegistryError, match="is active"):
            REGISTRY.retire(conn, a["id"])
        # the active ranker serves what the candidates leave it: `ranker list` and `status` said 100 % beside them
        other = shutil.copytree(ranker_dir, ranker_dir.parent / "other-ce", dirs_exist_ok=True)
        b = REGISTRY.add_model(conn, "b", str(other), "onnx-int8", traffic=30)
        snap = snapshot(conn)
    assert [(r["id"], r["traffic_percent"]) for r in snap["rankers"]] == [(a["id"], 70.0), (b["id"], 30.0)]
    assert f"ranker {a['id']:<8}: active a (onnx-int8), 70% of sessions" in render(snap)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_ranker_command(argparse.Namespace(ranker_command="list", json=False), fast_settings(db_url))
    assert f"{a['id']:>3}  active     70.00%  onnx-int8 a" in out.getvalue(), out.getvalue()


def test_ranker_add_refuses_what_it_could_not_load_and_stores_an_absolute_path(db_url, ranker_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    settings = fast_settings(db_url)

    def add(path: str, runtime: str = "onnx-int8") -> int:
        return run_ranker_command(argparse.Namespace(ranker_command="add", path=path, name=None, runtime=runtime,
                                                     activate=False), settings)

    with pytest.raises(ModelError, match="path does not exist: /no/such/ranker"):
        add("/no/such/ranker")
    weights_only = tmp_path / "weights-only"
    shutil.copytree(ranker_dir, weights_only, ignore=shutil.ignore_patterns("*.onnx"))
    with pytest.raises(ModelError, match="no model_int8.onnx in .* for runtime onnx-int8: add it with --runtime torch"):
        add(str(weights_only))
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        assert REGISTRY.list_models(conn) == []
    monkeypatch.chdir(tmp_path)  # a path relative to this shell: the worker runs elsewhere
    assert add("weights-only", runtime="torch") == 0
    assert "ranker 1 (torch): candidate" in capsys.readouterr().out
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        assert [(r["name"], r["path"]) for r in REGISTRY.list_models(conn)] == [("weights-only", str(weights_only))]


def test_ranker_add_refuses_a_model_that_is_not_a_one_logit_cross_encoder(db_url, ranker_dir, tmp_path):
    """What `ranker add --runtime torch` would otherwise register and serve: an embedding model (transformers gives
    it a random classification head, which orders the candidates at random, silently), a config of no model, a
    classifier of two labels, or the same ranker a second time."""
    settings = fast_settings(db_url)

    def add(path: Path | str) -> int:
        return run_ranker_command(argparse.Namespace(ranker_command="add", path=str(path), name=None,
                                                     runtime="torch", activate=False), settings)

    embedder = tiny_embedding_model(tmp_path / "embedder", 32)
    with pytest.raises(ModelError, match=r"has no trained classification head .*classifier.*: is it a cross-encoder"):
        add(embedder)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text('{"x": 1}')
    with pytest.raises(ModelError, match=r"ranker: cannot load .*junk as a cross-encoder \(torch\): .*model_type"):
        add(junk)
    two = tmp_path / "two-labels"
    shutil.copytree(ranker_dir, two, ignore=shutil.ignore_patterns("*.onnx"))
    BertForSequenceClassification.from_pretrained(str(two), num_labels=2, ignore_mismatched_sizes=True
                                                  ).save_pretrained(str(two))
    with pytest.raises(ModelError, match="gives 2 scores per pair: a ranker gives one"):
        add(two)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        assert REGISTRY.list_models(conn) == []
    assert add(ranker_dir) == 0
    with pytest.raises(RegistryError, match=r"is already ranker 1 \(candidate\): retire it first to add it again"):
        add(str(ranker_dir) + "/")
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        assert [r["id"] for r in REGISTRY.list_models(conn)] == [1]
        REGISTRY.add_model(conn, "junk", str(junk), "torch")  # registered behind the command's back
    with pytest.raises(ModelError, match="ranker 2: cannot load"):
        Ranker({"id": 2, "name": "junk", "path": str(junk), "runtime": "torch"})


async def test_ranker_train_registers_a_gated_candidate(db_url, models, ranker_dir, tmp_path, capsys):
    await _embedded(db_url, models)
    conn = await aconn(db_url)
    # feedback as its trigger leaves it: a question and the passage that answered it, for every page (questions
    # on one topic are alike: the grouped hold-out takes whole topics)
    await _examples_per_page(conn)
    await conn.close()
    settings = fast_settings(db_url, data_dir=tmp_path, ranker_budget_seconds=120, ranker_synthetic_pairs=10,
                             rank_candidates=10, ranker_negatives=3, ranker_max_length=64, ranker_layers=1,
                             retrain_gate_confidence=0.9, retrain_bootstrap_samples=500, retrain_canary_tolerance=0.1,
                             torch_threads=1)
    # the tiny random weights stand in for MiniLM's: the spec's base_path is what a ranker starts from
    row = train_ranker(settings, force=True, base_path=str(ranker_dir), canary_size=0)
    assert row["status"] == "candidate" and row["runtime"] in ("onnx-int8", "torch")
    # the retrain's gate, settings and all (they were left at their defaults)
    assert (row["gate"]["confidence"], row["gate"]["samples"], row["gate"]["tolerance"]) == (0.9, 500, 0.1)
    m = row["metrics"]
    assert m["steps"] > 0 and m["heldout"] > 0 and m["baseline"] == "vector order"
    assert 0 <= m["candidate"]["mrr@10"] <= 1 and m["gate"]["reasons"]
    assert float(row["traffic_percent"]) == (settings.ranker_traffic_percent if m["gate"]["passed"] else 0)
    saved = json.loads((Path(row["path"]) / "pgsynapse_ranker.json").read_text())
    assert saved["max_length"] == 64 and saved["candidates"] == 10
    assert saved["layers"] == 1 and json.loads((Path(row["path"]) / "config.json").read_text())["num_hidden_layers"] == 1
    assert Ranker(row).score(QUESTION, ["a passage"]).shape == (1,)

    # the CLI's commands: list it, promote it, roll back to none
    def command(action: str, **kw) -> str:
        assert run_ranker_command(argparse.Namespace(ranker_command=action, **kw), settings) == 0
        return capsys.readouterr().out

    assert f"{row['id']:>3}  candidate" in command("list", json=False)
    assert f"ranker {row['id']} is active" in command("promote", model=row["id"])
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        snap = snapshot(conn)
    assert [(r["id"], r["status"]) for r in snap["rankers"]] == [(row["id"], "active")]
    assert f"ranker {row['id']:<8}: active" in render(snap)
    assert "the vector order serves again" in command("rollback")


def same_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on every run is named in the same second (the trainers' folders are named by the second)."""
    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *t: "20260102-030405" if fmt == "%Y%m%d-%H%M%S" else real(fmt, *t))


async def test_two_rankers_trained_in_the_same_second_get_a_folder_each(db_url, models, ranker_dir, tmp_path,
                                                                        monkeypatch):
    """`ranker train` named its folder by the second: a second run (a retry, a script) of the same second trained
    into the first one's folder, over its weights, and registered a second ranker with the same path. The first run
    here is what it leaves for the second to meet: its folder, weights in it, and its registration (one training
    is enough: the second run's choice of folder is what is tested, and it looks at the folder alone)."""
    await _embedded(db_url, models)
    conn = await aconn(db_url)
    await _examples_per_page(conn)
    await conn.close()
    settings = fast_settings(db_url, data_dir=tmp_path, ranker_budget_seconds=120, ranker_synthetic_pairs=10,
                             rank_candidates=10, ranker_negatives=3, ranker_max_length=64, ranker_layers=1,
                             torch_threads=1)
    same_second(monkeypatch)
    first_path = tmp_path / "models" / "ranker-20260102-030405"  # the first run's output: a ranker's files
    shutil.copytree(ranker_dir, first_path)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        first = REGISTRY.add_model(sync, first_path.name, str(first_path), "torch", status="candidate")
    weights = {p.name: p.read_bytes() for p in first_path.iterdir() if p.is_file()}
    second = train_ranker(settings, force=True, base_path=str(ranker_dir), canary_size=0, export=False, seed=1)
    assert Path(first["path"]).name == "ranker-20260102-030405"
    assert Path(second["path"]).name == "ranker-20260102-030405-2", (first["path"], second["path"])
    assert {p.name: p.read_bytes() for p in first_path.iterdir() if p.is_file()} == weights
    assert (first["name"], second["name"]) == ("ranker-20260102-030405", "ranker-20260102-030405-2")
    assert (Path(second["path"]) / "metrics.json").is_file()  # trained into its own folder


async def test_ranker_train_registers_with_the_share_left_when_traffic_changed_while_it_trained(
        db_url, models, ranker_dir, tmp_path):
    """`ranker train` read the other candidates' share before `add_model` took the registry's lock: a `ranker traffic`
    committed in between made the registration raise once training had finished ("the candidates' traffic would add
    up to 105 %"), the trained ranker lost. The share is now taken under the lock: what is left, said so."""
    await _embedded(db_url, models)
    conn = await aconn(db_url)
    await _examples_per_page(conn)
    # the gate off (margin -1): the ranker passes and asks for ranker_traffic_percent (10 %)
    settings = fast_settings(db_url, data_dir=tmp_path, ranker_budget_seconds=120, ranker_synthetic_pairs=10,
                             rank_candidates=10, ranker_negatives=3, ranker_max_length=64, ranker_layers=1,
                             ranker_margin=-1, torch_threads=1)
    other = tmp_path / "other-ce"
    shutil.copytree(ranker_dir, other)
    rival = psycopg.connect(db_url, row_factory=dict_row)  # a person's `ranker traffic`, in one transaction
    r = REGISTRY.add_model(rival, "other", str(other), "onnx-int8")
    rival.commit()
    rival.execute(REGISTRY.sql("lock_models"))  # held while the ranker trains: its registration waits on it
    with ThreadPoolExecutor(1) as pool:
        # not exported (export=False): the share it registers with is the question, not its runtime
        training = pool.submit(train_ranker, settings, base_path=str(ranker_dir), canary_size=0, export=False)
        await wait_until(conn, "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database()"
                         " AND wait_event_type = 'Lock' AND query LIKE '%%LOCK TABLE pgsynapse.ranker_models%%'")
        rival.execute(REGISTRY.sql("set_model_traffic"), {"id": r["id"], "traffic": 95})
        rival.commit()
        row = await anyio.to_thread.run_sync(training.result)
    rival.close()
    await conn.close()
    assert row["status"] == "candidate" and row["gate"]["passed"]
    assert float(row["traffic_percent"]) == 5.0 and row["traffic_asked"] == settings.ranker_traffic_percent
    assert "traffic: 5% of sessions, not 10%: the other candidates hold the rest" in render_trained(row)
    assert row["gate"]["reasons"][-1].startswith("ranker_margin = -1: the gate is off")


def test_ranker_train_without_feedback_refuses_before_training(db_url, tmp_path):
    """With no feedback, `ranker train` trained and exported for minutes, then registered a ranker its gate could only
    reject ("no grouped hold-out"), its weights kept; `retrain` refuses at once, and so does it now, --force or not."""
    settings = fast_settings(db_url, data_dir=tmp_path)
    with pytest.raises(InputError, match=r"^no feedback to learn from: .*; nothing was trained"):
        run_ranker_command(argparse.Namespace(ranker_command="train", force=True), settings)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        assert REGISTRY.list_models(conn) == []
    assert not (tmp_path / "models").exists()


async def test_ranker_train_and_its_trainer_connect_as_the_worker_does(db_url, models, tmp_path, monkeypatch):
    """`ranker train` opened its connections with psycopg's defaults: statements prepared on the server after 5 runs
    (which fails behind PgBouncer in transaction mode, docs/scaling.md) and no TCP keepalives (a cut network held it
    for the kernel's hours); its trainer process had no keepalives either. Both connect as db.py's helpers do now,
    with the settings' keepalives."""
    await _embedded(db_url, models)
    settings = fast_settings(db_url, data_dir=tmp_path, keepalives_idle_seconds=7)
    opened = connections_opened(monkeypatch)
    with pytest.raises(InputError, match="no feedback to learn from"):  # its first connection, then refused
        train_ranker(settings)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        spec = ranker_spec(settings, conn, db_url, tmp_path / "out", canary_size=0)
    del opened[-1]  # the test's own
    load_data(spec)  # what the trainer process does first, with the spec it is given
    assert len(opened) == 2, opened
    for prepare_threshold, params in opened:
        assert prepare_threshold is None and (params.get("keepalives"), params.get("keepalives_idle")) == ("1", "7"), \
            (prepare_threshold, params)


async def test_a_trainer_that_fails_says_why_in_a_line_and_logs_its_traceback(db_url, models, ranker_dir, tmp_path):
    """A trainer that failed was reported by its traceback's last lines, squeezed into one ("training process exited
    with 1: File ".../transformers/...", line 1234, in ..."): on the CLI and the job row. The common failures are
    said plainly now, with what to do; the traceback is in the log."""
    await _embedded(db_url, models)
    conn = await aconn(db_url)
    await _examples_per_page(conn)
    await conn.close()
    settings = fast_settings(db_url, data_dir=tmp_path, ranker_synthetic_pairs=10, rank_candidates=10,
                             ranker_negatives=3, ranker_max_length=64, ranker_layers=1,
                             torch_threads=1)
    weightless = tmp_path / "weightless"  # a model directory whose weights and tokenizer were lost
    weightless.mkdir()
    shutil.copy(ranker_dir / "config.json", weightless)
    with capture_logs() as logs, pytest.raises(TrainingFailed) as failed:
        train_ranker(settings, force=True, base_path=str(weightless), canary_size=0)
    message = str(failed.value)
    assert message.startswith("training failed: missing or unreadable model files: ") and str(weightless) in message, \
        message
    assert "restore the model directory" in message and 'File "' not in message and not failed.value.retry, message
    [logged] = [e for e in logs if e["event"] == "training_process_failed"]
    assert logged["log_level"] == "error" and "Traceback (most recent call last)" in logged["stderr"], logged
    assert list((tmp_path / "models").iterdir()) == []  # the run's folder, empty, is not left behind


async def test_ranker_layers_above_the_bases_are_refused_before_training(db_url, models, ranker_dir, tmp_path):
    """ranker_layers above the base model's layers failed the trainer once it had loaded everything, saying "a
    student keeps between 1 and 2 layers of its 2, not 9" (the distiller's words: no setting named)."""
    await _embedded(db_url, models)
    conn = await aconn(db_url)
    await _examples_per_page(conn)
    await conn.close()
    settings = fast_settings(db_url, data_dir=tmp_path, ranker_layers=9)
    with pytest.raises(ConfigError, match=rf"^ranker_layers = 9: the ranker starts from {ranker_dir}, which has 2 "
                                          r"transformer layers: set it to 1 to 2, or 0 \(all of them\)$"):
        train_ranker(settings, base_path=str(ranker_dir))
    assert not (tmp_path / "models").exists()  # no training process was started


async def test_ranker_train_refuses_at_once_an_active_ranker_it_cannot_load(db_url, models, tmp_path):
    """The gate compares a new ranker with the active one: with its files gone the trainer failed once it had loaded
    everything, and its traceback's last lines were the message ("training process exited with 1: File ...")."""
    await _embedded(db_url, models)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("INSERT INTO pgsynapse.training_examples (query, positive_chunk_id)"
                     " SELECT 'how do savepoints work?', min(id) FROM pgsynapse.chunks")
        gone = REGISTRY.add_model(conn, "gone", str(tmp_path / "gone"), "torch", status="active")
    settings = fast_settings(db_url, data_dir=tmp_path)
    with pytest.raises(ModelError, match=rf"^active ranker {gone['id']}: path does not exist: .*gone: the gate compares "
                                         r"a new ranker with the active one: restore its files, or `pgsynapse ranker "
                                         r"rollback` first$"):
        run_ranker_command(argparse.Namespace(ranker_command="train", force=False), settings)
    assert not (tmp_path / "models").exists()  # no training process was started


async def test_the_answer_cache_serves_an_answer_only_to_sessions_of_its_ranker(db_url, models, ranker_dir, tmp_path):
    await _embedded(db_url, models)
    settings = fast_settings(db_url, kinds=("answer",), data_dir=tmp_path, answer_cache=True, not_found_threshold=-1)
    conn = await aconn(db_url)

    async with running_worker(settings, models):
        plain = await _ask(conn)
        assert (plain["cached_from"], plain["ranker_id"]) == (None, None)
        assert (await _ask(conn))["cached_from"] == plain["id"]  # the vector order's answer, served again
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
            ranker = REGISTRY.add_model(sync, "tiny", str(ranker_dir), "onnx-int8", status="active")
        ranked = await _ask(conn)  # another order of passages: not the vector order's answer
        assert (ranked["cached_from"], ranked["ranker_id"]) == (None, ranker["id"])
        again = await _ask(conn)
        assert (again["cached_from"], again["ranker_id"]) == (ranked["id"], ranker["id"])
    await conn.close()


def test_ab_report_compares_the_rankers_helpful_rates(db_url, ranker_dir):
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        assert ab_report(conn)["rankers"] == []  # no ranker registered: no ranker table
        r1 = REGISTRY.add_model(conn, "tiny", str(ranker_dir), "onnx-int8", traffic=50)
        # 40 answers in the vector order (20 helpful) and 40 by the ranker (36 helpful), one verdict each; a second
        # click on a question replaces its first (the latest counts)
        for ranker, helpful in ((None, 20), (r1["id"], 36)):
            ids = [r["id"] for r in conn.execute(
                "INSERT INTO pgsynapse.questions (text, status, model_version_id, ranker_id, latency_ms)"
                " SELECT 'q' || g, 'answered', (SELECT id FROM pgsynapse.model_versions WHERE status = 'active'),"
                " %s, 100 FROM generate_series(1, 40) g RETURNING id", (ranker,)).fetchall()]
            for n, qid in enumerate(ids):
                conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, false)", (qid,))
                conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, %s)",
                             (qid, n < helpful))
        # a question the vector order answered, found helpful, then asked again and answered by the ranker: that
        # verdict was on the earlier answer, and counts for neither
        [qid] = conn.execute("INSERT INTO pgsynapse.questions (text, status, model_version_id, latency_ms)"
                             " SELECT 'q', 'answered', id, 100 FROM pgsynapse.model_versions WHERE status = 'active'"
                             " RETURNING id").fetchone().values()
        conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, true)", (qid,))
        conn.execute("UPDATE pgsynapse.questions SET text = 'q again' WHERE id = %s", (qid,))
        conn.execute("UPDATE pgsynapse.questions SET status = 'answered', latency_ms = 100, ranker_id = %s,"
                     " model_version_id = (SELECT id FROM pgsynapse.model_versions WHERE status = 'active')"
                     " WHERE id = %s", (r1["id"], qid))
        report = ab_report(conn)
    rows = {r["ranker"]: r for r in report["rankers"]}
    assert (rows[None]["status"], rows[None]["traffic_percent"], rows[None]["rated"], rows[None]["helpful"]) == (
        "active", 50.0, 40, 20)
    assert (rows[r1["id"]]["status"], rows[r1["id"]]["questions"], rows[r1["id"]]["rated"],
            rows[r1["id"]]["helpful"]) == ("candidate", 41, 40, 36)
    [c] = report["ranker_comparisons"]
    assert c["ranker"] == r1["id"] and c["against"] is None and c["significant"] and c["better"]
    text = render_ab(report)
    assert "rankers (the vector order" in text and f"ranker {r1['id']} vs active vector order" in text



def test_ab_report_shows_the_share_the_active_version_and_ranker_serve(db_url, ranker_dir):
    """The active version and the active ranker serve what their routed candidates leave them: `ab-report` said
    100 % beside a candidate at 20 % (their rows' figure, as `status` and `ranker list` once did), and the vector
    order, once a ranker was active and the order had answered questions, -30 %."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        v2 = conn.execute("INSERT INTO pgsynapse.model_versions (name, dim, status, traffic_percent, backfilled_at)"
                          " VALUES ('v2', 384, 'candidate', 20, now()) RETURNING id").fetchone()["id"]
        conn.execute("INSERT INTO pgsynapse.questions (text, status, model_version_id, latency_ms)"
                     " SELECT 'q', 'answered', id, 100 FROM pgsynapse.model_versions WHERE status = 'active'")
        a = REGISTRY.add_model(conn, "a", str(ranker_dir), "onnx-int8", status="active")
        other = shutil.copytree(ranker_dir, ranker_dir.parent / "other-ce", dirs_exist_ok=True)
        b = REGISTRY.add_model(conn, "b", str(other), "onnx-int8", traffic=30)
        report = ab_report(conn)
    versions = {r["version"]: r["traffic_percent"] for r in report["versions"]}
    assert versions == {1: 80.0, v2: 20.0}, versions
    rankers = {r["ranker"]: (r["status"], r["traffic_percent"]) for r in report["rankers"]}
    assert rankers == {None: ("none", 0.0), a["id"]: ("active", 70.0), b["id"]: ("candidate", 30.0)}, rankers
    text = render_ab(report)
    assert "v1      active        80.0%" in text, text


def test_a_version_that_rescores_as_a_ranker_is_not_retired_under_it(db_url, ranker_dir, tmp_path):
    """Retiring the version a `version:N` ranker rescores with dropped the vectors under it, and such a ranker could
    then be promoted: `pgsynapse search` failed on every call ("model version 2 is retired: it cannot rescore")."""
    settings = fast_settings(db_url)

    def ranker(action: str, model: int, percent: float | None = None) -> int:
        return run_ranker_command(argparse.Namespace(ranker_command=action, model=model, percent=percent), settings)

    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        v2, v3 = (add_model(conn, tiny_embedding_model(tmp_path / f"m{i}", 32, seed=i), serving_runtime="torch")["id"]
                  for i in (2, 3))
        conn.execute("UPDATE pgsynapse.model_versions SET backfilled_at = now() WHERE id IN (%s, %s)", (v2, v3))
        with pytest.raises(RegistryError, match=r"^ranker add: 'version:x' names no model version: write version:N, "
                                                 r"N a version of `pgsynapse model list`$"):  # was "ranker new: ..."
            check_teacher(conn, "version:x")
        r1 = REGISTRY.add_model(conn, "teacher", teacher_path(v2), "version")["id"]
        with pytest.raises(RegistryError, match=f"model version {v2} rescores the candidates as ranker {r1} "
                                                f"\\(candidate\\): retire that ranker first "
                                                f"\\(pgsynapse ranker retire {r1}\\)"):
            retire(conn, v2)
        REGISTRY.retire(conn, r1)
        retire(conn, v2)  # its ranker retired first: nothing rescores with it any more
        r2 = REGISTRY.add_model(conn, "teacher-3", teacher_path(v3), "version")["id"]
        reject(conn, v3, reason="its A/B test")  # the worker's automatic rollback: its vectors stay until retired
        with pytest.raises(RegistryError, match=f"model version {v3} is rejected: it cannot rescore"):
            ranker("promote", r2)
        with pytest.raises(RegistryError, match=f"model version {v3} is rejected: it cannot rescore"):
            ranker("traffic", r2, 10)
        assert REGISTRY.get_model(conn, r2)["status"] == "candidate"
        # one replaced by a promotion is retired, so its version may go; a rollback to it is refused then
        v4 = add_model(conn, tiny_embedding_model(tmp_path / "m4", 32, seed=4), serving_runtime="torch")["id"]
        conn.execute("UPDATE pgsynapse.model_versions SET backfilled_at = now() WHERE id = %s", (v4,))
        r3 = REGISTRY.add_model(conn, "teacher-4", teacher_path(v4), "version", status="active")["id"]
        REGISTRY.add_model(conn, "cross-encoder", str(ranker_dir), "onnx-int8", status="active")
        assert REGISTRY.get_model(conn, r3)["status"] == "retired"
        retire(conn, v4)
        with pytest.raises(RegistryError, match=f"model version {v4} is retired: it cannot rescore"):
            ranker("rollback", None)


async def test_the_version_serving_the_first_stage_is_not_its_own_ranker(db_url, models, tmp_path):
    """`ranker add version:1 --activate`, version 1 the active model version, was accepted ("ranker 1 (version):
    active"): the version that found the candidates rescored them with its own vectors, which undid the hybrid
    search's full-text share and gained nothing. Refused at add, promote and traffic; a ranker whose version is
    promoted later leaves the first stage's order as it is."""
    await _embedded(db_url, models)
    settings = fast_settings(db_url)

    def ranker(action: str, **args) -> int:
        return run_ranker_command(argparse.Namespace(ranker_command=action, **args), settings)

    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        v1 = sync.execute("SELECT id FROM pgsynapse.model_versions WHERE status = 'active'").fetchone()["id"]
        refused = (f"model version {v1} is the active model version: its own vectors found the candidates, so it "
                   "cannot rescore them")
        with pytest.raises(RegistryError, match=refused):
            ranker("add", path=teacher_path(v1), runtime="onnx-int8", name=None, activate=True)
        assert REGISTRY.list_models(sync) == []
        # registered before its version was promoted (as the benchmark's setup does): promote and traffic refuse
        r = REGISTRY.add_model(sync, "self", teacher_path(v1), "version")
        with pytest.raises(RegistryError, match=refused):
            ranker("promote", model=r["id"], percent=None)
        with pytest.raises(RegistryError, match=refused):
            ranker("traffic", model=r["id"], percent=10)
    conn = await aconn(db_url)
    first_stage = await search(conn, models, QUESTION, k=10, candidates=20)
    ranked = await search(conn, models, QUESTION, k=10, ranker=r, candidates=20)
    assert [h.chunk_id for h in ranked] == [h.chunk_id for h in first_stage]
    # active while its version is the first stage (as after `pgsynapse promote N` of a ranker version:N's version):
    # the answers it changed nothing in recorded its ranker_id, and ab-report credited it with them
    with psycopg.connect(db_url, autocommit=True) as sync:
        sync.execute("UPDATE pgsynapse.ranker_models SET status = 'active', traffic_percent = 100 WHERE id = %s",
                     (r["id"],))
    settings = fast_settings(db_url, kinds=("answer",), rank_candidates=20, answer_cache=False, not_found_threshold=-1)
    async with running_worker(settings, models):
        answered = await _ask(conn)
    await conn.close()
    assert answered["status"] == "answered" and answered["sources"], answered
    assert answered["ranker_id"] is None  # the vector order answered it
    # `pgsynapse search` (the active ranker) said "10 hits in the ranker's order" of the same first-stage order
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = await anyio.to_thread.run_sync(main, ["search", QUESTION, "--database-url", db_url])
    assert code == 0 and " hits in the fused (vector and full-text) rank order;" in printed.getvalue(), printed.getvalue()
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        assert [x["ranker"] for x in ab_report(sync)["rankers"] if x["questions"]] == [None]


async def test_a_teacher_version_rescores_the_candidates(db_url, models, ranker_dir, tmp_path):
    await _embedded(db_url, models)
    teacher_dir = tiny_embedding_model(tmp_path / "teacher-48", 48)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        v2 = add_model(sync, teacher_dir, name="teacher", serving_runtime="torch")["id"]
        with pytest.raises(RegistryError, match="still backfilling"):  # it would rescore some chunks only
            check_teacher(sync, teacher_path(v2))
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url, kinds=("backfill",)), models):
        await wait_until(conn, "SELECT backfilled_at IS NOT NULL FROM pgsynapse.model_versions WHERE id = %s", (v2,),
                         channel="pgsynapse_models")
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        check_teacher(sync, teacher_path(v2))
        row = REGISTRY.add_model(sync, "teacher", teacher_path(v2), "version", status="active")
        register_vector(sync)
        vector = await search(conn, models, QUESTION, k=20, hybrid=False)
        # the expected order, computed apart: the teacher's stored vectors of the candidates, in numpy
        stored = {r["chunk_id"]: np.asarray(r["embedding"].to_numpy()) for r in sync.execute(
            "SELECT chunk_id, embedding FROM pgsynapse.embeddings WHERE model_version_id = %s AND chunk_id = ANY(%s)",
            (v2, [h.chunk_id for h in vector]))}
        teacher = models.get(sync.execute("SELECT * FROM pgsynapse.model_versions WHERE id = %s", (v2,)).fetchone())
    qv = teacher.encode([QUESTION])[0]
    expected = sorted(vector, key=lambda h: -float(stored[h.chunk_id] @ qv))
    assert [h.chunk_id for h in expected[:5]] != [h.chunk_id for h in vector[:5]]  # it does change the order

    ranked = await search(conn, models, QUESTION, k=5, ranker=row, candidates=20)
    assert [h.chunk_id for h in ranked] == [h.chunk_id for h in expected[:5]]
    settings = fast_settings(db_url, kinds=("answer",), rank_candidates=20, answer_cache=False, not_found_threshold=-1)
    async with running_worker(settings, models):
        answered = await _ask(conn)
    assert answered["status"] == "answered" and answered["ranker_id"] == row["id"] and answered["sources"]
    for src in answered["sources"]:
        assert expected[src["rank"] - 1].chunk_id == src["chunk_id"]

    # `ranker train` with the teacher active (the setup docs/learning.md recommends) is judged against the teacher's
    # order; its trainer failed once trained ("unknown ranker runtime 'version' of ranker 1"), the training lost
    await _examples_per_page(conn)
    await conn.close()
    settings = fast_settings(db_url, data_dir=tmp_path, ranker_budget_seconds=120, ranker_synthetic_pairs=10,
                             rank_candidates=10, ranker_negatives=3, ranker_max_length=64, ranker_layers=1,
                             torch_threads=1)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        spec = ranker_spec(settings, sync, db_url, tmp_path / "spec")
    # the trainer's baseline orders the candidates as the teacher ranker serves them
    today = TeacherOrder(spec, stored, [h.chunk_id for h in vector]).order(QUESTION, list(range(len(vector))))
    assert [vector[i].chunk_id for i in today] == [h.chunk_id for h in expected]
    # not exported (export=False): the baseline it is judged against is the question, not its runtime
    trained = train_ranker(settings, force=True, base_path=str(ranker_dir), canary_size=0, export=False)
    m = trained["metrics"]
    assert trained["status"] == "candidate" and trained["base_id"] == row["id"]
    assert m["baseline"] == f"ranker {row['id']}" and m["heldout"] > 0 and 0 < m["active"]["mrr@10"] <= 1
