"""Build ONNX artifacts of a model version, check their agreement with the source model, register them.

The export needs no optimum (its pinned transformers breaks sentence-transformers): the transformer is
exported with ``torch.onnx.export`` (eager attention, so ONNX Runtime's BERT fusions apply), fused by
``onnxruntime.transformers.optimizer`` and, for ``onnx-int8``, quantised with per-channel INT8 weights
(one of :data:`SCHEMES`). Pooling and normalisation stay in numpy (:class:`pgsynapse.models.OnnxEmbedder`).

Agreement is measured on real text: chunks of a corpus and real questions. For every question the top-10
chunks by the source model and by the candidate are compared (mean overlap), and the cosine between both
runtimes' vectors of the same chunk is averaged. Below the threshold the artifact is refused with the figures.
"""

from __future__ import annotations

import gzip
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pgsynapse.artifacts import models_root, remove_artifact_dir
from pgsynapse.config import DEFAULT_SAMPLE_CHUNKS
from pgsynapse.db import NO_PREPARE, session_url
from pgsynapse.errors import ModelError
from pgsynapse.logs import get_logger
from pgsynapse.models import ONNX_FILES, ONNX_META, Embedder, ModelSpec, load_embedder

log = get_logger(__name__)

DEFAULT_THRESHOLD = 0.95
# the tokenizer and config files an ONNX artifact keeps beside its graph
_COPY = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
         "sentence_bert_config.json", "modules.json", "config_sentence_transformers.json")


@dataclass
class Agreement:
    """How closely a candidate runtime reproduces the source model on a sample."""

    overlap_at_10: float  # mean |top10_ref ∩ top10_cand| / 10 over the queries
    cosine_mean: float  # mean cosine(ref, cand) over the chunk vectors
    cosine_min: float
    query_cosine_mean: float
    n_chunks: int
    n_queries: int

    def passes(self, threshold: float) -> bool:
        return self.overlap_at_10 >= threshold


@dataclass
class ExportReport:
    runtime: str
    artifact_path: str
    agreement: Agreement
    threshold: float
    accepted: bool
    seconds: float
    size_bytes: int
    version_id: int | None = None
    source_version_id: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["agreement"] = asdict(self.agreement)
        return d


# -- the artifact ------------------------------------------------------------------------------
def _read_pooling(source: Path) -> None:
    cfg = source / "1_Pooling" / "config.json"
    if cfg.exists():
        pooling = json.loads(cfg.read_text())
        if not pooling.get("pooling_mode_mean_tokens", False):
            raise ModelError(f"{source}: only mean pooling is supported by the ONNX runtimes (see {cfg})")


