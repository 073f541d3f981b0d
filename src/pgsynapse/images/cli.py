"""The image commands behind the CLI: ``image-model add|list|promote|retire`` and ``search --images`` /
``search --like-image``."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import anyio
import numpy as np
from PIL import Image

from pgsynapse.config import Settings
from pgsynapse.db import Database
from pgsynapse.errors import InputError, PgsynapseError
from pgsynapse.images import registry
from pgsynapse.images.decode import ImageLimits, decode
from pgsynapse.images.efficientnet import build as build_efficientnet
from pgsynapse.images.encoders import ImageModelCache
from pgsynapse.images.export import export_onnx
from pgsynapse.images.search import ImageHit, search_by_image, search_by_text


def run_image_model_command(args: argparse.Namespace, settings: Settings) -> int:
    with Database(settings) as db, db.connect(autocommit=True) as conn:
        if args.image_command == "add":
            _print_added(registry.add(conn, args.path, name=args.name, kind=args.kind))
        elif args.image_command == "list":
            rows = registry.list_models(conn)
            if args.json:
                print(json.dumps(rows, default=str, indent=2))
            elif not rows:
                print("no image models: pgsynapse image-model add PATH")
            for r in [] if args.json else rows:
                print(f"{r['id']:>3}  {r['status']:<9} {r['kind']:<5} {r['dim']:>5}-d {r['runtime']:<5} "
                      f"{r['vectors']:>8} vectors  {r['name']}  ({r['artifact_path']})")
        elif args.image_command == "promote":
            r = registry.promote(conn, args.model)
            print(f"image model {r['active']} is the active {r['kind']} model (was {r['previous']})")
        elif args.image_command == "retire":
            n = registry.retire(conn, args.model)
            print(f"image model {args.model} retired, {n} vectors deleted")
        elif args.image_command == "export":
            return _export(conn, args, settings)
        elif args.image_command == "import-efficientnet":
            path = build_efficientnet(Path(args.dest))
            print(f"EfficientNet-Lite0 written to {path}")
            if not args.torch:
                # what serves is the ONNX runtime (4x faster one image at a time); checked on test patterns here,
                # since a fresh database may hold no image yet
                report = export_onnx(path, path.with_name(path.name + "-onnx"), sample=test_patterns())
                path = Path(report.path)
                print(f"ONNX runtime written to {path}: min cosine {report.min_cosine:.4f} to the TorchScript model")
            if not args.no_add:
                _print_added(registry.add(conn, path, name="efficientnet-lite0" + ("" if args.torch else "-onnx")))
    return 0


def _print_added(row: dict) -> None:
    print(f"image model {row['id']} ({row['kind']}, {row['dim']}-d, {row['runtime']}): {row['status']}; "
          f"{row['queued']} images queued for it")


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


def _export(conn, args: argparse.Namespace, settings: Settings) -> int:
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
    report = export_onnx(Path(row["artifact_path"]), dest, sample=sample, threshold=args.threshold)
    added = registry.add(conn, dest, name=f"{row['name']}-onnx")
    print(json.dumps(report.as_dict()))
    print(f"onnx: registered image model {added['id']} ({added['status']}): min cosine {report.min_cosine:.4f} over "
          f"{report.sample} images; `pgsynapse image-model promote {added['id']}` once it has embedded every image")
    return 0


def run_image_search(args: argparse.Namespace, settings: Settings) -> int:
    limits = ImageLimits.of(settings)
    models = ImageModelCache(threads=settings.torch_threads)
    if args.like_image:
        try:
            data = Path(args.like_image).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {args.like_image}: {exc.strerror or exc}") from None
    elif not args.text:
        raise PgsynapseError("search --images needs a text to search for")

    async def go(db: Database) -> list[ImageHit]:
        async with db.aconnect(autocommit=True) as conn:
            if args.like_image:
                return await search_by_image(conn, models, data, k=args.k, model=args.image_model, limits=limits)
            return await search_by_text(conn, models, args.text, k=args.k, model=args.image_model)

    with Database(settings) as db:
        hits = anyio.run(go, db)
    if not hits:
        print("no results: no image is embedded yet (is `pgsynapse run` running?)")
    for i, h in enumerate(hits, 1):
        where = h.source or f"image {h.image_id}"
        doc = f"  document {h.document_id}: {h.document_title}" if h.document_id else ""
        print(f"{i}. {h.score:.3f}  {where}  {h.width}x{h.height} {h.mime_type or ''}{doc}")
        if h.caption:
            print(textwrap.indent(textwrap.shorten(h.caption, 200), "   "))
    return 0
