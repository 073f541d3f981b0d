"""`pgsynapse model distill`: a student with fewer layers trained, in its own process, to give the teacher version's
vectors (a projection when the dimensions differ), judged against the teacher on the feedback questions, and
registered as a candidate that the worker backfills; one the gate refuses is not registered."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch
from psycopg.rows import dict_row
from sentence_transformers import SentenceTransformer

from pgsynapse.errors import InputError, ModelError, RegistryError
from pgsynapse.export import export_fp32
from pgsynapse.learning.distill import DistillSpec, distill
from pgsynapse.learning.cli import run_model_command
from pgsynapse.learning.registry import add_model
from pgsynapse.learning.distill_train import build_student, kept_layers, load_data, main, pca_projection, procrustes
from pgsynapse.learning.trainer_process import TrainingFailed
from tests.embed_models import tiny_cross_encoder, tiny_embedding_model
from tests.helpers import aconn, connections_opened, fast_settings, insert_docs, running_worker, wait_until

pytestmark = pytest.mark.anyio

TOPICS = ["savepoints", "vacuum", "indexes", "roles", "sequences", "views", "triggers", "schemas"]
# 40 pages of a sentence or two (one chunk each): more chunks than the student's 32 dimensions, for the PCA
DOCS = [(f"{t.title()} {i}", f"{t.title()} are described on page {i}. The {t} page {i} explains {t} in PostgreSQL.")
        for t in TOPICS for i in range(5)]


@pytest.fixture(scope="module")
def student_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_embedding_model(tmp_path_factory.mktemp("models") / "tiny-4l", 32, layers=4)


async def _corpus_with_feedback(db_url: str, models) -> None:
    insert_docs(db_url, DOCS)
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status <> 'embedded'")
    # feedback as its trigger leaves it: a question and the passage that answered it, one per page
    await conn.execute(
        "INSERT INTO pgsynapse.training_examples (query, positive_chunk_id)"
        " SELECT 'how do ' || lower(d.title) || ' work?', min(c.id) FROM pgsynapse.documents d"
        " JOIN pgsynapse.chunks c ON c.document_id = d.id WHERE d.title LIKE '%% 0' GROUP BY d.id, d.title")
    await conn.execute("INSERT INTO pgsynapse.questions (text, status) VALUES ('what is a schema?', 'answered')")
    await conn.close()


def test_the_pca_projection_keeps_the_teachers_similarities_in_fewer_dimensions():
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 64))  # 64-d vectors of rank 12
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    basis, kept = pca_projection(teacher, 16)
    projected = teacher @ basis.T
    assert basis.shape == (16, 64) and kept > 0.999
    np.testing.assert_allclose(projected @ projected.T, teacher @ teacher.T, atol=1e-4)
    _, kept4 = pca_projection(teacher, 4)
    assert 0.2 < kept4 < 0.99  # fewer dimensions than the rank: some of it is lost, and said


def test_procrustes_finds_the_rotation_between_two_copies_of_a_space():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((100, 8)).astype(np.float32)
    turn, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    r = procrustes(a, a @ turn)
    np.testing.assert_allclose(a @ r, a @ turn, atol=1e-4)
    np.testing.assert_allclose(r @ r.T, np.eye(8), atol=1e-5)  # a rotation: lengths and angles kept


def test_kept_layers_are_evenly_spaced_and_end_with_the_last():
    assert kept_layers(6, 3) == [1, 3, 5]
    assert kept_layers(12, 4) == [2, 5, 8, 11]
    assert kept_layers(6, 6) == list(range(6))
    with pytest.raises(ValueError, match="between 1 and 6"):
        kept_layers(6, 7)


def test_the_trainer_takes_its_data_in_memory_and_moves_the_student_towards_the_teacher(student_base, tmp_path, caplog):
    """What bench/gpu_distill.py runs where no database is reachable: the trainer with ``data`` given, the teacher's
    48-d vectors projected (PCA + Procrustes) onto the student's 32; training more than halves the loss. It calls no
    API its dependencies deprecated (sentence-transformers logs that once per process: its memory is cleared)."""
    logging.Logger.warning_once.cache_clear()
    teacher_path = tiny_embedding_model(tmp_path / "teacher", 48, seed=3)
    teacher = SentenceTransformer(str(teacher_path), device="cpu")
    texts = [body for _, body in DOCS]
    data = {"chunks": [(i + 1, i // 5 + 1, title, body) for i, (title, body) in enumerate(DOCS)],
            "vectors": teacher.encode(texts, normalize_embeddings=True).astype(np.float32),
            "feedback": [(f"how do {TOPICS[0]} work?", 1)], "questions": [], "canary": []}
    spec = DistillSpec(url="", teacher_version=2, teacher_path=str(teacher_path), student_path=str(student_base),
                       out_dir=str(tmp_path / "student"), layers=2, epochs=30, lr=1e-3, batch_size=8,
                       heldout_fraction=0.1, device="cpu", threads=1)  # 1: 20x faster on a loaded 2-core CI
    threads = torch.get_num_threads()
    try:
        metrics = main(spec, data)
    finally:
        torch.set_num_threads(threads)  # main() sets the trainer process's own: not the rest of this test session's
    assert metrics["device"] == "cpu" and metrics["steps"] == metrics["planned_steps"] == 30 * 5
    assert metrics["teacher_projection"]["kind"] == "pca" and metrics["dim"] == 32
    assert metrics["final_loss"] < metrics["first_loss"] / 2
    assert SentenceTransformer(spec.out_dir, device="cpu").encode(["vacuum"]).shape == (1, 32)
    assert "deprecated" not in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: the device is there")
def test_a_cuda_device_without_a_gpu_is_refused_with_its_setting_named(student_base, tmp_path):
    spec = DistillSpec(url="", teacher_version=1, teacher_path=str(student_base), student_path=str(student_base),
                       out_dir=str(tmp_path / "student"), device="cuda")
    with pytest.raises(SystemExit, match="distill_device is 'cuda' but torch .* sees no GPU"):
        main(spec, {"chunks": [], "vectors": np.zeros((0, 32), dtype=np.float32), "feedback": [], "questions": [],
                    "canary": []})
    assert not (tmp_path / "student").exists()


def test_a_saved_student_can_be_exported_to_onnx(student_base, tmp_path):
    # sentence-transformers 6 saves its pooling as "pooling_mode": "mean"; the exporter refused that as "only mean
    # pooling is supported", so every student stayed on torch
    build_student(str(student_base), 2, 32, "pca").save(str(tmp_path / "student"))
    export_fp32(tmp_path / "student", tmp_path / "onnx")
    assert (tmp_path / "onnx" / "model.onnx").exists()
    assert SentenceTransformer(str(tmp_path / "student"), device="cpu")[1].pooling_mode == "mean"


def test_a_student_that_cannot_be_built_is_refused_before_training(db_url, student_base, tmp_path):
    # before: the training process started and failed, and its traceback's last lines were the message
    settings = fast_settings(db_url, data_dir=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        with pytest.raises(ModelError, match=r"--student /no/such/model does not exist: give a sentence-transformers "
                                             "model directory"):
            distill(conn, settings, db_url, student="/no/such/model")
        with pytest.raises(ModelError, match=r"--student .*empty is not a sentence-transformers model directory "
                                             r"\(no config.json\)"):
            distill(conn, settings, db_url, student=str(empty))
        with pytest.raises(ModelError, match=r"--student-layers 9: the student .*tiny-4l has 4 transformer layers: "
                                             "keep 1 to 4"):
            distill(conn, settings, db_url, student=str(student_base), layers=9)
        # a cross-encoder or a generative model: the trainer failed on them ("... layers ..."), forced or not
        ranker = tiny_cross_encoder(tmp_path / "cross-encoder")
        with pytest.raises(ModelError, match=r"^--student .*cross-encoder is a cross-encoder or classifier "
                                             r"\(BertForSequenceClassification\), not a sentence-embedding model: the "
                                             r"student must be a sentence-transformers model \(.*\): give its directory$"):
            distill(conn, settings, db_url, student=str(ranker), layers=1, force=True)
        generative = tmp_path / "gpt"
        generative.mkdir()
        (generative / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
        with pytest.raises(ModelError, match=r"^--student .*gpt is a generative model \(GPT2LMHeadModel\), not a "
                                             "sentence-embedding model"):
            distill(conn, settings, db_url, student=str(generative), layers=1, force=True)
        # nothing embedded yet: the trainer started, then failed ("training process exited with 1: model version 1
        # has no stored chunk vectors to distil from"), leaving an empty folder
        with pytest.raises(InputError, match=r"^model version 1 has no stored chunk vectors to distil from: add "
                                             r"documents \(pgsynapse ingest PATH\) and let a worker embed them "
                                             r"\(pgsynapse run\) first; nothing was trained$"):
            distill(conn, settings, db_url, student=str(student_base), layers=2, force=True)
        # a candidate still backfilling has vectors for some chunks only: the student would learn part of the corpus
        v = add_model(conn, student_base, serving_runtime="torch")["id"]
        with pytest.raises(RegistryError, match=f"model version {v} is still backfilling: a teacher needs a vector "
                                                "for every chunk; distil it once `pgsynapse model list` says done"):
            distill(conn, settings, db_url, teacher=v, student=str(student_base), layers=2)
    assert not (tmp_path / "models").exists()  # no training process was started


async def test_the_trainer_connects_with_the_settings_keepalives(db_url, models, student_base, tmp_path, monkeypatch):
    """The trainer process was given the bare URL: its connection had no TCP keepalives (a cut network held it for
    the kernel's hours), unlike the worker's; the URL it is given carries the settings' now."""
    await _corpus_with_feedback(db_url, models)
    settings = fast_settings(db_url, data_dir=tmp_path, keepalives_idle_seconds=7)
    given: list[dict] = []

    def trainer(module: str, spec: dict, out_dir, **kw) -> dict:  # the spec the trainer process would read
        given.append(spec)
        raise TrainingFailed("stopped by the test before training")

    monkeypatch.setattr("pgsynapse.learning.distill.run_trainer", trainer)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        with pytest.raises(TrainingFailed, match="stopped by the test"):
            distill(conn, settings, db_url, student=str(student_base), layers=2, force=True)
    opened = connections_opened(monkeypatch)
    load_data(DistillSpec(**given[0]))  # the trainer's first step, with that spec
    assert [(p, params.get("keepalives"), params.get("keepalives_idle")) for p, params in opened] == [(None, "1", "7")]


async def test_two_students_distilled_in_the_same_second_get_a_folder_each(db_url, models, student_base, tmp_path,
                                                                          monkeypatch):
    """`model distill` named its folder by the second: a second run of the same second (a retry, a script) trained
    into the first one's folder, over the student it holds (one the gate refused is kept there for `model add`)."""
    await _corpus_with_feedback(db_url, models)
    settings = fast_settings(db_url, data_dir=tmp_path)
    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *t: "20260102-030405" if fmt == "%Y%m%d-%H%M%S" else real(fmt, *t))
    given: list[str] = []

    def trainer(module: str, spec: dict, out_dir, **kw) -> dict:  # where the trainer process would write
        given.append(str(out_dir))
        (Path(out_dir) / "config.json").write_text("{}")  # what a run that failed late leaves (an empty folder goes)
        raise TrainingFailed("stopped by the test before training")

    monkeypatch.setattr("pgsynapse.learning.distill.run_trainer", trainer)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        for _ in range(2):
            with pytest.raises(TrainingFailed, match="stopped by the test"):
                distill(conn, settings, db_url, student=str(student_base), layers=2, force=True)
    assert [Path(p).name for p in given] == ["distilled-v1-2l-20260102-030405", "distilled-v1-2l-20260102-030405-2"]


