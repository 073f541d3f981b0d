"""The ONNX export's pooling check reads both forms of sentence-transformers' pooling config: one boolean per mode
(before 5) and ``pooling_mode`` (5 and later, what a model saved here has, e.g. a distilled student)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgsynapse.errors import ModelError
from pgsynapse.export.fp32 import _read_pooling


def _model(tmp_path: Path, pooling: dict) -> Path:
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8, **pooling}))
    return tmp_path


@pytest.mark.parametrize("pooling", [
    {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False},
    {"pooling_mode": "mean", "include_prompt": True},
    {"pooling_mode": ["mean"]},
])
def test_mean_pooling_is_taken(tmp_path, pooling):
    _read_pooling(_model(tmp_path, pooling))


@pytest.mark.parametrize("pooling", [
    {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True},
    {"pooling_mode": "cls"},
    {"pooling_mode": ["mean", "max"]},
])
def test_other_pooling_is_refused(tmp_path, pooling):
    with pytest.raises(ModelError, match="only mean pooling"):
        _read_pooling(_model(tmp_path, pooling))
