"""Tiny image models the tests build themselves (no CLIP weights install offline): a CLIP taught in a few
seconds to match colour words to coloured images, and a random ViT image encoder. Both are saved as ordinary
transformers checkpoints, so they load through the same path as a user's model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, ViTConfig, ViTModel

from pgsynapse.images.encoders import Preprocess
from pgsynapse.models import default_model_path

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 50, 220), "yellow": (235, 220, 30)}
PREPROCESSOR = {"do_resize": True, "size": {"shortest_edge": 32}, "do_center_crop": True,
                "crop_size": {"height": 32, "width": 32}, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}


def coloured_image(colour: str, seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A picture mostly of one colour, with noise and a random darker stripe (no two alike)."""
    rng = np.random.default_rng(seed)
    base = np.asarray(COLOURS[colour], dtype=np.float32)
    px = base + rng.normal(0, 18, (size[1], size[0], 3))
    row = int(rng.integers(0, size[1] - 6))
    px[row : row + 6] *= 0.6
    return Image.fromarray(np.clip(px, 0, 255).astype(np.uint8))


def png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _write_preprocessor(path: Path) -> None:
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))


def tiny_clip(path: Path, steps: int = 60) -> Path:
    """A 2-layer CLIP trained contrastively on colour names and coloured images until it matches them."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    model = CLIPModel(cfg)
    path.mkdir(parents=True, exist_ok=True)
    _write_preprocessor(path)
    prep = Preprocess.load(path)
    names = list(COLOURS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        ims = [coloured_image(c, seed=1000 * step + i) for i, c in enumerate(names)]
        texts = [f"a {c} picture" for c in names]
        batch = tok(texts, padding=True, return_tensors="pt")
        batch.pop("token_type_ids", None)
        out = model(**batch, pixel_values=torch.from_numpy(prep(ims)), return_loss=True)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_vit(path: Path, width: int = 32) -> Path:
    """A random 2-layer ViT: an image encoder whose nearest neighbour of an image is itself, re-encoded. Its
    vectors have ``width`` dimensions."""
    torch.manual_seed(1)
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=width, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2))
    path.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(path)
    _write_preprocessor(path)
    return path