async def test_without_feedback_a_student_is_refused_before_training_unless_forced(db_url, models, student_base,
                                                                                   tmp_path):
    """With no feedback the gate has no hold-out: it refused the student once trained (an hour on 2 cores)."""
    await _corpus_with_feedback(db_url, models)
    settings = fast_settings(db_url, data_dir=tmp_path, distill_budget_seconds=60)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("DELETE FROM pgsynapse.training_examples")
        with pytest.raises(InputError, match=r"^no feedback to judge the student on: no feedback row marks an answer "
                                             r"helpful .*: its gate could only refuse it; nothing was trained "
                                             r"\(--force trains and registers it unjudged\)$"):
            distill(conn, settings, db_url, student=str(student_base), layers=2, epochs=1)
        assert not (tmp_path / "models").exists()  # no training process was started
        done = distill(conn, settings, db_url, student=str(student_base), layers=2, epochs=1, force=True)
    assert done.row is not None and done.gate["forced"] and not done.gate["passed"]


async def test_distill_registers_a_smaller_student_and_not_one_the_gate_refuses(db_url, models, student_base,
                                                                                tmp_path, capsys):
    await _corpus_with_feedback(db_url, models)
    # refused: a margin no student can clear (it must gain half a point per question over its teacher)
    strict = fast_settings(db_url, data_dir=tmp_path, distill_budget_seconds=60, distill_margin=0.5)
    args = argparse.Namespace(model_command="distill", teacher=None, student=str(student_base), student_layers=2,
                              name=None, epochs=1, traffic=0.0, force=False, projection="dense", follow=False)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        assert run_model_command(args, conn, strict, db_url) == 1
        n = conn.execute("SELECT count(*) AS n FROM pgsynapse.model_versions").fetchone()["n"]
    out, err = capsys.readouterr()
    [out_dir] = (tmp_path / "models").glob("distilled-*")
    gate = [line for line in out.splitlines() if line.startswith("gate: ")]
    assert n == 1 and gate[0].startswith("gate: hold-out gain") and "is not above +0.5000" in gate[0], gate
    # it said "--force registers it": that trained another student, the one refused was never registered
    assert (f"the student was not registered: its gate refused it (reasons above); it is in {out_dir}: "
            f"`pgsynapse model add {out_dir}` registers it as it is (--force trains another)") in err, err
    trained = json.loads((out_dir / "metrics.json").read_text())  # kept for a look, not served
    assert trained["layers"] == 2 and trained["dim"] == 384  # "dense": a kept layer up to the teacher's dimension
    assert SentenceTransformer(str(out_dir), device="cpu").encode(["a question"]).shape == (1, 384)

    # registered (forced past the gate, which has too few questions here to judge a random student fairly)
    settings = fast_settings(db_url, data_dir=tmp_path, distill_budget_seconds=120)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        done = distill(conn, settings, db_url, student=str(student_base), layers=2, epochs=2, force=True)
        row = done.row
        assert row is not None
        v = conn.execute("SELECT status, dim, runtime, metrics FROM pgsynapse.model_versions WHERE id = %s",
                         (row["id"],)).fetchone()
    # its own 32 dimensions: it learnt the teacher's 384-d vectors projected onto them
    assert v["status"] == "candidate" and v["dim"] == 32
    m = v["metrics"]["distilled"]
    assert m["layers"] == 2 and m["teacher_version"] == 1 and m["steps"] > 0
    assert m["teacher_projection"]["kind"] == "pca" and m["teacher_projection"]["from_dim"] == 384
    assert -1 <= m["teacher_projection"]["start_cosine"] <= 1
    assert m["heldout_chunks"] >= 1 and -1 <= m["heldout_cosine_mean"] <= 1
    assert m["candidate"]["recall@5"] >= 0 and "reasons" in m["gate"]
    student = SentenceTransformer(row["artifact_path"], device="cpu")
    assert student[0].auto_model.config.num_hidden_layers == 2
    assert student.encode(["a question"]).shape == (1, 32)
    # the student is a candidate like any: the worker backfills its vectors
    conn = await aconn(db_url)
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT backfilled_at IS NOT NULL FROM pgsynapse.model_versions WHERE id = %s",
                         (row["id"],))
    n = await (await conn.execute("SELECT (SELECT count(*) FROM pgsynapse.chunks) = (SELECT count(*) FROM"
                                  " pgsynapse.embeddings WHERE model_version_id = %s) AS ok", (row["id"],))).fetchone()
    assert n["ok"]
    await conn.close()
