"""INT8 quantisation of an exported fp32 graph (``model.onnx`` -> ``model_int8.onnx``): the schemes of
:data:`SCHEMES` and their calibration on real text (docs/performance.md, "INT8 schemes")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pgsynapse.errors import ModelError
from pgsynapse.export.sample import sample_texts
from pgsynapse.models import ONNX_FILES, ONNX_META
from pgsynapse.tokens import load_tokenizer, onnx_feeds

# onnx, onnxruntime's quantiser and torch are imported in the functions that use them, not at the top: every
# worker imports this package (for :func:`pgsynapse.export.register.optimise_version`), but builds an artifact
# once per model version at most, and at the top they would add ~1.2 s and ~60 MB to every worker start
# (measured on the worker's own imports, 2026-12-04); bench.runtimes' child processes report their RSS too.

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


def _activation_range(graph: Any, tensors: list[str], feeds: list[dict[str, np.ndarray]], threads: int = 0
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel ``(min, max)`` of ``tensors`` over the real (unpadded) tokens of ``feeds``; ``graph`` is a
    path or a loaded model; ``threads``: the session's intra-op threads (0: ONNX Runtime's default, every core)."""
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
    opts.intra_op_num_threads = threads
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


def split_outliers_static(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], k: int = OUTLIER_CHANNELS, *,
                          threads: int = 0) -> None:
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
    ranges = _activation_range(model, sorted({n.input[0] for n in targets}), feeds, threads)
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
                  k: int = SMOOTH_OUTLIER_CHANNELS, threads: int = 0) -> None:
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
    ranges = _activation_range(model, sorted({n.input[0] for n in attention + matmuls}), feeds, threads)

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


def quantize_int8(out_dir: Path, scheme: str = "dynamic", *, calibration: list[str] | None = None,
                  threads: int = 0) -> Path:
    """``model_int8.onnx`` from ``model.onnx`` with one of :data:`SCHEMES`. ``calibration``: texts whose
    activations calibrate the static schemes and pick the outlier channels (default: chunks of the shipped corpus);
    ``threads``: the calibration's intra-op threads (0: every core)."""
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
        rewrite(src, dst, _calibration_feeds(out_dir, calibration), threads=threads)
    _record_scheme(out_dir, scheme)
    return dst


def _record_scheme(out_dir: Path, scheme: str) -> None:
    meta_path = out_dir / ONNX_META
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        meta["int8_scheme"] = scheme
        meta_path.write_text(json.dumps(meta, indent=2))
