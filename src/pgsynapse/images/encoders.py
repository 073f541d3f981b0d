"""Image models by local path: a CLIP-style pair (image and text towers in one space) or an image encoder.

What a path may hold (``detect`` tells which):

- a **transformers CLIP** checkpoint (``config.json`` of ``model_type`` clip, siglip, ...: any model with
  ``get_image_features`` and ``get_text_features``): kind ``clip``, text -> image and image -> image search;
- a **transformers vision model** (ViT, ConvNeXt, DINOv2, ...): kind ``image``, its pooled output (else the first
  token, else the spatial mean) is the embedding;
- a **pgsynapse image directory**: ``pgsynapse_image.json`` naming a TorchScript (``model.pt``) or ONNX
  (``model.onnx``) file that maps ``pixel_values`` (N, 3, H, W) to (N, D). ``pgsynapse image-model export`` writes
  one (the ONNX runtime of a model's image tower), so does :mod:`pgsynapse.images.efficientnet`. A ``clip`` one
  names its text tower's transformers checkpoint in ``text_model``.

Pixels are prepared by one numpy implementation of the ``preprocessor_config.json`` every such directory has
(resize, centre crop, rescale, normalise), so a model and its ONNX export see identical inputs, and no
torchvision is needed. Every embedding is L2-normalised float32.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from pgsynapse.artifacts import local_artifact
from pgsynapse.errors import ModelError
from pgsynapse.logs import get_logger

log = get_logger(__name__)

MANIFEST = "pgsynapse_image.json"
PREPROCESSOR = "preprocessor_config.json"
CLIP_TYPES = ("clip", "siglip", "siglip2", "chinese_clip", "altclip", "metaclip_2")
_RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR,
             3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}


@dataclass(frozen=True)
class ImageModelSpec:
    """A row of ``image_models``."""

    id: int
    name: str
    kind: str  # clip | image
    path: Path
    runtime: str  # torch | onnx
    dim: int

    @classmethod
    def from_row(cls, row: dict[str, Any], data_dir: str | Path | None = None) -> ImageModelSpec:
        """The row's model, at its recorded path or, when that is not on this host, its copy under ``data_dir``'s
        models folder (:func:`~pgsynapse.artifacts.local_artifact`)."""
        return cls(row["id"], row["name"], row["kind"], local_artifact(row["artifact_path"], data_dir), row["runtime"],
                   row["dim"])


def _size(value: Any, default: tuple[int, int] | None) -> tuple[str, tuple[int, int]] | None:
    """A preprocessor size as (mode, (h, w)): shortest_edge resizes keep the aspect ratio."""
    if value is None:
        return None if default is None else ("exact", default)
    if isinstance(value, int):
        return ("shortest", (value, value))
    if "shortest_edge" in value:
        return ("shortest", (value["shortest_edge"], value["shortest_edge"]))
    return ("exact", (value["height"], value["width"]))


@dataclass(frozen=True)
class Preprocess:
    """The image processor's arithmetic, from its ``preprocessor_config.json``."""

    resize: tuple[str, tuple[int, int]] | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float
    resample: Image.Resampling

    @classmethod
    def load(cls, path: Path) -> Preprocess:
        file = path / PREPROCESSOR
        if not file.exists():
            raise ModelError(f"image model {path} has no {PREPROCESSOR} (size, image_mean, image_std)")
        cfg = json.loads(file.read_text())
        resize = _size(cfg.get("size"), (224, 224)) if cfg.get("do_resize", True) else None
        crop = None
        if cfg.get("do_center_crop", "crop_size" in cfg):
            mode_hw = _size(cfg.get("crop_size"), resize[1] if resize else (224, 224))
            crop = mode_hw[1] if mode_hw else None
        return cls(resize=resize, crop=crop,
                   mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))), std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
                   rescale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
                   resample=_RESAMPLE.get(int(cfg.get("resample", 3)), Image.Resampling.BICUBIC))

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([self.one(im) for im in images]).astype(np.float32)

    def one(self, im: Image.Image) -> np.ndarray:
        if self.resize:
            mode, (h, w) = self.resize
            if mode == "shortest":
                scale = h / min(im.width, im.height)
                w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
            im = im.resize((w, h), self.resample)
        if self.crop:
            ch, cw = self.crop
            left, top = (im.width - cw) // 2, (im.height - ch) // 2
            im = im.crop((left, top, left + cw, top + ch))  # pads with black where the image is smaller
        x = np.asarray(im, dtype=np.float32) * self.rescale
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x.transpose(2, 0, 1)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def detect(path: Path) -> dict[str, Any]:
    """What ``path`` holds: ``{"kind": "clip"|"image", "format": "transformers"|"torchscript"|"onnx", ...}``."""
    if not path.exists():
        raise ModelError(f"image model path does not exist: {path}")
    if (path / MANIFEST).exists():
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("kind") not in ("clip", "image") or manifest.get("format") not in ("torchscript", "onnx"):
            raise ModelError(f"{path / MANIFEST}: kind must be clip or image and format torchscript or onnx")
        return manifest
    if not (path / "config.json").exists():
        raise ModelError(f"image model path {path} has neither {MANIFEST} nor a transformers config.json")
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    return {"kind": "clip" if model_type in CLIP_TYPES else "image", "format": "transformers", "model_type": model_type}


