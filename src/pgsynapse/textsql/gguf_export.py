"""A fine-tuned SQL model as a GGUF file, written from its GGUF base, so it serves on llama.cpp like the base.

The ``sql_retrain`` job fine-tunes a GGUF base dequantised by transformers and saves a transformers directory
(float32): on the transformers runtime that model is about ten times slower than the base on llama.cpp. This
module writes the tuned model back into the base's format:

- every metadata field of the base (architecture, hyper-parameters, tokenizer, chat template) is copied as it is;
- every tensor of the base is written, in the base's order: a tensor whose tuned value equals the base's
  dequantised value (``gguf.quants.dequantize``, what transformers' GGUF loader reads too) keeps its original
  bytes (Q4_K, Q5_0, ...); one that differs is written from the tuned weights, as **Q8_0** by default (``--type
  f16`` for F16). Q8_0 is the choice because llama.cpp's CPU decoding is bound by memory bandwidth: Q8_0 is half
  the size of F16 and about as fast as the base's own 8-bit tensors, while its rounding (one scale per 32
  weights, 8 bits) is far finer than the base's 4- and 5-bit blocks the tuned model was trained from; a row whose
  length is not a multiple of 32 (Q8_0's block) falls back to F16. One-dimensional tensors (norms, biases) and
  tensors the base holds as F32/F16 keep the base's float type.

Names are mapped with gguf's own :class:`gguf.TensorNameMap` (``model.layers.0.self_attn.q_proj.weight`` ->
``blk.0.attn_q.weight``). Architectures: ``qwen2`` (no tensor transformed by llama.cpp's converter) and
``llama``, whose converter permutes the rows of the q and k projections (rotary halves interleaved) and whose
GGUF loader in transformers undoes it: the tuned q/k weights are permuted again here before they are compared or
written. Any other architecture is refused (:class:`GgufExportError`): its converter may transform tensors in ways
this module does not know. A tuned model with tied embeddings (no ``lm_head``) gives ``output.weight`` the tuned
embedding; it keeps the base's bytes when the embedding did not change.

CLI: ``python -m pgsynapse.textsql.gguf_export --base BASE.gguf --tuned TUNED_DIR --out OUT.gguf [--type q8_0|f16]``
(prints the :class:`ExportReport` as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pgsynapse.errors import PgsynapseError
from pgsynapse.logs import get_logger

log = get_logger(__name__)

# architecture -> whether llama.cpp's converter permutes the q/k projections' rows (and transformers undoes it)
ARCHS: dict[str, bool] = {"qwen2": False, "llama": True}
TYPES = ("q8_0", "f16")


class GgufExportError(PgsynapseError):
    """The tuned model cannot be written as a GGUF file from this base (architecture, names or shapes)."""


@dataclass
class ExportReport:
    out: str
    arch: str
    tensors: int
    replaced: list[str] = field(default_factory=list)
    kept: int = 0  # tensors whose original bytes were copied
    unmapped_kept: list[str] = field(default_factory=list)  # base tensors no tuned weight maps to (bytes copied)
    replaced_as: dict[str, int] = field(default_factory=dict)  # output type -> tensors
    bytes: int = 0
    seconds: float = 0.0


def _permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's converter's permutation of a llama q (or k, with ``n_head_kv``) projection's rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class TunedWeights:
    """The tensors of a transformers model directory's safetensors files, read one at a time as float32."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise GgufExportError(f"no .safetensors file in {self.directory}: not a saved transformers model")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self.where = {name: h for h in self._handles for name in h.keys()}
        cfg = self.directory / "config.json"
        self.config: dict[str, Any] = json.loads(cfg.read_text()) if cfg.is_file() else {}

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> np.ndarray:
        return self.where[name].get_tensor(name).float().numpy()


def _field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    return f.contents() if f is not None else None


def _copy_metadata(reader: Any, writer: Any) -> None:
    """Every KV field of the base (as gguf's own gguf_new_metadata script copies them)."""
    import gguf

    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue  # written by the writer itself
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)


def _name_map(reader: Any, tuned: TunedWeights, arch: str) -> dict[str, str]:
    """GGUF tensor name -> tuned tensor name. A tuned tensor with no GGUF name is an error (it would be lost)."""
    import gguf

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    blocks = int(_field(reader, f"{arch}.block_count"))
    tmap = gguf.get_tensor_name_map(arch_enum, blocks)
    out: dict[str, str] = {}
    unmapped = []
    for name in tuned.names():
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is None:
            unmapped.append(name)
        else:
            out[g] = name
    if unmapped:
        raise GgufExportError(f"{len(unmapped)} tuned tensor(s) have no {arch} GGUF name ({', '.join(unmapped[:3])}"
                              f"{', ...' if len(unmapped) > 3 else ''}): not a {arch} model of this base?")
    return out


def _dequantised(t: Any) -> np.ndarray:
    from gguf.quants import dequantize

    return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)


