"""A trained cross-encoder to ONNX INT8 (``model.onnx``, then ``model_int8.onnx`` by dynamic per-channel INT8,
:func:`pgsynapse.export.quantize.quantize_int8`), and the agreement check between the two runtimes.

The ranker ships on INT8 only when its order agrees with the fp32 weights' on sample candidate lists (mean
Spearman correlation per list at least :data:`MIN_AGREEMENT`); otherwise it is registered on torch.
Imported by the trainer process and the CLI only (transformers at the top), never by a worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pgsynapse.export.fp32 import bert_to_onnx
from pgsynapse.export.quantize import quantize_int8
from pgsynapse.logs import get_logger
from pgsynapse.ranking.scorer import Ranker

log = get_logger(__name__)

MIN_AGREEMENT = 0.9


def export_onnx(model_dir: Path) -> Path:
    """``model.onnx`` (fp32, the logits) and ``model_int8.onnx`` in ``model_dir``, beside the weights."""
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True,
                                                               attn_implementation="eager").eval()
    sample = tok(["a question", "another question"], ["a passage", "a somewhat longer passage for tracing"],
                 padding=True, return_tensors="pt")

    bert_to_onnx(model, sample, "logits", {0: "batch"}, model_dir / "model.onnx")
    return quantize_int8(model_dir, "dynamic")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score lists (ties broken by position; 1.0 for fewer than 2)."""
    if len(a) < 2:
        return 1.0
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    c = np.corrcoef(ra, rb)[0, 1]
    return float(c) if np.isfinite(c) else 0.0


def agreement(model_dir: Path, lists: list[tuple[str, list[str]]], threads: int = 0) -> float:
    """Mean Spearman correlation per (question, candidates) list between the INT8 graph and the torch weights."""
    row = {"id": 0, "path": str(model_dir), "name": model_dir.name}
    int8 = Ranker({**row, "runtime": "onnx-int8"}, threads=threads)
    fp32 = Ranker({**row, "runtime": "torch"}, threads=threads)
    values = [spearman(int8.score(q, ps), fp32.score(q, ps)) for q, ps in lists if ps]
    return float(np.mean(values)) if values else 1.0


def export_ranker(model_dir: Path, lists: list[tuple[str, list[str]]], threads: int = 0) -> dict[str, Any]:
    """Export, check and choose the runtime: ``{"runtime", "agreement"}``."""
    export_onnx(model_dir)
    agree = agreement(model_dir, lists, threads)
    runtime = "onnx-int8" if agree >= MIN_AGREEMENT else "torch"
    log.info("ranker_exported", path=str(model_dir), agreement=round(agree, 4), runtime=runtime,
             min_agreement=MIN_AGREEMENT)
    return {"runtime": runtime, "agreement": round(agree, 4)}