class ImageEncoder:
    """One loaded image model. ``encode_images`` (and ``encode_texts`` for kind clip) are thread-safe."""

    def __init__(self, spec: ImageModelSpec, *, threads: int = 0) -> None:
        started = time.perf_counter()
        self.spec = spec
        self.threads = threads
        self.info = detect(spec.path)
        if self.info["kind"] != spec.kind:
            raise ModelError(f"image model {spec.id} is registered as {spec.kind!r} but {spec.path} holds a "
                             f"{self.info['kind']!r} model")
        self.preprocess = Preprocess.load(spec.path)
        self._model: Any = None  # a torch_models.ImageTower
        self._session: ort.InferenceSession | None = None
        self._text: Any = None  # a torch_models.TextTower
        try:
            self._load()
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt files raise anything
            raise ModelError(f"cannot load image model {spec.path}: {type(exc).__name__}: {str(exc).strip()[:300]}") from exc
        # a model loaded to be checked before it is registered has no id or dimension yet (probe, export)
        which = {"model": spec.id, "dim": spec.dim} if spec.id else {"unregistered": True, "path": str(spec.path)}
        log.info("image_model_loaded", **which, name=spec.name, kind=spec.kind, runtime=spec.runtime,
                 seconds=round(time.perf_counter() - started, 2))

    def _load(self) -> None:
        fmt = self.info["format"]
        if fmt == "onnx":
            opts = ort.SessionOptions()
            if self.threads:
                opts.intra_op_num_threads = self.threads
            self._session = ort.InferenceSession(str(self.spec.path / self.info.get("file", "model.onnx")), opts,
                                                 providers=["CPUExecutionProvider"])
        if fmt == "onnx" and self.spec.kind != "clip":
            return
        # deferred, not a cycle: torch and transformers cost a process about 2 s and 200 MB to import, and only a
        # model on torch or a CLIP text tower needs them (images/torch_models.py)
        from pgsynapse.images import torch_models

        if fmt != "onnx":
            self._model = torch_models.ImageTower(self.spec.path, self.info, self.spec.kind)
        if self.spec.kind == "clip":
            self._text = torch_models.text_tower(self.spec.path, self.info, self._model)

    def encode_images(self, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
        if not images:
            return np.zeros((0, self.spec.dim), dtype=np.float32)
        out = []
        for i in range(0, len(images), batch_size):
            pixels = self.preprocess(images[i : i + batch_size])
            out.append(self._forward(pixels))
        vectors = normalise(np.concatenate(out))
        if self.spec.dim and vectors.shape[1] != self.spec.dim:  # dim 0: being probed
            raise ModelError(f"image model {self.spec.path} produces {vectors.shape[1]}-dimensional vectors but "
                             f"image model {self.spec.id} is registered with dim {self.spec.dim}")
        return vectors

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        if self._session is not None:
            name = self._session.get_inputs()[0].name
            return self._session.run(None, {name: pixels})[0].reshape(len(pixels), -1)
        return self._model(pixels)

    def encode_texts(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if self._text is None:
            raise ModelError(f"image model {self.spec.id} ({self.spec.name}) is an image encoder: it has no text "
                             "tower, so it cannot search images by text (register a CLIP model)")
        return normalise(self._text.encode(texts, batch_size))


def probe(path: Path) -> tuple[str, str, int]:
    """(kind, runtime, dim) of the model at ``path``: the dimension by encoding one blank image."""
    info = detect(path)
    runtime = "onnx" if info["format"] == "onnx" else "torch"
    enc = ImageEncoder(ImageModelSpec(0, path.name, info["kind"], path, runtime, 0))
    return info["kind"], runtime, int(enc.encode_images([Image.new("RGB", (64, 64), (127, 127, 127))]).shape[1])


class ImageModelCache:
    """Loads each image model lazily, once per process."""

    def __init__(self, *, threads: int = 0, data_dir: str | Path | None = None) -> None:
        self.threads = threads
        self.data_dir = data_dir
        self._models: dict[tuple[int, str, str], ImageEncoder] = {}
        self._lock = threading.Lock()

    def get(self, row: dict[str, Any]) -> ImageEncoder:
        key = (row["id"], row["runtime"], row["artifact_path"])
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = self._models[key] = ImageEncoder(ImageModelSpec.from_row(row, self.data_dir),
                                                                threads=self.threads)
            return model

    def evict_except(self, rows: list[dict[str, Any]]) -> None:
        keep = {(r["id"], r["runtime"], r["artifact_path"]) for r in rows}
        with self._lock:
            for k in [k for k in self._models if k not in keep]:
                del self._models[k]