def export_fp32(source: Path, out_dir: Path) -> Path:
    """``model.onnx`` (fp32, BERT-fused) plus the tokenizer files in ``out_dir``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    _read_pooling(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    model = AutoModel.from_pretrained(str(source), local_files_only=True, attn_implementation="eager")
    model.eval()

    class Hidden(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    sample = tok(["a short text", "a somewhat longer sample text for tracing"], padding=True, return_tensors="pt")
    if "token_type_ids" not in sample:
        sample["token_type_ids"] = torch.zeros_like(sample["input_ids"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    raw = out_dir / "model.raw.onnx"
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Hidden(model),
            tuple(sample[n] for n in names),
            str(raw),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in [*names, "last_hidden_state"]},
            opset_version=17,
            dynamo=False,
        )
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = model.config
    fused = optimize_model(
        str(raw), model_type="bert", num_heads=int(cfg.num_attention_heads), hidden_size=int(cfg.hidden_size), opt_level=1
    )
    fused.save_model_to_file(str(out_dir / ONNX_FILES["onnx"]))
    raw.unlink()
    for name in _COPY:
        if (source / name).exists():
            shutil.copy2(source / name, out_dir / name)
    st_cfg = source / "sentence_bert_config.json"
    max_len = json.loads(st_cfg.read_text()).get("max_seq_length", 256) if st_cfg.exists() else 256
    meta = {"source": str(source), "max_seq_length": int(max_len), "dim": int(cfg.hidden_size), "pooling": "mean",
            "normalize": True, "fused": fused.get_fused_operator_statistics()}
    (out_dir / ONNX_META).write_text(json.dumps(meta, indent=2))
    return out_dir / ONNX_FILES["onnx"]


# INT8 schemes, tried in this order (fastest in the worker first, the more accurate first among equals).
# "smooth-static": SmoothQuant (Xiao et al., 2023) with static activations: the fused Attention becomes
# QAttention and the LayerNorm-fed MatMuls see x / s with weights s * W, so BERT's few large activation channels
# move into the per-column weight scales; the FFN down-projections (post-GELU inputs) split their 2 largest
# input channels off into fp32 instead. As fast as "dynamic", as close to fp32 as "outlier-static". The default.
# "dynamic": every MatMul and the fused Attention get per-channel INT8 weights and per-tensor dynamic
# activations (fast, but BERT's activation outliers cost neighbour agreement): the baseline.
# "outlier-static": the fused Attention is unfused into MatMul(QKV) + MultiHeadAttention, and every MatMul,
# QKV included, gets per-channel INT8 weights with its outlier input channels (found on calibration text)
# split off into a small fp32 MatMul, as in LLM.int8(); the activations are quantised with a static per-tensor
# range calibrated on the inlier channels (an outlier channel saturates, but its INT8 weight row is zero).
# ~20 % slower than "smooth-static", but what the agreement check keeps on an x86 CPU without VNNI, where ONNX
# Runtime's u8s8 kernels saturate and the first two are refused (tests/integration/test_perf.py).
# Schemes tried and dropped ("outlier-split", "ffn-blockwise", "blockwise"): REMOVED_SCHEMES.
SCHEMES = ("smooth-static", "dynamic", "outlier-static")
REMOVED_SCHEMES = ("outlier-split", "ffn-blockwise", "blockwise")
# input channels split off per MatMul: all-MiniLM-L6-v2's LayerNorm outputs have 2-4 channels up to 10x the
# rest (channel 99 reaches 30 where the 99.9th percentile is 4); 8 leaves a margin for other models
OUTLIER_CHANNELS = 8
# smooth-static: SmoothQuant's migration strength (on all-MiniLM-L6-v2, 0.7-0.9 agree alike with fp32, 0.5
# loses 0.05 of neighbour agreement) and the post-GELU channels split off per FFN down-projection (one or two
# stand far out: 2, 4 and 8 agree alike)
SMOOTH_ALPHA = 0.8
SMOOTH_OUTLIER_CHANNELS = 2


def _activation_range(graph: Any, tensors: list[str], feeds: list[dict[str, np.ndarray]]
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel ``(min, max)`` of ``tensors`` over the real (unpadded) tokens of ``feeds``; ``graph`` is a
    path or a loaded model."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(graph)) if isinstance(graph, Path) else graph.__class__.FromString(graph.SerializeToString())
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
            have.add(t)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for feed in feeds:
        inputs = {i.name: feed[i.name] for i in sess.get_inputs()}
        out = dict(zip(names, sess.run(None, inputs), strict=True))
        real = feed["attention_mask"].astype(bool)
        for t in tensors:
            x = out[t].reshape(real.shape + (-1,))[real]
            lo[t] = np.minimum(lo[t], x.min(axis=0)) if t in lo else x.min(axis=0)
            hi[t] = np.maximum(hi[t], x.max(axis=0)) if t in hi else x.max(axis=0)
    return {t: (lo[t], hi[t]) for t in tensors}


def _calibration_feeds(out_dir: Path, texts: list[str] | None) -> list[dict[str, np.ndarray]]:
    from pgsynapse.models import load_tokenizer, onnx_feeds

    tok = load_tokenizer(out_dir)
    if not texts:
        chunks, queries = sample_texts(tok, n_chunks=96)
        texts = chunks + queries[:32]
    inputs = {"input_ids", "attention_mask", "token_type_ids"}  # export_fp32's graph inputs
    return [onnx_feeds(tok, texts[start : start + 32], 256, inputs) for start in range(0, len(texts), 32)]


def _outlier_branch(p: str, x: str, weight: np.ndarray, amax: np.ndarray, k: int) -> tuple[np.ndarray, list[Any], list[Any]]:
    """The fp32 side of a split MatMul named ``p``: the ``k`` input channels of ``x`` with the largest ``amax``
    (at most an eighth of them), their initialisers, and ``Gather`` + the small ``MatMul`` giving
    ``{p}/outlier_y``. Returns ``(channels, initialisers, nodes)``."""
    from onnx import helper, numpy_helper

    channels = np.sort(np.argsort(-amax)[: min(k, weight.shape[0] // 8)]).astype(np.int64)
    inits = [numpy_helper.from_array(channels, f"{p}/outlier_channels"),
             numpy_helper.from_array(np.ascontiguousarray(weight[channels]), f"{p}/outlier_weight")]
    nodes = [
        helper.make_node("Gather", [x, f"{p}/outlier_channels"], [f"{p}/outlier_x"], name=f"{p}/outlier_gather", axis=-1),
        helper.make_node("MatMul", [f"{p}/outlier_x", f"{p}/outlier_weight"], [f"{p}/outlier_y"], name=f"{p}/outlier_matmul"),
    ]
    return channels, inits, nodes


def _outlier_add(p: str, output: str) -> Any:
    """``output = {p}/inlier_y + {p}/outlier_y``: the two sides of a split MatMul joined again."""
    from onnx import helper

    return helper.make_node("Add", [f"{p}/inlier_y", f"{p}/outlier_y"], [output], name=f"{p}/outlier_add")


def unfuse_attention(model: Any) -> None:
    """Replace every fused ``Attention`` of ``model`` (in place) by ``MatMul(QKV) + Split + MultiHeadAttention``:
    the same maths, with the QKV projection a plain MatMul that can be quantised like the others."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Attention":
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, w, b = node.input[:3]
        mask = node.input[3] if len(node.input) > 3 else ""
        if set(attrs) - {"num_heads"} or len(node.input) > 4 or w not in inits:
            raise ModelError(f"cannot unfuse attention node {node.name}: unsupported inputs or attributes {sorted(attrs)}")
        hidden = numpy_helper.to_array(inits[w]).shape[1] // 3
        p = node.name
        model.graph.initializer.append(numpy_helper.from_array(np.array([hidden] * 3, np.int64), f"{p}/qkv_sizes"))
        nodes += [
            helper.make_node("MatMul", [x, w], [f"{p}/qkv"], name=f"{p}/qkv/MatMul"),
            helper.make_node("Split", [f"{p}/qkv", f"{p}/qkv_sizes"], [f"{p}/q", f"{p}/k", f"{p}/v"], name=f"{p}/split",
                             axis=-1),
            helper.make_node("MultiHeadAttention", [f"{p}/q", f"{p}/k", f"{p}/v", b] + ([mask] if mask else []),
                             list(node.output), name=f"{p}/mha", domain="com.microsoft", num_heads=attrs["num_heads"]),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _static_int8(p: str, weight: np.ndarray, lo: np.ndarray, hi: np.ndarray, inlier: np.ndarray) -> list[Any]:
    """The initialisers of a statically quantised ``x @ weight`` named ``p``: ``{p}/x_scale`` and
    ``{p}/x_zero_point`` (the uint8 range of the calibrated ``[lo, hi]`` of the ``inlier`` input channels; an
    outlier channel saturates, but its weight row is zero), and ``{p}/w_int8``, ``{p}/w_scale``,
    ``{p}/w_zero_point`` (per-column symmetric INT8 of ``weight`` with the other rows zeroed)."""
    from onnx import numpy_helper

    x_min, x_max = min(float(lo[inlier].min()), 0.0), max(float(hi[inlier].max()), 0.0)
    x_scale = np.float32(max(x_max - x_min, 1e-6) / 255.0)
    x_zero = np.uint8(np.clip(round(-x_min / float(x_scale)), 0, 255))
    w = np.where(inlier[:, None], weight, 0.0)
    w_scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    w_scale[w_scale == 0] = 1.0
    w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
    return [
        numpy_helper.from_array(np.array(x_scale, np.float32), f"{p}/x_scale"),
        numpy_helper.from_array(np.array(x_zero, np.uint8), f"{p}/x_zero_point"),
        numpy_helper.from_array(w_q, f"{p}/w_int8"),
        numpy_helper.from_array(w_scale, f"{p}/w_scale"),
        numpy_helper.from_array(np.zeros(weight.shape[1], np.int8), f"{p}/w_zero_point"),
    ]


def _static_matmul(p: str, x: str, output: str) -> list[Any]:
    """``QuantizeLinear(x)`` then ``MatMulIntegerToFloat`` into ``output``, with :func:`_static_int8`'s
    initialisers."""
    from onnx import helper

    return [
        helper.make_node("QuantizeLinear", [x, f"{p}/x_scale", f"{p}/x_zero_point"], [f"{p}/x_uint8"], name=f"{p}/quantize"),
        helper.make_node("MatMulIntegerToFloat",
                         [f"{p}/x_uint8", f"{p}/w_int8", f"{p}/x_scale", f"{p}/w_scale", f"{p}/x_zero_point",
                          f"{p}/w_zero_point"], [output], name=p, domain="com.microsoft"),
    ]


def _smoothing(lo: np.ndarray, hi: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel factors ``s = max|x|^alpha / max|W row|^(1 - alpha)`` (median 1):
    ``(x / s) @ (s * W)`` is ``x @ W``, with the activation outliers moved into the per-column weight scales."""
    amax = np.maximum(np.maximum(-lo, hi), 1e-5)
    s = amax**alpha / np.maximum(np.abs(weight).max(axis=1), 1e-5) ** (1 - alpha)
    return (s / np.median(s)).astype(np.float32)


def _save_rewritten(model: Any, nodes: list[Any], dst: Path) -> None:
    """Replace ``model``'s nodes by ``nodes``, drop the initialisers no node uses, save to ``dst``."""
    import onnx
    from onnx import helper

    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))


