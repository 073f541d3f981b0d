"""A data dir moved to another path (``mv /var/lib/pgsynapse /srv/pgsynapse``, a volume mounted elsewhere, a
restored copy): the rows still name the old absolute paths under ``OLD/models``. The worker serves the same files
from its own ``DATA_DIR/models``, rebuilds nothing, and creates nothing outside its data dir; the rows stay as they
are (each host resolves them against its own data dir)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.export.register import _sha256
from pgsynapse.models import ONNX_FILES, default_model_path
from pgsynapse.queries import q
from tests.helpers import aconn, adopt_runtime, fast_settings, insert_docs, running_worker, wait_until

pytestmark = pytest.mark.anyio

BODY = ("To roll back part of a transaction, set a savepoint with SAVEPOINT name and later issue "
        "ROLLBACK TO SAVEPOINT name; the work done after the savepoint is undone.")
EMBEDDED = "SELECT status IN ('embedded', 'failed') FROM pgsynapse.documents WHERE id = %s"


def _versions(url: str) -> list[dict]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute("SELECT id, status, runtime, artifact_path, metrics FROM pgsynapse.model_versions"
                            " ORDER BY id").fetchall()


async def test_an_exported_version_is_served_from_the_moved_data_dir(db_url, default_runtime, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    exported = Path(default_runtime["artifact_path"])
    shutil.copytree(exported, old / "models" / exported.name)
    adopt_runtime(db_url, {**default_runtime, "artifact_path": str(old / "models" / exported.name)})
    before = _versions(db_url)
    old.rename(new)  # the operator's `mv`

    settings = fast_settings(db_url, runtime="onnx-int8", data_dir=new, kinds=("embed",))
    conn = await aconn(db_url)
    with capture_logs() as logs:
        async with running_worker(settings, None):  # the worker's own model cache, as `pgsynapse run` has
            [doc] = insert_docs(db_url, [("Savepoints", BODY)])
            await wait_until(conn, EMBEDDED, (doc,))
    await conn.close()
    assert not [e for e in logs if e["event"].startswith("runtime_artifact_rebuil")]
    assert not old.exists()  # nothing recreated at the old place
    with psycopg.connect(db_url) as sync:
        assert sync.execute("SELECT status FROM pgsynapse.documents WHERE id = %s", (doc,)).fetchone()[0] == "embedded"
    [moved] = [e for e in logs if e["event"] == "artifact_path_relocated"]
    assert (moved["recorded"], moved["local"]) == (str(old / "models" / exported.name), str(new / "models" / exported.name))
    assert _versions(db_url) == before  # the rows keep the recorded paths


async def test_a_retrained_version_is_served_from_the_moved_data_dir(db_url, default_runtime, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    adopt_runtime(db_url, default_runtime)  # version 1 served as a fresh install leaves it: nothing to export
    candidate = old / "models" / "candidate-20261206-150633-85"
    shutil.copytree(default_model_path(), candidate)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        vid = sync.execute(q("register_version", "learning.sql"), {
            "name": "fine-tuned", "base": 1, "passage": None, "path": str(candidate), "dim": 384,
            "metrics": json.dumps({"gate": {"passed": True}}), "status": "candidate"}).fetchone()["id"]
        sync.execute("SELECT pgsynapse.ensure_embedding_index(%s)", (vid,))
        sync.execute("UPDATE pgsynapse.model_versions SET backfilled_at = now(), runtime_pending = false"
                     " WHERE id = %s", (vid,))
    before = _versions(db_url)
    old.rename(new)

    settings = fast_settings(db_url, runtime="torch", data_dir=new, kinds=("embed",))
    conn = await aconn(db_url)
    with capture_logs() as logs:
        async with running_worker(settings, None):
            [doc] = insert_docs(db_url, [("Savepoints", BODY)])
            await wait_until(conn, EMBEDDED, (doc,))
    row = await (await conn.execute(
        "SELECT d.status, d.error, count(e.chunk_id) AS n FROM pgsynapse.documents d"
        " JOIN pgsynapse.chunks c ON c.document_id = d.id"
        " LEFT JOIN pgsynapse.embeddings e ON e.chunk_id = c.id AND e.model_version_id = %s"
        " WHERE d.id = %s GROUP BY d.status, d.error", (vid, doc))).fetchone()
    await conn.close()
    assert (row["status"], row["error"]) == ("embedded", None) and row["n"] > 0  # the candidate's vectors too
    assert not old.exists()
    [moved] = [e for e in logs if e["event"] == "artifact_path_relocated"]
    assert (moved["recorded"], moved["local"]) == (str(candidate), str(new / "models" / candidate.name))
    assert _versions(db_url) == before


async def test_a_missing_export_is_rebuilt_in_this_data_dir_not_at_the_recorded_path(db_url, default_runtime, tmp_path):
    # another host with its own data dir, or a data dir restored without its models: the recorded path's folder is
    # not this worker's to create
    old, new = tmp_path / "old", tmp_path / "new"
    recorded = old / "models" / Path(default_runtime["artifact_path"]).name
    adopt_runtime(db_url, {**default_runtime, "artifact_path": str(recorded)})
    before = _versions(db_url)

    settings = fast_settings(db_url, runtime="onnx-int8", data_dir=new, kinds=("embed",))
    conn = await aconn(db_url)
    with capture_logs() as logs:
        async with running_worker(settings, None):
            [doc] = insert_docs(db_url, [("Savepoints", BODY)])
            await wait_until(conn, EMBEDDED, (doc,))
    await conn.close()
    [rebuilt] = [e for e in logs if e["event"] == "runtime_artifact_rebuilt"]
    assert rebuilt["path"] == str(new / "models" / recorded.name) and rebuilt["identical"]
    # the bytes the switch recorded: a host that rebuilds serves the artifact the agreement check accepted
    record = default_runtime["metrics"]["runtime_export"]
    assert _sha256(Path(rebuilt["path"]) / ONNX_FILES[default_runtime["runtime"]]) == record["sha256"]
    assert not old.exists()
    [moved] = [e for e in logs if e["event"] == "artifact_path_relocated"]  # then served from there
    assert moved["local"] == rebuilt["path"]
    assert _versions(db_url) == before
