"""A directory named by ``model_versions.artifact_path`` is deleted only inside DATA_DIR/models: a row that points
anywhere else (directly, through a symlink, with ``..``, or at the models folder itself) deletes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from structlog.testing import capture_logs

from pgsynapse.artifacts import drop_weights, remove_artifact_dir
from pgsynapse.errors import ModelError
from pgsynapse.export import optimise_active_version
from tests.helpers import fast_settings


def _point_version_at(url: str, path: Path) -> None:
    """Version 1 switched to onnx (as by a worker start) with its artifact at ``path`` and missing there, so the
    next worker start rebuilds it: the path a rebuild deletes first."""
    record = {"requested": "onnx", "runtime": "onnx", "sample_chunks": 16, "tried": [{"runtime": "onnx", "accepted": True}]}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pgsynapse.model_versions SET runtime = 'onnx', artifact_path = %s,"
                      " metrics = jsonb_build_object('runtime_export', %s::jsonb) WHERE id = 1",
                      (str(path), json.dumps(record)))


@pytest.mark.parametrize("where", ["outside", "symlink", "dotdot", "models_root"])
def test_rebuild_never_deletes_a_directory_outside_the_models_folder(db_url, tmp_path, where):
    data = tmp_path / "data"
    models = data / "models"
    models.mkdir(parents=True)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("keep")
    (models / "v7-onnx-other").mkdir()
    (models / "v7-onnx-other" / "keep.txt").write_text("keep")
    target = {
        "outside": precious,
        "symlink": models / "v1-onnx-link",
        "dotdot": models / ".." / ".." / "precious",
        "models_root": models,
    }[where]
    if where == "symlink":
        target.symlink_to(precious, target_is_directory=True)
    _point_version_at(db_url, target)

    raised: Exception | None = None
    with capture_logs() as logs:
        try:
            optimise_active_version(fast_settings(db_url, data_dir=str(data), runtime="onnx"), db_url)
        except Exception as exc:  # noqa: BLE001 - what it raises is checked after what survived
            raised = exc

    assert (precious / "keep.txt").read_text() == "keep"
    assert (models / "v7-onnx-other" / "keep.txt").read_text() == "keep"
    assert isinstance(raised, ModelError), raised
    [refused] = [e for e in logs if e["event"] == "artifact_delete_refused"]
    assert refused["log_level"] == "warning" and refused["path"] == str(target)


def test_an_artifact_directory_inside_the_models_folder_is_deleted(tmp_path):
    partial = tmp_path / "data" / "models" / "v1-onnx-20260101-000000"
    partial.mkdir(parents=True)
    (partial / "model.onnx.tmp").write_text("cut short")
    assert remove_artifact_dir(partial, tmp_path / "data") and not partial.exists()
    assert (tmp_path / "data" / "models").is_dir()


@pytest.mark.parametrize("where", ["outside", "symlink", "dotdot", "models_root"])
def test_a_rejected_versions_weights_are_dropped_only_inside_the_models_folder(tmp_path, where):
    data, precious = tmp_path / "data", tmp_path / "precious"
    models = data / "models"
    (models / "candidate-1" / "1_Pooling").mkdir(parents=True)
    precious.mkdir()
    for folder in (precious, models / "candidate-1"):
        (folder / "model.safetensors").write_bytes(b"w" * 1000)
        (folder / "metrics.json").write_text("{}")
    (models / "candidate-1" / "1_Pooling" / "pytorch_model.bin").write_bytes(b"w" * 24)
    (models / "candidate-1" / "linked.gguf").symlink_to(precious / "model.safetensors")
    # a rejected candidate's own directory, named by its row: the weights go (not what a link points at), the rest stays
    assert drop_weights(models / "candidate-1", data) == 1024
    assert sorted(p.name for p in (models / "candidate-1").rglob("*")) == ["1_Pooling", "linked.gguf", "metrics.json"]
    assert (precious / "model.safetensors").stat().st_size == 1000
    target = {"outside": precious / "model.safetensors", "symlink": models / "v1-link",
              "dotdot": models / ".." / ".." / "precious", "models_root": models}[where]
    if where == "symlink":
        target.symlink_to(precious, target_is_directory=True)
    with capture_logs() as logs:
        assert drop_weights(target, data) == 0
    assert sorted(p.name for p in precious.iterdir()) == ["metrics.json", "model.safetensors"]
    assert [e["event"] for e in logs] == ["artifact_delete_refused"]


def test_a_model_directory_that_is_gone_drops_nothing_of_its_parent(tmp_path):
    # a row naming a directory that is no longer there (another host's copy, removed by hand): its parent folder,
    # another model's, keeps its weights; the path was taken for a file and its folder's weights deleted
    models = tmp_path / "data" / "models"
    (models / "candidate-2").mkdir(parents=True)
    (models / "candidate-2" / "model.safetensors").write_bytes(b"w" * 100)
    with capture_logs() as logs:
        assert drop_weights(models / "candidate-2" / "v9-onnx-int8", tmp_path / "data") == 0
    assert (models / "candidate-2" / "model.safetensors").stat().st_size == 100
    assert logs == []


def test_a_version_recorded_with_a_removed_int8_scheme_fails_its_rebuild_with_a_clear_error(db_url, tmp_path):
    """A version an older release switched to onnx-int8 with a scheme this release no longer has serves its
    artifact as before (the graph is all that is loaded); where the artifact is missing, the rebuild stops
    before deleting or exporting anything, naming the scheme and where its code lives."""
    data = tmp_path / "data"
    missing = data / "models" / "v1-onnx-int8-20261201-000000"
    record = {"requested": "onnx-int8", "runtime": "onnx-int8", "sample_chunks": 16,
              "tried": [{"runtime": "onnx-int8", "accepted": True, "scheme": "outlier-split"}]}
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE pgsynapse.model_versions SET runtime = 'onnx-int8', artifact_path = %s,"
                     " metrics = jsonb_build_object('runtime_export', %s::jsonb) WHERE id = 1",
                     (str(missing), json.dumps(record)))
    with capture_logs() as logs, pytest.raises(ModelError, match="'outlier-split' was removed") as raised:
        optimise_active_version(fast_settings(db_url, data_dir=str(data), runtime="onnx-int8"), db_url)
    assert "git show d9264b4:src/pgsynapse/export.py" in str(raised.value) and "model version 1" in str(raised.value)
    assert not [e for e in logs if e["event"] == "runtime_artifact_rebuild_started"]