def split_outliers_static(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], k: int = OUTLIER_CHANNELS) -> None:
    """The ``outlier-static`` graph of ``src``: attention unfused, then every MatMul ``y = x @ W`` written as
    ``MatMulIntegerToFloat(QuantizeLinear(x), Wq) + x[..., C] @ W[C]``. ``C``: the ``k`` input channels with the
    largest calibrated max |x| (``2k`` for the QKV projection, the most sensitive); ``Wq``: per-column
    symmetric INT8 of ``W`` with the rows of ``C`` zeroed; the uint8 activation range: the calibrated min and
    max of the other channels."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    unfuse_attention(model)
    inits = {i.name: i for i in model.graph.initializer}
    targets = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    ranges = _activation_range(model, sorted({n.input[0] for n in targets}), feeds)
    nodes = []
    for node in model.graph.node:
        if node not in targets:
            nodes.append(node)
            continue
        x, w, p = node.input[0], node.input[1], node.name
        weight = numpy_helper.to_array(inits[w]).astype(np.float32)
        lo, hi = ranges[x]
        kk = 2 * k if p.endswith("/qkv/MatMul") else k
        channels, branch_inits, branch = _outlier_branch(p, x, weight, np.maximum(-lo, hi), kk)
        inlier = np.ones(weight.shape[0], bool)
        inlier[channels] = False
        model.graph.initializer.extend([*_static_int8(p, weight, lo, hi, inlier), *branch_inits])
        nodes += [*_static_matmul(p, x, f"{p}/inlier_y"), *branch, _outlier_add(p, node.output[0])]
    _save_rewritten(model, nodes, dst)


# producers after which a MatMul's input is not a linear function of a LayerNorm's: smoothing cannot be folded
# there, and the down-projection's few huge post-GELU channels are split off instead
_NONLINEAR = {"Gelu", "BiasGelu", "FastGelu", "Relu", "QuickGelu"}


def smooth_static(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], *, alpha: float = SMOOTH_ALPHA,
                  k: int = SMOOTH_OUTLIER_CHANNELS) -> None:
    """The ``smooth-static`` graph of ``src``, every quantised input static per-tensor uint8:

    - a fused ``Attention`` becomes ``QAttention`` (ONNX Runtime's INT8 attention, which keeps the fused kernel)
      on ``x / s`` with weights ``s * W`` (:func:`_smoothing`); ``/ s`` is a ``Mul`` before the ``QuantizeLinear``
      (a per-axis ``QuantizeLinear`` is 100x slower);
    - a MatMul after a nonlinearity (the FFN down-projection) is not smoothed; its ``k`` largest input channels
      are split off into an fp32 branch as in ``outlier-static``;
    - a MatMul on an attention output (the output projection) is quantised as it is (smoothing it changed
      nothing measurable);
    - every other MatMul (on a LayerNorm: the FFN up-projection) is smoothed like the attention."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    ranges = _activation_range(model, sorted({n.input[0] for n in attention + matmuls}), feeds)

    def smoothed(p: str, x: str, weight: np.ndarray) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, list[Any]]:
        lo, hi = ranges[x]
        s = _smoothing(lo, hi, weight, alpha)
        model.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), f"{p}/smooth"))
        mul = helper.make_node("Mul", [x, f"{p}/smooth"], [f"{p}/x_smooth"], name=f"{p}/smooth")
        return f"{p}/x_smooth", weight * s[:, None], lo / s, hi / s, [mul]

    nodes = []
    for node in model.graph.node:
        p = node.name
        if node.op_type == "Attention":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            x, w, b = node.input[:3]
            mask = node.input[3] if len(node.input) > 3 else ""
            if set(attrs) - {"num_heads"} or len(node.input) > 4 or w not in inits or b not in inits:
                raise ModelError(f"cannot quantise attention node {p}: unsupported inputs or attributes {sorted(attrs)}")
            xs, weight, lo, hi, mul = smoothed(p, x, numpy_helper.to_array(inits[w]).astype(np.float32))
            model.graph.initializer.extend(_static_int8(p, weight, lo, hi, np.ones(weight.shape[0], bool)))
            nodes += [*mul,
                      helper.make_node("QuantizeLinear", [xs, f"{p}/x_scale", f"{p}/x_zero_point"], [f"{p}/x_uint8"],
                                       name=f"{p}/quantize"),
                      helper.make_node("QAttention",
                                       [f"{p}/x_uint8", f"{p}/w_int8", b, f"{p}/x_scale", f"{p}/w_scale", mask,
                                        f"{p}/x_zero_point", f"{p}/w_zero_point"],
                                       list(node.output), name=p, domain="com.microsoft", num_heads=attrs["num_heads"])]
            continue
        if node not in matmuls:
            nodes.append(node)
            continue
        x, w = node.input[0], node.input[1]
        weight = numpy_helper.to_array(inits[w]).astype(np.float32)
        lo, hi = ranges[x]
        inlier = np.ones(weight.shape[0], bool)
        if producer.get(x) in _NONLINEAR:
            channels, branch_inits, branch = _outlier_branch(p, x, weight, np.maximum(-lo, hi), k)
            inlier[channels] = False
            model.graph.initializer.extend([*_static_int8(p, weight, lo, hi, inlier), *branch_inits])
            nodes += [*_static_matmul(p, x, f"{p}/inlier_y"), *branch, _outlier_add(p, node.output[0])]
            continue
        mul = []
        if producer.get(x) != "Attention":
            x, weight, lo, hi, mul = smoothed(p, x, weight)
        model.graph.initializer.extend(_static_int8(p, weight, lo, hi, inlier))
        nodes += [*mul, *_static_matmul(p, x, node.output[0])]
    _save_rewritten(model, nodes, dst)


