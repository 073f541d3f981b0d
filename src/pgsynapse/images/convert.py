"""The image commands that load torch: ``image-model export`` (a model's image tower to ONNX) and ``image-model
import-efficientnet``. They read a torch model and trace it, so they import torch and transformers (about 2.5 s
and 300 MB); ``images/cli.py`` imports this module only for them, so that ``image-model list`` and the other
commands never pay for it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pgsynapse.artifacts import local_artifact
from pgsynapse.config import Settings
from pgsynapse.errors import PgsynapseError
from pgsynapse.images import registry
from pgsynapse.images.decode import ImageLimits, decode
from pgsynapse.images.efficientnet import build as build_efficientnet
from pgsynapse.images.export import export_onnx


def test_patterns(n: int = 16) -> list[Image.Image]:
    """Deterministic images with colour, gradients, edges and noise: an export's agreement sample when the
    database holds no image."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:160, 0:200] / 200.0
    out = []
    for i in range(n):
        r, g, b = rng.random(3)
        px = np.stack([r * x + (1 - r) * y, g * (x * y), b * (1 - x)], axis=-1)
        px[(np.floor(x * (i + 2)) + np.floor(y * (i + 2))) % 2 == 1] *= 0.5  # a checkerboard of growing frequency
        px += rng.normal(0, 0.05, px.shape)
        out.append(Image.fromarray((np.clip(px, 0, 1) * 255).astype(np.uint8)))
    return out


def import_efficientnet(dest: Path, *, onnx: bool) -> tuple[Path, str]:
    """EfficientNet-Lite0 written to ``dest`` (TorchScript), and with ``onnx`` its ONNX runtime beside it; the path
    to register and its name."""
    path = build_efficientnet(dest)
    print(f"EfficientNet-Lite0 written to {path}")
    if not onnx:
        return path, "efficientnet-lite0"
    # what serves is the ONNX runtime (4x faster one image at a time); checked on test patterns here, since a fresh
    # database may hold no image yet
    report = export_onnx(path, path.with_name(path.name + "-onnx"), sample=test_patterns())
    print(f"ONNX runtime written to {report.path}: min cosine {report.min_cosine:.4f} to the TorchScript model")
    return Path(report.path), "efficientnet-lite0-onnx"


def export(conn, args: argparse.Namespace, settings: Settings) -> int:
    """ONNX export of a model's image tower, checked on images of this database, registered as a candidate."""
    row = registry.get(conn, args.model)
    if row["runtime"] != "torch":
        raise PgsynapseError(f"image model {args.model} already runs on {row['runtime']}")
    limits = ImageLimits.of(settings)
    sample = [decode(bytes(r["data"]), limits).image
              for r in conn.execute(registry.sql("sample_images"), {"limit": args.sample})]
    if len(sample) < 4:
        raise PgsynapseError(f"the agreement check needs at least 4 embedded images in the database, {len(sample)} "
                             "found: insert or ingest some first")
    dest = Path(args.dest) if args.dest else settings.data_dir / "models" / f"image-{args.model}-onnx"
    report = export_onnx(local_artifact(row["artifact_path"], settings.data_dir), dest, sample=sample, threshold=args.threshold)
    added = registry.add(conn, dest, name=f"{row['name']}-onnx")
    print(json.dumps(report.as_dict()))
    print(f"onnx: registered image model {added['id']} ({added['status']}): min cosine {report.min_cosine:.4f} over "
          f"{report.sample} images; `pgsynapse image-model promote {added['id']}` once it has embedded every image")
    return 0
