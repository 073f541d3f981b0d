"""The ONNX export reads both forms of sentence-transformers' configs: the pooling check one boolean per mode
(before 5) and ``pooling_mode`` (5 and later, what a model saved here has, e.g. a distilled student); the maximum
length ``sentence_bert_config.json`` (before 6) or the tokenizer's ``model_max_length`` (6)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pgsynapse.errors import ModelError
from pgsynapse.export.fp32 import _read_pooling, max_seq_length


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


def test_max_seq_length_from_either_config_and_never_past_the_positions(tmp_path):
    bert = SimpleNamespace(model_type="bert", max_position_embeddings=128)
    # sentence-transformers 6: no max_seq_length in sentence_bert_config.json, the tokenizer's says 128
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"transformer_task": "feature-extraction"}))
    assert max_seq_length(tmp_path, SimpleNamespace(model_max_length=128), bert) == 128
    # before 6: its own key wins; capped by the position embeddings (the graph fails past them)
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 384}))
    assert max_seq_length(tmp_path, SimpleNamespace(model_max_length=512), bert) == 128
    mpnet = SimpleNamespace(model_type="mpnet", max_position_embeddings=514)
    assert max_seq_length(tmp_path, SimpleNamespace(model_max_length=512), mpnet) == 384
    (tmp_path / "sentence_bert_config.json").unlink()
    assert max_seq_length(tmp_path, SimpleNamespace(model_max_length=int(1e30)), mpnet) == 256  # nothing said
