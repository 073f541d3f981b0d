"""The rule for a recorded artifact path that is not on this host (a data dir moved, restored or mounted elsewhere):
its tail below its last ``models`` directory, under this worker's own ``DATA_DIR/models``, when that is there."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from pgsynapse.artifacts import local_artifact
from pgsynapse.errors import ModelError
from pgsynapse.images.encoders import ImageModelSpec
from pgsynapse.ranking.scorer import Ranker


def _data_dir(tmp_path: Path, *names: str) -> Path:
    data = tmp_path / "new"
    for name in names:
        target = data / "models" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.mkdir() if "." not in target.name else target.write_bytes(b"gguf")
    return data


def test_a_missing_directory_or_file_under_a_models_folder_is_its_copy_here(tmp_path):
    data = _data_dir(tmp_path, "candidate-7", "gguf/sql.gguf")
    old = tmp_path / "old" / "data" / "models"
    with capture_logs() as logs:
        assert local_artifact(f"{old}/candidate-7/", data) == data / "models" / "candidate-7"
        assert local_artifact(old / "candidate-7", data) == data / "models" / "candidate-7"
        assert local_artifact(old / "gguf" / "sql.gguf", data) == data / "models" / "gguf" / "sql.gguf"
        assert local_artifact(old / "candidate-7", data) == data / "models" / "candidate-7"  # logged once
    assert [(e["event"], e["recorded"]) for e in logs] == [
        ("artifact_path_relocated", f"{old}/candidate-7/"), ("artifact_path_relocated", str(old / "candidate-7")),
        ("artifact_path_relocated", str(old / "gguf" / "sql.gguf"))]
    assert all(e["local"].startswith(str(data / "models")) for e in logs)


def test_the_recorded_path_stands_when_it_is_there_or_has_no_copy_here(tmp_path):
    data = _data_dir(tmp_path, "candidate-7")
    there = tmp_path / "old" / "models" / "candidate-7"
    there.mkdir(parents=True)
    gone = tmp_path / "gone" / "models"
    with capture_logs() as logs:
        assert local_artifact(there, data) == there  # on this host: the row is the truth
        assert local_artifact(gone / "candidate-8", data) == gone / "candidate-8"  # no copy here
        assert local_artifact(tmp_path / "elsewhere" / "candidate-7", data) == tmp_path / "elsewhere" / "candidate-7"
        assert local_artifact(gone / "candidate-7", None) == gone / "candidate-7"  # no data dir: no rule
        assert local_artifact("models/candidate-7", data) == Path("models/candidate-7")  # relative: as given
        assert local_artifact(gone / ".." / ".." / "new" / "models" / "candidate-7" / ".." / ".." / "x", data) \
            == gone / ".." / ".." / "new" / "models" / "candidate-7" / ".." / ".." / "x"
        assert local_artifact(gone / "candidate-7" / ".." / "..", data) == gone / "candidate-7" / ".." / ".."
    assert logs == []


def test_a_rebuild_goes_to_the_same_name_here_whether_or_not_it_is_there(tmp_path):
    data = tmp_path / "new"
    gone = tmp_path / "old" / "models" / "v1-onnx-int8-20261206-193941"
    assert local_artifact(gone, data, to_build=True) == (data / "models" / gone.name).resolve()
    assert not data.exists()  # deciding creates nothing
    # the same data dir path on this host (the artifact deleted, or another host with the same layout): in place
    here = data / "models" / gone.name
    assert local_artifact(here, data, to_build=True) == here.resolve()
    assert not data.exists()
    outside = tmp_path / "old" / "v1-onnx-int8"
    assert local_artifact(outside, data, to_build=True) == outside  # not in a models folder: as recorded


def test_the_side_registries_look_for_their_models_here(tmp_path):
    data = _data_dir(tmp_path, "image-3-onnx", "ranker-20261206-175644")
    old = tmp_path / "old" / "models"
    image = {"id": 3, "name": "clip", "kind": "clip", "artifact_path": str(old / "image-3-onnx"), "runtime": "onnx",
             "dim": 512}
    assert ImageModelSpec.from_row(image, data).path == data / "models" / "image-3-onnx"
    ranker = {"id": 1, "name": "r", "path": str(old / "ranker-20261206-175644"), "runtime": "torch"}
    # found here (an empty directory: refused for what it lacks, not for a path that does not exist)
    with pytest.raises(ModelError, match=f"^ranker 1: {data / 'models' / 'ranker-20261206-175644'} is not a cross-enc"):
        Ranker(ranker, data_dir=data)
    with pytest.raises(ModelError, match="path does not exist"):
        Ranker(ranker)
