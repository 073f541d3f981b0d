"""The fp32 ONNX graph of a sentence-transformers model: ``model.onnx`` plus its tokenizer files.

The export needs no optimum (its pinned transformers breaks sentence-transformers): the transformer is
exported with ``torch.onnx.export`` (eager attention, so ONNX Runtime's BERT fusions apply) and fused by
``onnxruntime.transformers.optimizer``. Pooling and normalisation stay in numpy
(:class:`pgsynapse.models.OnnxEmbedder`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

from pgsynapse.errors import ModelError
from pgsynapse.models import ONNX_FILES, ONNX_META

# onnx, onnxruntime's quantiser and torch are imported in the functions that use them, not at the top: every
# worker imports this package (for :func:`pgsynapse.export.register.optimise_version`), but builds an artifact
# once per model version at most, and at the top they would add ~1.2 s and ~60 MB to every worker start
# (measured on the worker's own imports, 2026-12-04); bench.runtimes' child processes report their RSS too.

# the tokenizer and config files an ONNX artifact keeps beside its graph
_COPY = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
         "sentence_bert_config.json", "modules.json", "config_sentence_transformers.json")


def max_seq_length(source: Path, tokenizer: Any, config: Any) -> int:
    """The tokens the ONNX runtime feeds the graph: sentence-transformers before 6 wrote its ``max_seq_length`` in
    ``sentence_bert_config.json``, 6 writes it as the tokenizer's ``model_max_length`` (a model saved here: a
    distilled student). Never more than the position embeddings hold (a longer input fails in the graph's
    embedding layer: "input index out of range"); 256 when nothing says."""
    st_cfg = source / "sentence_bert_config.json"
    said = json.loads(st_cfg.read_text()).get("max_seq_length") if st_cfg.exists() else None
    if said is None:
        told = getattr(tokenizer, "model_max_length", None)
        said = told if isinstance(told, int) and told <= 100_000 else 256  # transformers' "no limit" is ~1e30
    # RoBERTa-style models (mpnet) start their positions after the padding index: two fewer usable positions
    offset = 2 if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "mpnet", "camembert") else 0
    positions = getattr(config, "max_position_embeddings", None)
    return int(min(said, positions - offset) if positions else said)


def _read_pooling(source: Path) -> None:
    """Refuse a model whose pooling is not mean alone. sentence-transformers 5 and later save the mode as
    ``"pooling_mode": "mean"`` (a list for several); earlier ones as one boolean per mode
    (``pooling_mode_mean_tokens``): a model saved here (a distilled student) has the new form."""
    cfg = source / "1_Pooling" / "config.json"
    if cfg.exists():
        pooling = json.loads(cfg.read_text())
        mode = pooling.get("pooling_mode")
        mean = mode in ("mean", ["mean"]) if mode is not None else pooling.get("pooling_mode_mean_tokens", False)
        if not mean:
            raise ModelError(f"{source}: only mean pooling is supported by the ONNX runtimes (see {cfg})")


def bert_to_onnx(model: Any, sample: Any, output: str, output_axes: dict[int, str], dst: Path) -> Any:
    """A transformers BERT-like ``model`` (loaded with eager attention, so ONNX Runtime's BERT fusions apply) with the
    three BERT inputs in and its output field ``output`` out, traced on ``sample`` (tokenizer output) with dynamic
    batch and sequence axes, opset 17, then fused by ONNX Runtime's BERT optimizer into ``dst``; returns the fused
    model (its operator statistics). Shared by the embedding models and the rankers (ranking/export.py)."""
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    class Output(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return getattr(self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids),
                           output)

    if "token_type_ids" not in sample:
        sample["token_type_ids"] = torch.zeros_like(sample["input_ids"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    raw = dst.with_name(dst.stem + ".raw.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Output(model), tuple(sample[n] for n in names), str(raw), input_names=names,
                          output_names=[output],
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, output: output_axes},
                          opset_version=17, dynamo=False)
    fused = optimize_model(str(raw), model_type="bert", num_heads=int(model.config.num_attention_heads),
                           hidden_size=int(model.config.hidden_size), opt_level=1)
    fused.save_model_to_file(str(dst))
    raw.unlink()
    return fused


def export_fp32(source: Path, out_dir: Path) -> Path:
    """``model.onnx`` (fp32, BERT-fused) plus the tokenizer files in ``out_dir``."""
    from transformers import AutoModel, AutoTokenizer

    _read_pooling(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    model = AutoModel.from_pretrained(str(source), local_files_only=True, attn_implementation="eager")
    model.eval()
    sample = tok(["a short text", "a somewhat longer sample text for tracing"], padding=True, return_tensors="pt")
    fused = bert_to_onnx(model, sample, "last_hidden_state", {0: "batch", 1: "seq"}, out_dir / ONNX_FILES["onnx"])
    cfg = model.config
    for name in _COPY:
        if (source / name).exists():
            shutil.copy2(source / name, out_dir / name)
    meta = {"source": str(source), "max_seq_length": max_seq_length(source, tok, cfg), "dim": int(cfg.hidden_size),
            "pooling": "mean",
            "normalize": True, "fused": fused.get_fused_operator_statistics()}
    (out_dir / ONNX_META).write_text(json.dumps(meta, indent=2))
    return out_dir / ONNX_FILES["onnx"]
