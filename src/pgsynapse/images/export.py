"""ONNX export of an image model's image tower, checked against the model it came from.

``export_onnx(src, dest, sample=[...])`` takes any model :mod:`pgsynapse.images.encoders` loads in torch (a
TorchScript pgsynapse image directory, a transformers vision model, a transformers CLIP: its
``get_image_features``), exports ``pixel_values (N, 3, H, W) -> (N, D)`` with a dynamic batch axis, and writes a
pgsynapse image directory of format ``onnx`` (the source's ``preprocessor_config.json`` copied, so both see the
same pixels). A CLIP export keeps ``"text_model"``: the source checkpoint, whose text tower still loads from it.

Before anything is written to ``dest``, both runtimes encode ``sample`` and the per-image cosine between their
vectors is measured; an export whose minimum is under ``threshold`` (default 0.99) is refused with a ModelError
and ``dest`` is left as it was.

No INT8 variant: on EfficientNet-Lite0, ONNX Runtime's dynamic quantisation is slower than fp32, and static QDQ
(1.04-1.27x fp32) changes the embedding (cosine 0.70 to fp32, 11 % of top-5 neighbours shared): BENCHMARKS.md,
images (issue 22).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel

from pgsynapse.errors import ModelError
from pgsynapse.images.encoders import MANIFEST, PREPROCESSOR, ImageEncoder, ImageModelSpec, detect
from pgsynapse.images.torch_models import features, load_torchscript
from pgsynapse.logs import get_logger

log = get_logger(__name__)

ONNX_FILE = "model.onnx"
OPSET = 17
DEFAULT_THRESHOLD = 0.99


@dataclass(frozen=True)
class ExportReport:
    source: str
    path: str
    kind: str
    dim: int
    sample: int
    min_cosine: float
    mean_cosine: float
    threshold: float
    onnx_mb: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ImageTower(torch.nn.Module):
    """A transformers model as ``pixel_values -> (N, D)``: CLIP's image features, else the pooled output."""

    def __init__(self, model: Any, clip: bool) -> None:
        super().__init__()
        self.model = model
        self.clip = clip

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.clip:
            return features(self.model.get_image_features(pixel_values=pixel_values))
        return features(self.model(pixel_values=pixel_values))


def _torch_tower(src: Path, info: dict[str, Any]) -> torch.nn.Module:
    if info["format"] == "onnx":
        raise ModelError(f"{src} is already an ONNX image model: export from the model it was exported from")
    if info["format"] == "torchscript":
        return load_torchscript(src / info.get("file", "model.pt"))
    model = AutoModel.from_pretrained(str(src), local_files_only=True, attn_implementation="eager").eval()
    return _ImageTower(model, info["kind"] == "clip").eval()


def _encoder(path: Path, kind: str, runtime: str) -> ImageEncoder:
    return ImageEncoder(ImageModelSpec(0, path.name, kind, path, runtime, 0), threads=0)


def export_onnx(src: Path, dest: Path, *, sample: list[Image.Image], threshold: float = DEFAULT_THRESHOLD,
                opset: int = OPSET) -> ExportReport:
    """Export the image tower of the model at ``src`` to an ONNX pgsynapse image directory at ``dest``."""
    started = time.perf_counter()
    src, dest = Path(src), Path(dest)
    if not sample:
        raise ModelError("export_onnx needs a sample of images to check the export against its source")
    info = detect(src)
    kind = info["kind"]
    reference = _encoder(src, kind, "torch")
    pixels = torch.from_numpy(reference.preprocess(sample[:2]))
    tower = _torch_tower(src, info)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with torch.inference_mode():
            dim = int(tower(pixels).reshape(len(pixels), -1).shape[1])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
                torch.onnx.export(tower, (pixels,), str(work / ONNX_FILE), input_names=["pixel_values"],
                                  output_names=["image_embeds"], opset_version=opset, dynamo=False,
                                  dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}})
        except Exception as exc:  # noqa: BLE001 - the exporter raises anything for an unsupported graph
            raise ModelError(f"cannot export the image tower of {src} to ONNX: {type(exc).__name__}: "
                             f"{str(exc).strip()[:300]}") from exc
        shutil.copy2(src / PREPROCESSOR, work / PREPROCESSOR)
        manifest: dict[str, Any] = {"kind": kind, "format": "onnx", "file": ONNX_FILE, "dim": dim,
                                    "exported_from": str(src.resolve())}
        if kind == "clip":
            text = info.get("text_model") if info["format"] != "transformers" else None
            manifest["text_model"] = str(Path(text).resolve() if text else src.resolve())
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        candidate = _encoder(work, kind, "onnx")
        cos = np.sum(reference.encode_images(sample) * candidate.encode_images(sample), axis=1)
        lo, mean = float(cos.min()), float(cos.mean())
        if lo < threshold:
            raise ModelError(f"the ONNX export of {src} disagrees with it: minimum cosine {lo:.4f} over "
                             f"{len(sample)} sample images is under {threshold} (mean {mean:.4f}); not written")
        size = (work / ONNX_FILE).stat().st_size
        dest.mkdir(exist_ok=True)
        for f in work.iterdir():
            f.replace(dest / f.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = ExportReport(source=str(src), path=str(dest), kind=kind, dim=dim, sample=len(sample),
                          min_cosine=round(lo, 6), mean_cosine=round(mean, 6), threshold=threshold,
                          onnx_mb=round(size / 2**20, 2), seconds=round(time.perf_counter() - started, 2))
    log.info("image_model_exported", **report.as_dict())
    return report
