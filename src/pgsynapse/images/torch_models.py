"""The image models that run on torch: TorchScript files and transformers checkpoints, and CLIP text towers.

Imported by :class:`pgsynapse.images.encoders.ImageEncoder` only when a model needs it (a ``torchscript`` or
``transformers`` image model, or a CLIP model's text tower): torch and transformers take about 2 s and 200 MB to
import, which a worker on the default runtime, with no image model or an ONNX one, never pays.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


def features(out: Any) -> torch.Tensor:
    """The image embedding of a transformers output (a tensor already, or a model output)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and hasattr(out, "image_embeds"):
        pooled = out.image_embeds
    if pooled is not None:
        return pooled.flatten(1)
    hidden = out.last_hidden_state
    return hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden[:, 0]


def load_torchscript(file: Path) -> Any:
    with warnings.catch_warnings():  # deprecated in favour of torch.export, still the portable format here
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(file), map_location="cpu").eval()


def load_transformers(path: Path) -> Any:
    return AutoModel.from_pretrained(str(path), local_files_only=True).eval()


class ImageTower:
    """An image model on torch: ``pixel_values`` (N, 3, H, W) as numpy in, (N, D) float32 out. Thread-safe."""

    def __init__(self, path: Path, info: dict[str, Any], kind: str) -> None:
        self.format = info["format"]
        self.kind = kind
        self.model = (load_torchscript(path / info.get("file", "model.pt")) if self.format == "torchscript"
                      else load_transformers(path))
        self._lock = threading.Lock()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock, torch.inference_mode():
            x = torch.from_numpy(pixels)
            if self.format == "torchscript":
                return self.model(x).reshape(len(pixels), -1).float().numpy()
            if self.kind == "clip":
                return features(self.model.get_image_features(pixel_values=x)).float().numpy()
            return features(self.model(pixel_values=x)).float().numpy()


def text_tower(path: Path, info: dict[str, Any], image: ImageTower | None) -> TextTower:
    """A CLIP model's text tower: a TorchScript file its manifest names, the checkpoint it names (an ONNX image
    tower's), or the text half of the transformers model already loaded."""
    if info.get("text_file"):
        return TorchScriptTextTower(path, info)
    return TextTower(Path(info.get("text_model") or path),
                     image.model if image is not None and image.format == "transformers" else None)


class TextTower:
    """The text half of a CLIP checkpoint (from the loaded model, or loaded alone for an ONNX image tower)."""

    def __init__(self, path: Path, model: Any = None) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = model if model is not None else load_transformers(path)
        cfg = getattr(self.model.config, "text_config", self.model.config)
        self.max_length = int(getattr(cfg, "max_position_embeddings", 77))
        self.padding: bool | str = True
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[i : i + batch_size], padding=self.padding, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            with self._lock, torch.inference_mode():
                out.append(self._forward(batch).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    def _forward(self, batch: Any) -> torch.Tensor:
        batch.pop("token_type_ids", None)
        return features(self.model.get_text_features(**batch))


class TorchScriptTextTower(TextTower):
    """A CLIP text tower as a TorchScript file in a pgsynapse image directory, for checkpoints transformers cannot
    load (open_clip's own format: docs/architecture.md shows the conversion). The manifest names ``text_file``
    (token ids in, (N, D) out), ``tokenizer`` (a directory of tokenizer files, relative to the model's; default the
    model's own), ``text_max_length`` (77), ``text_inputs`` (``["input_ids"]``, or with ``"attention_mask"``) and
    ``text_pad_to_max_length`` (true: open_clip's text encoders expect the full context)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(path / manifest.get("tokenizer", ".")), local_files_only=True)
        self.model = load_torchscript(path / manifest["text_file"])
        self.max_length = int(manifest.get("text_max_length", 77))
        self.inputs = list(manifest.get("text_inputs", ["input_ids"]))
        self.padding = "max_length" if manifest.get("text_pad_to_max_length", True) else True
        self._lock = threading.Lock()

    def _forward(self, batch: Any) -> torch.Tensor:
        return self.model(*(batch[name] for name in self.inputs))
