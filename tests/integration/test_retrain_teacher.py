"""The retrain's teacher (issue 23, "pseudo-labels from a stronger scorer"): a model version with a vector for every
chunk labels the training examples (which passage of the helpful page is the positive): with `retrain_teacher =
ranker` the active ranker when that ranker is a model version (`pgsynapse ranker add version:N`), with `version:N`
that version; `none`, the default, trains without one. Real Postgres, the real default model as the base, a tiny
random teacher: these tests check which teacher is used and that its labels reach the trainer, not how good they
are (bench/learning.py --teacher-vectors measures that with all-mpnet-base-v2)."""

from __future__ import annotations

from datetime import datetime, timezone

import anyio
import psycopg
import pytest
from psycopg.rows import dict_row

from pgsynapse.handlers.base import Job
from pgsynapse.handlers.retrain import RetrainHandler, find_teacher
from pgsynapse.learning.registry import add_model
from pgsynapse.ranking.registry import REGISTRY
from pgsynapse.ranking.rescore import teacher_path
from tests.e2e.test_learning import _helpful_feedback, _pages
from tests.embed_models import tiny_cross_encoder, tiny_embedding_model
from tests.helpers import aconn, fast_settings, running_worker, wait_until

pytestmark = pytest.mark.anyio


async def _corpus_with_feedback(db_url: str, models, tmp_path) -> int:
    """Pages embedded by v1 with short chunks (several per page), a tiny teacher added and backfilled, and
    helpful feedback on the right page for each question; returns the teacher's version id."""
    pages = _pages()[:8]
    conn = await aconn(db_url)
    await conn.execute(
        "INSERT INTO pgsynapse.documents (source, title, body) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])",
        ([p["id"] for p in pages], [p["title"] for p in pages], [p["text"] for p in pages]))
    settings = fast_settings(db_url, kinds=("embed", "backfill"), chunk_tokens=64, backfill_throttle_seconds=0)
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status <> 'embedded'")
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
            teacher = add_model(sync, tiny_embedding_model(tmp_path / "teacher-48", 48), name="teacher",
                                serving_runtime="torch")["id"]
        await wait_until(conn, "SELECT backfilled_at IS NOT NULL FROM pgsynapse.model_versions WHERE id = %s",
                         (teacher,), channel="pgsynapse_models")
    await _helpful_feedback(conn, pages)
    await conn.close()
    return teacher


async def _retrain(db_url: str, models, settings) -> list:
    handler = RetrainHandler(settings, models)
    conn = await aconn(db_url)
    job = Job(1, "retrain", 0, {"force": True}, 1, datetime.now(timezone.utc))
    work, _ = await handler.load(conn, [job])
    await conn.close()
    return await anyio.to_thread.run_sync(handler.compute, work)


async def test_the_active_version_ranker_labels_the_retrains_examples(db_url, models, tmp_path):
    teacher = await _corpus_with_feedback(db_url, models, tmp_path)
    conn = await aconn(db_url)
    assert await find_teacher(conn, "ranker") == (None, None)  # no ranker: no teacher
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        REGISTRY.add_model(sync, "ce", str(tiny_cross_encoder(tmp_path / "ce")), "torch", status="active")
        assert await find_teacher(conn, "ranker") == (None, None)  # a cross-encoder ranker has no chunk vectors
        REGISTRY.add_model(sync, "teacher", teacher_path(teacher), "version", status="active")  # replaces it
    found, why = await find_teacher(conn, "ranker")
    assert found["id"] == teacher and why is None
    assert (await find_teacher(conn, f"version:{teacher}"))[0]["id"] == teacher
    assert await find_teacher(conn, "none") == (None, None)
    gone, why = await find_teacher(conn, "version:99")
    assert gone is None and why == "retrain_teacher version:99: no model version 99 to rescore with"
    await conn.close()

    settings = fast_settings(db_url, data_dir=str(tmp_path / "data"), chunk_tokens=64, retrain_margin=-1,
                             retrain_synthetic_pairs=0, retrain_batch_size=8, retrain_heldout_fraction=0.25,
                             retrain_canary_size=0, retrain_teacher="ranker")
    # a version named that cannot label (there is none): the job fails saying so, and trains nothing
    [refused] = await _retrain(db_url, models, settings.model_copy(update={"retrain_teacher": "version:99"}))
    assert refused.error == "retrain_teacher version:99: no model version 99 to rescore with"
    # "ranker": the active ranker's version labels the examples; the random teacher moves some positives
    [outcome] = await _retrain(db_url, models, settings)
    assert outcome.error is None, outcome.error
    metrics = outcome.result["metrics"]
    assert metrics["teacher"] == teacher and 0 < metrics["teacher_relabelled"] <= metrics["train_examples"]