def scheme_error(scheme: str) -> ModelError:
    """The error for an INT8 scheme this release does not have (one recorded by an older release, say)."""
    if scheme in REMOVED_SCHEMES:
        return ModelError(f"INT8 scheme {scheme!r} was removed from pgsynapse (a benchmark loser; its code: "
                          f"git show d9264b4:src/pgsynapse/export.py): choose one of {SCHEMES}")
    return ModelError(f"unknown INT8 scheme {scheme!r}: choose one of {SCHEMES}")


def quantize_int8(out_dir: Path, scheme: str = "dynamic", *, calibration: list[str] | None = None) -> Path:
    """``model_int8.onnx`` from ``model.onnx`` with one of :data:`SCHEMES`. ``calibration``: texts whose
    activations calibrate the static schemes and pick the outlier channels (default: chunks of the shipped corpus)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if scheme not in SCHEMES:
        raise scheme_error(scheme)
    src, dst = out_dir / ONNX_FILES["onnx"], out_dir / ONNX_FILES["onnx-int8"]
    if scheme == "dynamic":
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Attention"],
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    else:
        rewrite = smooth_static if scheme == "smooth-static" else split_outliers_static
        rewrite(src, dst, _calibration_feeds(out_dir, calibration))
    _record_scheme(out_dir, scheme)
    return dst


def _record_scheme(out_dir: Path, scheme: str) -> None:
    meta_path = out_dir / ONNX_META
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        meta["int8_scheme"] = scheme
        meta_path.write_text(json.dumps(meta, indent=2))


# -- the agreement sample ---------------------------------------------------------------------
def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        for line in f:
            if line.strip():
                yield json.loads(line)


def sample_texts(
    tokenizer: Any,
    *,
    corpus: Path | None = None,
    questions: list[Path] | None = None,
    n_chunks: int = DEFAULT_SAMPLE_CHUNKS,
    chunk_tokens: int = 256,
) -> tuple[list[str], list[str]]:
    """``(chunks, queries)``: chunks of the corpus (``{"title", "text"}`` per line; the shipped docs by default)
    as the worker would make them, and queries (``{"q"}`` per line; the page titles when no file is given)."""
    from importlib import resources

    from pgsynapse.chunking import Chunker

    if corpus is None:
        pages = list(_jsonl(Path(str(resources.files("pgsynapse").joinpath("data", "demo_corpus.jsonl.gz")))))
    else:
        pages = list(_jsonl(corpus))
    chunker = Chunker(tokenizer, chunk_tokens, 32)
    # every page contributes its first chunks, round-robin, so the sample spans the corpus
    per_page = [chunker.split(p.get("title"), p["text"][:20_000]) for p in pages[: max(1, n_chunks)]]
    chunks: list[str] = []
    depth = 0
    while len(chunks) < n_chunks and any(len(c) > depth for c in per_page):
        chunks.extend(c[depth].embed_text for c in per_page if len(c) > depth)
        depth += 1
    chunks = chunks[:n_chunks]
    queries: list[str] = []
    for qp in questions or []:
        queries.extend(d["q"] for d in _jsonl(qp))
    if not queries:
        queries = [p["title"] for p in pages if p.get("title")]
    return chunks, queries


def agreement(ref: Embedder, cand: Embedder, chunks: list[str], queries: list[str], k: int = 10,
              ref_vectors: tuple[np.ndarray, np.ndarray] | None = None) -> Agreement:
    d_ref, q_ref = ref_vectors or (ref.encode(chunks, 32), ref.encode(queries, 32))
    d_c, q_c = cand.encode(chunks, 32), cand.encode(queries, 32)
    k = min(k, len(chunks))
    top_ref = np.argsort(-(q_ref @ d_ref.T), axis=1)[:, :k]
    top_c = np.argsort(-(q_c @ d_c.T), axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_c, strict=True)])
    cos = (d_ref * d_c).sum(axis=1)
    return Agreement(
        overlap_at_10=round(float(overlap), 4),
        cosine_mean=round(float(cos.mean()), 5),
        cosine_min=round(float(cos.min()), 5),
        query_cosine_mean=round(float((q_ref * q_c).sum(axis=1).mean()), 5),
        n_chunks=len(chunks),
        n_queries=len(queries),
    )


def export_and_check(
    source: ModelSpec,
    out_dir: Path,
    runtime: str,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    corpus: Path | None = None,
    questions: list[Path] | None = None,
    n_chunks: int = DEFAULT_SAMPLE_CHUNKS,
    threads: int = 0,
    scheme: str | None = None,
) -> ExportReport:
    """Build the artifact of ``runtime`` from the torch model ``source`` and measure its agreement.

    For ``onnx-int8`` without an explicit ``scheme`` the schemes are tried fastest first; the first one whose
    agreement passes is kept (every attempt's figures are in the report's options).
    """
    started = time.perf_counter()
    if runtime not in ONNX_FILES:
        raise ModelError(f"cannot export runtime {runtime!r}: choose one of {sorted(ONNX_FILES)}")
    if scheme is not None and scheme not in SCHEMES:
        raise scheme_error(scheme)  # before any work: a scheme recorded by an older release, say
    if not (out_dir / ONNX_FILES["onnx"]).exists():
        export_fp32(source.path, out_dir)
    ref = load_embedder(source, threads=threads)
    chunks, queries = sample_texts(ref.tokenizer, corpus=corpus, questions=questions, n_chunks=n_chunks + 96,
                                   chunk_tokens=min(256, ref.max_seq_length))
    # outlier channels and activation ranges are calibrated on text the agreement is not measured on: 96 more
    # chunks, and their first words as short, query-like inputs
    chunks, calibration = chunks[:n_chunks], chunks[n_chunks:]
    calibration += [" ".join(c.split()[:12]) for c in calibration[:32]]
    ref_vectors = (ref.encode(chunks, 32), ref.encode(queries, 32))
    cand_spec = ModelSpec(source.version_id, source.name, out_dir, runtime, source.dim)
    tried: list[dict[str, Any]] = []
    schemes: list[str | None] = [None] if runtime == "onnx" else ([scheme] if scheme else list(SCHEMES))
    agr: Agreement | None = None
    for sch in schemes:
        if sch is not None:
            quantize_int8(out_dir, sch, calibration=calibration)
        cand = load_embedder(cand_spec, threads=threads, onnx_threads=threads)
        agr = agreement(ref, cand, chunks, queries, ref_vectors=ref_vectors)
        tried.append({"scheme": sch, "overlap_at_10": agr.overlap_at_10, "cosine_mean": agr.cosine_mean})
        log.info("export_scheme_checked", runtime=runtime, scheme=sch, overlap_at_10=agr.overlap_at_10,
                 cosine_mean=agr.cosine_mean)
        if agr.passes(threshold):
            break
    assert agr is not None
    graph = out_dir / ONNX_FILES[runtime]
    report = ExportReport(
        runtime=runtime, artifact_path=str(out_dir), agreement=agr, threshold=threshold,
        accepted=agr.passes(threshold), seconds=round(time.perf_counter() - started, 1),
        size_bytes=graph.stat().st_size, source_version_id=source.version_id,
        options={"scheme": tried[-1]["scheme"], "tried": tried},
    )
    log.info("model_exported", runtime=runtime, accepted=report.accepted, **asdict(agr))
    return report


# -- registration -------------------------------------------------------------------------------
def register(conn: Any, report: ExportReport, source_row: dict[str, Any], *, switch: bool = False) -> int:
    """Record an accepted artifact.

    ``switch=False``: a new ``model_versions`` row (status ``candidate``, traffic 0, base = the source version)
    whose metrics hold the agreement figures; the worker then embeds new chunks with it too, side by side.
    ``switch=True``: the source version itself moves to the new runtime (its vectors are interchangeable,
    agreement passed), so nothing is re-embedded; the previous runtime is kept in its metrics.
    """
    metrics = {"export": report.as_dict()}
    if switch:
        conn.execute(
            "UPDATE pgsynapse.model_versions SET runtime = %(runtime)s, artifact_path = %(path)s,"
            " metrics = metrics || jsonb_build_object('previous_runtime', runtime, 'previous_artifact_path', artifact_path)"
            " || %(metrics)s::jsonb WHERE id = %(id)s",
            {"runtime": report.runtime, "path": report.artifact_path, "metrics": json.dumps(metrics), "id": source_row["id"]},
        )
        report.version_id = int(source_row["id"])
        return report.version_id
    row = conn.execute(
        "INSERT INTO pgsynapse.model_versions (name, kind, base_version_id, artifact_path, runtime, dim, metrics, status,"
        " traffic_percent) VALUES (%(name)s, 'embedding', %(base)s, %(path)s, %(runtime)s, %(dim)s, %(metrics)s::jsonb,"
        " 'candidate', 0) RETURNING id",
        {"name": f"{source_row['name']} [{report.runtime}]", "base": source_row["id"], "path": report.artifact_path,
         "runtime": report.runtime, "dim": source_row["dim"], "metrics": json.dumps(metrics)},
    ).fetchone()
    version_id = int(row["id"] if isinstance(row, dict) else row[0])
    conn.execute("SELECT pgsynapse.ensure_embedding_index(%s)", (version_id,))
    report.version_id = version_id
    return version_id


# -- the command ------------------------------------------------------------------------------------
def run_export(
    settings: Any,
    runtime: str,
    *,
    version: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    corpus: Path | None = None,
    questions: list[Path] | None = None,
    n_chunks: int = DEFAULT_SAMPLE_CHUNKS,
    switch: bool = False,
    out_dir: Path | None = None,
    scheme: str | None = None,
) -> ExportReport:
    """``pgsynapse model export``: build, check, and register (or refuse with the figures)."""
    from pgsynapse.db import Database

    with Database(settings) as db, db.connect(autocommit=True) as conn:
        if version is None:
            row = conn.execute("SELECT * FROM pgsynapse.model_versions WHERE status = 'active'").fetchone()
        else:
            row = conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = %s", (version,)).fetchone()
        if row is None:
            raise ModelError("no active model version" if version is None else f"no model version {version}")
        source = ModelSpec(row["id"], row["name"], source_model_path(row, settings.model_path), "torch", row["dim"])
        if out_dir is not None and out_dir.exists() and any(out_dir.iterdir()):
            raise ModelError(f"{out_dir} is not empty: export into a new directory (an artifact there may be served)")
        out = out_dir or new_artifact_dir(settings.data_dir, row["id"], runtime)
        report = export_and_check(source, out, runtime, threshold=threshold, corpus=corpus, questions=questions,
                                  n_chunks=n_chunks, threads=settings.onnx_threads or settings.torch_threads,
                                  scheme=scheme)
        if report.accepted:
            register(conn, report, row, switch=switch)
        else:
            shutil.rmtree(out, ignore_errors=True)
    return report


def new_artifact_dir(data_dir: str | Path, version_id: int, runtime: str) -> Path:
    """A new, empty ``DATA_DIR/models/vV-RUNTIME-TIMESTAMP`` for an export. Never an existing directory: exporting
    a version again must not delete the artifact workers serve, nor one of another database sharing the data dir."""
    base = Path(data_dir) / "models"
    base.mkdir(parents=True, exist_ok=True)
    stem = f"v{version_id}-{runtime}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1000):
        out = base / (f"{stem}-{n}" if n else stem)
        try:
            out.mkdir()
        except FileExistsError:
            continue
        return out
    raise ModelError(f"cannot create a new artifact directory under {base}")


# -- the `runtime` setting: the active version on the fast runtime, once ----------------------------------
EXPORT_LOCK = "pgsynapse.runtime_export"


def source_model_path(row: dict[str, Any], configured: str | None) -> Path:
    """The sentence-transformers directory of a version: its own for torch, the one it was exported from
    for an ONNX runtime (training and re-export need the torch weights)."""
    from pgsynapse.models import resolve_model_path

    if row.get("runtime", "torch") == "torch":
        return resolve_model_path(row.get("artifact_path"), configured)
    meta_path = Path(row["artifact_path"]) / ONNX_META
    try:
        return Path(json.loads(meta_path.read_text())["source"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot find the source model of version {row['id']}: {meta_path} unreadable ({exc})") from exc


def optimise_active_version(settings: Any, url: str) -> ExportReport | None:
    """Move the active version from torch to ``settings.runtime`` (``onnx-int8`` by default), once.

    Runs at worker start, and for a version promoted while a worker runs that was not exported at registration.
    See :func:`optimise_version`."""
    return optimise_version(settings, url)


def optimise_version(settings: Any, url: str, version: int | None = None, *, actor: str = "worker"
                     ) -> ExportReport | None:
    """Move a version (the active one when ``version`` is None) from torch to ``settings.runtime``, once.

    The first worker exports the model, checks its agreement on the shipped docs (:func:`export_and_check`) and
    switches the version (its vectors stay: agreement passed). Other workers wait on an advisory lock meanwhile and
    find the switch done. ``onnx-int8`` refused for agreement falls back to ``onnx`` (fp32, the same vectors as
    torch). The outcome, refusal or error included, is kept in the version's metrics (``runtime_export``) and in
    ``model_events`` so it is tried once per version and runtime; an error leaves the version on torch and the
    worker goes on. A worker on a host without the switched version's artifact builds it again at the same path
    (:func:`rebuild_artifact`), whatever its own ``runtime``.

    Either way the version's ``runtime_pending`` is cleared: a candidate the retrain job registered gets its A/B
    traffic only now, on the runtime that will serve it once promoted (or on torch, with the reason recorded).
    """
    import psycopg
    from psycopg.rows import dict_row

    # a session lock, held for the whole export: on the direct URL when ``url`` goes through a transaction pooler
    with psycopg.connect(session_url(settings, url), autocommit=True, row_factory=dict_row, **NO_PREPARE) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (EXPORT_LOCK,))
        if version is None:
            row = conn.execute("SELECT * FROM pgsynapse.model_versions WHERE status = 'active'").fetchone()
        else:
            row = conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = %s", (version,)).fetchone()
        if row is None or row["status"] not in ("active", "candidate"):
            return None
        tried = (row["metrics"] or {}).get("runtime_export") or {}
        if row["runtime"] != "torch":
            report = None
            if tried.get("runtime") == row["runtime"] and not (Path(row["artifact_path"]) / ONNX_FILES[row["runtime"]]).exists():
                report = rebuild_artifact(settings, row)
            _settled(conn, row, None, actor)
            return report
        if settings.runtime == "torch" or tried.get("requested") == settings.runtime:
            _settled(conn, row, None, actor)
            return None
        log.info("runtime_export_started", version=row["id"], status=row["status"], runtime=settings.runtime,
                 note="once per model version: export, agreement check, switch")
        started = time.perf_counter()
        record: dict[str, Any] = {"requested": settings.runtime, "tried": []}
        report = None
        out: Path | None = None
        try:
            source = ModelSpec(row["id"], row["name"], source_model_path(row, settings.model_path), "torch", row["dim"])
            for runtime in [settings.runtime, *(["onnx"] if settings.runtime == "onnx-int8" else [])]:
                out = new_artifact_dir(settings.data_dir, row["id"], runtime)
                report = export_and_check(source, out, runtime, n_chunks=settings.export_sample_chunks,
                                          threads=settings.onnx_threads or settings.torch_threads)
                record["tried"].append({"runtime": runtime, "accepted": report.accepted,
                                        "overlap_at_10": report.agreement.overlap_at_10,
                                        "scheme": report.options.get("scheme")})
                if report.accepted:
                    record["sample_chunks"] = settings.export_sample_chunks
                    record["sha256"] = _sha256(out / ONNX_FILES[runtime])
                    break
                shutil.rmtree(out, ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - any failure leaves torch serving; the reason is kept and logged
            record["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            report = None
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)  # the failed attempt's partial artifact
            log.warning("runtime_export_failed", version=row["id"], runtime=settings.runtime, error=record["error"])
        record["seconds"] = round(time.perf_counter() - started, 1)
        with conn.transaction():
            if report is not None and report.accepted:
                register(conn, report, row, switch=True)
                record["runtime"] = report.runtime
                log.info("runtime_switched", version=row["id"], runtime=report.runtime,
                         scheme=report.options.get("scheme"), overlap_at_10=report.agreement.overlap_at_10,
                         seconds=record["seconds"])
            elif "error" not in record:
                log.warning("runtime_export_refused", version=row["id"], runtime=settings.runtime, tried=record["tried"])
            conn.execute("UPDATE pgsynapse.model_versions SET metrics = metrics || jsonb_build_object('runtime_export',"
                         " %s::jsonb) WHERE id = %s", (json.dumps(record), row["id"]))
            _settled(conn, row, record, actor)
        return report if report is not None and report.accepted else None


def _settled(conn: Any, row: dict[str, Any], record: dict[str, Any] | None, actor: str) -> None:
    """Clear the version's ``runtime_pending`` (it may get A/B traffic now) and, after an export attempt, write
    its outcome to ``model_events``; ``pgsynapse_models`` hears ``{"runtime": id}`` on commit."""
    from psycopg.types.json import Jsonb

    if record is not None:
        event = ("runtime_switched" if "runtime" in record else
                 "runtime_export_failed" if "error" in record else "runtime_export_refused")
        reason = (f"exported to {record['runtime']}" if "runtime" in record else record.get("error")
                  or f"agreement below the threshold for every runtime tried; stays on {row['runtime']}")
        conn.execute("INSERT INTO pgsynapse.model_events (model_version_id, event, reason, figures, actor)"
                     " VALUES (%s, %s, %s, %s, %s)", (row["id"], event, reason, Jsonb(record), actor))
    if row.get("runtime_pending") or record is not None:
        conn.execute("UPDATE pgsynapse.model_versions SET runtime_pending = false WHERE id = %s", (row["id"],))
        conn.execute("SELECT pg_notify('pgsynapse_models', json_build_object('runtime', %s::int)::text)", (row["id"],))
        log.info("model_runtime_settled", version=row["id"], status=row["status"],
                 runtime=(record or {}).get("runtime", row["runtime"]))


def _sha256(path: Path) -> str:
    import hashlib

    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def rebuild_artifact(settings: Any, row: dict[str, Any]) -> ExportReport:
    """The artifact of a version switched at start-up is missing on this host (another host exported it):
    build it again at the same path from this host's copy of the source model, with the recorded scheme and
    calibration sample, and check its agreement again. The same libraries give the same bytes (``sha256``
    logged); different ones give an artifact that still had to pass the gate. A refusal stops the worker
    with the figures rather than serve vectors that do not match the index."""
    record = row["metrics"]["runtime_export"]
    accepted = next(t for t in reversed(record["tried"]) if t["accepted"])
    out = Path(row["artifact_path"])
    # a rebuild cut short (the graph is written last by quantisation) is cleared first: only in DATA_DIR/models
    if (out.exists() or out.is_symlink()) and not remove_artifact_dir(out, settings.data_dir):
        raise ModelError(f"model version {row['id']}: its artifact path {out} exists without "
                         f"{ONNX_FILES[row['runtime']]} and is not inside {models_root(settings.data_dir)}; "
                         "refusing to delete it to rebuild there (fix model_versions.artifact_path)")
    log.info("runtime_artifact_rebuild_started", version=row["id"], runtime=row["runtime"], path=str(out),
             reason="the version's artifact is missing on this host")
    from pgsynapse.models import resolve_model_path

    # this host's copy of the torch model the version was switched from
    source_path = resolve_model_path(row["metrics"].get("previous_artifact_path"), settings.model_path)
    source = ModelSpec(row["id"], row["name"], source_path, "torch", row["dim"])
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        raise ModelError(f"model version {row['id']}: its artifact {out} is missing here and cannot be rebuilt there "
                         f"({exc}); share DATA_DIR/models between hosts or run with PGSYNAPSE_RUNTIME=torch before "
                         "the first start") from exc
    report = export_and_check(source, out, row["runtime"], n_chunks=record.get("sample_chunks", DEFAULT_SAMPLE_CHUNKS),
                              threads=settings.onnx_threads or settings.torch_threads, scheme=accepted.get("scheme"))
    if not report.accepted:
        remove_artifact_dir(out, settings.data_dir)
        raise ModelError(f"model version {row['id']}: the rebuilt {row['runtime']} artifact has top-10 agreement "
                         f"{report.agreement.overlap_at_10:.4f} with the source model here, below {report.threshold}; "
                         "its vectors would not match the index")
    digest = _sha256(out / ONNX_FILES[row["runtime"]])
    log.info("runtime_artifact_rebuilt", version=row["id"], runtime=row["runtime"], path=str(out),
             identical=digest == record.get("sha256"), overlap_at_10=report.agreement.overlap_at_10,
             seconds=report.seconds)
    return report
