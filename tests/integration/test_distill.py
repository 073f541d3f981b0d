"""`pgsynapse model distill`: a student with fewer layers trained, in its own process, to give the teacher version's
vectors (a projection when the dimensions differ), judged against the teacher on the feedback questions, and
registered as a candidate that the worker backfills; one the gate refuses is not registered."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row
from sentence_transformers import SentenceTransformer

from pgsynapse.learning.distill import distill
from pgsynapse.learning.distill_train import kept_layers
from tests.embed_models import tiny_embedding_model
from tests.helpers import aconn, fast_settings, insert_docs, running_worker, wait_until

pytestmark = pytest.mark.anyio

TOPICS = ["savepoints", "vacuum", "indexes", "roles", "sequences", "views", "triggers", "schemas"]
DOCS = [(t.title(), f"{t.title()} are described here. " + " ".join(f"The {t} page, sentence {i}, explains {t} in "
                                                                    f"PostgreSQL." for i in range(12)))
        for t in TOPICS]


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
        " JOIN pgsynapse.chunks c ON c.document_id = d.id GROUP BY d.id, d.title")
    await conn.execute("INSERT INTO pgsynapse.questions (text, status) VALUES ('what is a schema?', 'answered')")
    await conn.close()


def test_kept_layers_are_evenly_spaced_and_end_with_the_last():
    assert kept_layers(6, 3) == [1, 3, 5]
    assert kept_layers(12, 4) == [2, 5, 8, 11]
    assert kept_layers(6, 6) == list(range(6))
    with pytest.raises(ValueError, match="between 1 and 6"):
        kept_layers(6, 7)


async def test_distill_registers_a_smaller_student_of_the_teachers_dimension(db_url, models, student_base, tmp_path):
    await _corpus_with_feedback(db_url, models)
    settings = fast_settings(db_url, data_dir=tmp_path, distill_budget_seconds=120)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        done = distill(conn, settings, db_url, student=str(student_base), layers=2, epochs=2, force=True)
        row = done.row
        assert row is not None
        v = conn.execute("SELECT status, dim, runtime, metrics FROM pgsynapse.model_versions WHERE id = %s",
                         (row["id"],)).fetchone()
    assert v["status"] == "candidate" and v["dim"] == 384  # the teacher's (version 1): through a projection
    m = v["metrics"]["distilled"]
    assert m["layers"] == 2 and m["teacher_version"] == 1 and m["steps"] > 0
    assert m["heldout_chunks"] >= 1 and -1 <= m["heldout_cosine_mean"] <= 1
    assert m["candidate"]["recall@5"] >= 0 and "reasons" in m["gate"]
    student = SentenceTransformer(row["artifact_path"], device="cpu")
    assert student[0].auto_model.config.num_hidden_layers == 2
    assert student.encode(["a question"]).shape == (1, 384)
    # the student is a candidate like any: the worker backfills its vectors
    conn = await aconn(db_url)
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT backfilled_at IS NOT NULL FROM pgsynapse.model_versions WHERE id = %s",
                         (row["id"],))
    n = await (await conn.execute("SELECT (SELECT count(*) FROM pgsynapse.chunks) = (SELECT count(*) FROM"
                                  " pgsynapse.embeddings WHERE model_version_id = %s) AS ok", (row["id"],))).fetchone()
    assert n["ok"]
    await conn.close()


async def test_a_student_the_gate_refuses_is_not_registered(db_url, models, student_base, tmp_path):
    await _corpus_with_feedback(db_url, models)
    # a margin no student can clear: it must gain half a point per question over its teacher
    settings = fast_settings(db_url, data_dir=tmp_path, distill_budget_seconds=60, distill_margin=0.5)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        done = distill(conn, settings, db_url, student=str(student_base), layers=2, epochs=1)
        n = conn.execute("SELECT count(*) AS n FROM pgsynapse.model_versions").fetchone()["n"]
    assert done.row is None and n == 1
    assert not done.gate["passed"] and "is not above +0.5000" in done.gate["reasons"][0], done.gate["reasons"]
    assert json.loads((done.out_dir / "metrics.json").read_text())["layers"] == 2  # kept for a look, not served