def _encode(w: np.ndarray, base_type: Any, want: str) -> tuple[np.ndarray, Any, str]:
    """(array to write, raw GGML type or None, label) of a replaced tensor."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if w.ndim == 1 or base_type in (Q.F32, Q.F16):
        if base_type == Q.F16:
            return w.astype(np.float16), None, "F16"
        return w.astype(np.float32), None, "F32"
    if want == "q8_0" and w.shape[-1] % 32 == 0:
        return quantize(w.astype(np.float32), Q.Q8_0), Q.Q8_0, "Q8_0"
    return w.astype(np.float16), None, "F16"


def _plan(reader: Any, tuned: TunedWeights, arch: str, want: str, atol: float,
          report: ExportReport) -> Iterator[tuple[Any, np.ndarray, Any]]:
    """(base tensor, array to write, raw type or None) for each base tensor, in the base's order."""
    names = _name_map(reader, tuned, arch)
    tied = "output.weight" not in names and "token_embd.weight" in names
    n_head = _field(reader, f"{arch}.attention.head_count")
    n_head_kv = _field(reader, f"{arch}.attention.head_count_kv") or n_head
    by_name = {t.name: t for t in reader.tensors}
    compared: dict[str, tuple[np.ndarray, bool]] = {}

    def tuned_value(t: Any, source: str) -> tuple[np.ndarray, bool]:
        """The tuned value of base tensor ``t`` (from tuned tensor ``source``) in GGUF order, and whether it equals
        the base's dequantised value."""
        if t.name not in compared:
            w = tuned.get(source)
            if ARCHS[arch] and t.name.endswith((".attn_q.weight", ".attn_k.weight")):
                w = _permute(w, int(n_head), int(n_head_kv) if t.name.endswith("attn_k.weight") else None)
            shape = tuple(int(x) for x in reversed(t.shape))
            if w.shape != shape:
                raise GgufExportError(f"shape mismatch: tuned {source} is {list(w.shape)}, base {t.name} is "
                                      f"{list(shape)}: the tuned model is not a fine-tune of this base")
            base = _dequantised(t).reshape(shape)
            same = np.array_equal(w, base) if atol == 0 else bool(np.allclose(w, base, rtol=0, atol=atol))
            compared[t.name] = (w, same)
        return compared[t.name]

    for t in reader.tensors:
        if t.name in names:
            w, same = tuned_value(t, names[t.name])
        elif tied and t.name == "output.weight":  # the tuned head is its embedding: kept if that did not change
            w, same = tuned_value(by_name["token_embd.weight"], names["token_embd.weight"])
            shape = tuple(int(x) for x in reversed(t.shape))
            if w.shape != shape:
                raise GgufExportError(f"shape mismatch: the tuned (tied) embedding is {list(w.shape)}, base "
                                      f"output.weight is {list(shape)}")
        else:
            report.unmapped_kept.append(t.name)
            w, same = t.data, True
        compared.pop(t.name, None)  # its float32 copy is not needed again (a tied head's source, compared early, is)
        if same:
            report.kept += 1
            yield t, t.data, t.tensor_type
            continue
        data, raw, label = _encode(w, t.tensor_type, want)
        report.replaced.append(t.name)
        report.replaced_as[label] = report.replaced_as.get(label, 0) + 1
        yield t, data, raw


def export_gguf(base: str | Path, tuned_dir: str | Path, out: str | Path, *, quant: str = "q8_0",
                atol: float = 0.0) -> ExportReport:
    """Write ``out``: the base GGUF's metadata and tensors, the tensors the fine-tune changed taken from
    ``tuned_dir`` (see the module's docstring). Written to a temporary file beside ``out`` and renamed, so ``out``
    is whole or absent. ``atol``: the largest difference from the base's dequantised value still counted as
    unchanged (0: exact)."""
    import gguf

    if quant not in TYPES:
        raise GgufExportError(f"unknown GGUF export type {quant!r} (one of {', '.join(TYPES)})")
    started = time.time()
    reader = gguf.GGUFReader(str(base), "r")
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if arch not in ARCHS:
        raise GgufExportError(f"GGUF architecture {arch!r} is not supported by the export (supported: "
                              f"{', '.join(sorted(ARCHS))}): its converter may transform tensors this export "
                              "does not know")
    tuned = TunedWeights(tuned_dir)
    report = ExportReport(out=str(out), arch=arch, tensors=len(reader.tensors))
    planned = list(_plan(reader, tuned, arch, quant, atol, report))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.data_alignment = reader.alignment
        _copy_metadata(reader, writer)
        for t, data, raw in planned:
            writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, data, _ in planned:
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report.bytes = out.stat().st_size
    report.seconds = round(time.time() - started, 1)
    log.info("sql_gguf_exported", out=str(out), arch=arch, replaced=len(report.replaced), kept=report.kept,
             replaced_as=report.replaced_as, bytes=report.bytes, seconds=report.seconds)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgsynapse.textsql.gguf_export",
                                description="Write a fine-tuned model as a GGUF file from its GGUF base.")
    p.add_argument("--base", required=True, help="the base model's .gguf file (what was fine-tuned)")
    p.add_argument("--tuned", required=True, help="the fine-tuned transformers directory (safetensors)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="q8_0", choices=TYPES, help="the type of the changed tensors (default q8_0)")
    p.add_argument("--atol", type=float, default=0.0, help="difference still counted as unchanged (default 0)")
    args = p.parse_args(argv)
    try:
        report = export_gguf(args.base, args.tuned, args.out, quant=args.type, atol=args.atol)
    except GgufExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = asdict(report)
    summary["replaced"] = len(report.replaced)
    summary["unmapped_kept"] = report.unmapped_kept
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
