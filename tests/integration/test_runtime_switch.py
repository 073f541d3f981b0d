"""The ``runtime`` setting: at start a worker moves the active version from torch to the fast runtime, once.

Real export (torch.onnx.export + ONNX Runtime quantisation), a real agreement check, real embeddings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from helpers import aconn, fast_settings, insert_docs, running_worker, wait_until

pytestmark = pytest.mark.anyio

BODY = ("To roll back part of a transaction, set a savepoint with SAVEPOINT name and later issue "
        "ROLLBACK TO SAVEPOINT name; the work done after the savepoint is undone.")


async def _version(conn) -> dict:
    return await (await conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = 1")).fetchone()


async def test_worker_start_moves_the_active_version_to_onnx_int8_once(db_url, models, tmp_path):
    settings = fast_settings(db_url, runtime="onnx-int8", export_sample_chunks=64, data_dir=tmp_path)
    conn = await aconn(db_url)
    [before] = insert_docs(db_url, [("Savepoints", BODY)])
    # embedded on torch first (an existing installation), then the start of an onnx-int8 worker switches
    async with running_worker(fast_settings(db_url), models):
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (before,))
    async with running_worker(settings, models):
        v = await _version(conn)
        record = v["metrics"]["runtime_export"]
        assert v["runtime"] in ("onnx-int8", "onnx"), record  # onnx only when every INT8 scheme was refused
        assert record["requested"] == "onnx-int8" and record["runtime"] == v["runtime"]
        accepted = record["tried"][-1]
        assert accepted["accepted"] and accepted["overlap_at_10"] >= 0.95
        assert Path(v["artifact_path"]).parent == tmp_path / "models"
        assert v["metrics"]["previous_runtime"] == "torch"
        [after] = insert_docs(db_url, [("Savepoints", BODY)])
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (after,))
    rows = await (await conn.execute(
        "SELECT c.document_id, e.embedding::real[] AS v FROM pgsynapse.embeddings e"
        " JOIN pgsynapse.chunks c ON c.id = e.chunk_id WHERE c.document_id = ANY(%s) ORDER BY c.document_id",
        ([before, after],))).fetchall()
    old, new = (np.asarray(r["v"], dtype=np.float32) for r in rows)
    # the same text on torch and on the exported runtime: interchangeable vectors in one index
    assert float(old @ new) > 0.99
    exported = models.get(v)
    assert float(exported.encode(["Savepoints\n" + BODY])[0] @ new) > 0.9999

    # the next start finds the switch done: nothing is exported again
    with capture_logs() as logs:
        async with running_worker(settings, models):
            again = await _version(conn)
    assert again["runtime"] == v["runtime"] and again["metrics"]["runtime_export"] == record
    assert not [e for e in logs if e["event"].startswith("runtime_")]

    # a worker on another host, where the artifact is missing: built again at the same path, same bytes
    from pgsynapse.export import _sha256
    from pgsynapse.models import ONNX_FILES, ModelCache

    shutil.rmtree(v["artifact_path"])
    with capture_logs() as logs:
        async with running_worker(settings, ModelCache()):
            [doc] = insert_docs(db_url, [("Savepoints", BODY)])
            await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,))
    [rebuilt] = [e for e in logs if e["event"] == "runtime_artifact_rebuilt"]
    assert rebuilt["identical"] and rebuilt["path"] == v["artifact_path"]
    assert _sha256(Path(v["artifact_path"]) / ONNX_FILES[v["runtime"]]) == record["sha256"]
    assert await _version(conn) == again
    await conn.close()


async def test_a_failed_export_leaves_torch_serving_and_is_not_retried(db_url, tmp_path):
    """A model the ONNX path cannot take (CLS pooling) keeps torch; the reason is recorded, tried once."""
    from pgsynapse.models import ModelCache, default_model_path

    model = tmp_path / "cls-model"
    shutil.copytree(default_model_path(), model, ignore=shutil.ignore_patterns("*.onnx", "onnx", "openvino"))
    pooling = model / "1_Pooling" / "config.json"
    cfg = json.loads(pooling.read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(cfg))
    settings = fast_settings(db_url, runtime="onnx-int8", export_sample_chunks=16, data_dir=tmp_path,
                             model_path=str(model))
    models = ModelCache(model_path=str(model))  # the configured model, served on torch
    conn = await aconn(db_url)
    with capture_logs() as logs:
        async with running_worker(settings, models):
            v = await _version(conn)
            [doc] = insert_docs(db_url, [("Savepoints", BODY)])
            await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,))
    assert v["runtime"] == "torch" and v["artifact_path"] is None
    record = v["metrics"]["runtime_export"]
    assert record["requested"] == "onnx-int8" and "mean pooling" in record["error"]
    [failed] = [e for e in logs if e["event"] == "runtime_export_failed"]
    assert "mean pooling" in failed["error"]
    assert list((tmp_path / "models").iterdir()) == []  # the failed attempt's directory is removed
    with capture_logs() as logs:
        async with running_worker(settings, models):
            pass
    assert not [e for e in logs if e["event"].startswith("runtime_export")]
    assert (await _version(conn))["metrics"]["runtime_export"] == record
    await conn.close()


async def test_a_version_promoted_while_the_worker_runs_is_switched_too(db_url, models, tmp_path):
    """The learning loop promotes torch candidates: the running worker moves the new active version as well."""
    from pgsynapse.learning.registry import promote

    settings = fast_settings(db_url, runtime="onnx", export_sample_chunks=16, data_dir=tmp_path)
    conn = await aconn(db_url)
    async with running_worker(settings, models):
        assert (await _version(conn))["runtime"] == "onnx"  # switched at start
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
            [candidate] = sync.execute(
                "INSERT INTO pgsynapse.model_versions (name, runtime, dim, status, traffic_percent, backfilled_at)"
                " VALUES ('fine-tuned', 'torch', 384, 'candidate', 0, now()) RETURNING id").fetchone().values()
            promote(sync, candidate)
        await wait_until(conn, "SELECT runtime = 'onnx' FROM pgsynapse.model_versions WHERE id = %s", (candidate,),
                         channel="pgsynapse_models")
        [doc] = insert_docs(db_url, [("Savepoints", BODY)])
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,))
    row = await (await conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = %s", (candidate,))).fetchone()
    assert row["metrics"]["runtime_export"]["runtime"] == "onnx" and row["metrics"]["previous_runtime"] == "torch"
    assert await (await conn.execute(
        "SELECT count(*) AS n FROM pgsynapse.embeddings e JOIN pgsynapse.chunks c ON c.id = e.chunk_id"
        " WHERE c.document_id = %s AND e.model_version_id = %s", (doc, candidate))).fetchone() == {"n": 1}
    await conn.close()
