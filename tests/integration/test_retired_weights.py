"""A retired version's weight files go, when pgsynapse made them and nothing in service needs them, and a
gate-rejected candidate's that are still there: the worker's housekeeping (``drop_unused_weights``) deletes them
inside its own DATA_DIR/models and keeps each directory's metrics.json and configs. A model a user added, a retired
version whose weights a live one still uses, a path shared with a live version, a candidate its A/B test rejected
and a folder outside the models folder keep every file."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from structlog.testing import capture_logs

from pgsynapse.errors import RegistryError
from pgsynapse.export import run_export
from pgsynapse.learning.registry import retire
from pgsynapse.listener.housekeeping import drop_unused_weights
from tests.helpers import fast_settings

pytestmark = pytest.mark.anyio

WEIGHTS = b"\0" * 4096
GATE = {"gate": {"passed": True}}


def _model_dir(path: Path, weights: str = "model.safetensors") -> Path:
    path.mkdir(parents=True)
    (path / weights).write_bytes(WEIGHTS)
    (path / "config.json").write_text("{}")
    (path / "metrics.json").write_text("{}")
    return path


def _weights(path: Path) -> list[str]:
    return sorted(f.name for f in path.iterdir() if f.suffix in (".safetensors", ".onnx"))


async def test_retired_versions_lose_the_weights_pgsynapse_made_and_nothing_else(db_url, tmp_path):
    data = tmp_path / "data"
    models = data / "models"
    d = {name: _model_dir(models / name) for name in (
        "v2-retrain", "v3-retrain-passages", "v4-query", "user-model", "v6-retrain", "v7-shared", "v10-retrain",
        "v11-gate-rejected", "v12-ab-rejected")}
    d["v6-onnx"] = _model_dir(models / "v6-onnx-int8", "model.onnx")
    d["outside"] = _model_dir(tmp_path / "elsewhere" / "v9-retrain")
    rows = [  # id, status, artifact, metrics, passage version
        (2, "retired", d["v2-retrain"], GATE, None),  # a retrain that lost its A/B test, retired: goes
        (3, "retired", d["v3-retrain-passages"], GATE, None),  # retired, but v4 encodes passages with it: stays
        (4, "candidate", d["v4-query"], GATE, 3),
        (5, "retired", d["user-model"], {}, None),  # `model add /path`: the user's files, whatever their place
        # a retrain switched to the INT8 runtime: the export and the torch directory it replaced both go
        (6, "retired", d["v6-onnx"], {**GATE, "export": {}, "previous_artifact_path": str(d["v6-retrain"])}, None),
        (7, "retired", d["v7-shared"], GATE, None),  # the same files as candidate 8: stay
        (8, "candidate", d["v7-shared"], {"export": {}}, None),
        (9, "retired", d["outside"], GATE, None),  # not in this worker's models folder: not its to delete
        (11, "rejected", d["v11-gate-rejected"], {"gate": {"passed": False}}, None),  # by its gate: goes
        (12, "rejected", d["v12-ab-rejected"], GATE, None),  # by its A/B test: still searchable, stays
    ]
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        for vid, status, path, metrics, passages in rows:
            conn.execute("INSERT INTO pgsynapse.model_versions (id, name, dim, status, artifact_path, metrics,"
                         " passage_version_id) VALUES (%s, %s, 384, %s, %s, %s, %s)",
                         (vid, f"v{vid}", status, str(path), json.dumps(metrics), passages))
        # and one retired by the command, as a user does
        conn.execute("INSERT INTO pgsynapse.model_versions (id, name, dim, status, artifact_path, metrics)"
                     " VALUES (10, 'v10', 384, 'candidate', %s, %s)", (str(d["v10-retrain"]), json.dumps(GATE)))
        retire(conn, 10)
    settings = fast_settings(db_url, data_dir=str(data))
    async with AsyncConnectionPool(db_url, kwargs={"row_factory": dict_row, "autocommit": True}, open=False) as pool:
        with capture_logs() as logs:
            freed = await drop_unused_weights(pool, settings)
            again = await drop_unused_weights(pool, settings)

    gone = ("v2-retrain", "v6-retrain", "v6-onnx", "v10-retrain", "v11-gate-rejected")
    assert (freed, again) == (len(gone) * len(WEIGHTS), 0)
    for name, path in d.items():
        assert len(_weights(path)) == (0 if name in gone else 1), name
        assert (path / "metrics.json").is_file() and (path / "config.json").is_file(), name
    deleted = sorted((e["version"], e["status"], e["path"]) for e in logs if e["event"] == "unused_weights_deleted")
    assert deleted == sorted([(2, "retired", str(d["v2-retrain"])), (6, "retired", str(d["v6-onnx"])),
                              (6, "retired", str(d["v6-retrain"])), (10, "retired", str(d["v10-retrain"])),
                              (11, "rejected", str(d["v11-gate-rejected"]))])
    assert not [e for e in logs if e["log_level"] == "warning"], logs  # nothing refused: nothing else was tried
    # nor can a retired version be exported into a new one (it failed deep in the tokenizer, its files gone)
    with pytest.raises(RegistryError, match="^model version 10 is retired: its vectors are deleted"):
        run_export(settings, "onnx", version=10)
