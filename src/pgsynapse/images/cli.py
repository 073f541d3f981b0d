"""The image commands behind the CLI: ``image-model add|list|promote|retire`` and ``search --images`` /
``search --like-image``."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import anyio

from pgsynapse.config import Settings
from pgsynapse.db import Database
from pgsynapse.errors import InputError
from pgsynapse.images import registry
from pgsynapse.images.decode import ImageLimits, read_bounded
from pgsynapse.images.encoders import ImageModelCache
from pgsynapse.images.search import ImageHit, search_by_image, search_by_text
from pgsynapse.jsonout import dumps as json_dumps


def run_image_model_command(args: argparse.Namespace, settings: Settings) -> int:
    with Database(settings) as db, db.connect(autocommit=True) as conn:
        if args.image_command == "add":
            _print_added(registry.add(conn, args.path, name=args.name, kind=args.kind))
        elif args.image_command == "list":
            rows = registry.list_models(conn)
            if args.json:
                print(json_dumps(rows, indent=2))
            elif not rows:
                print("no image models: pgsynapse image-model add PATH")
            for r in [] if args.json else rows:
                print(f"{r['id']:>3}  {r['status']:<9} {r['kind']:<5} {r['dim']:>5}-d {r['runtime']:<5} "
                      f"{r['vectors']:>8} vectors  {r['name']}  ({r['artifact_path']})")
        elif args.image_command == "promote":
            r = registry.promote(conn, args.model)
            was = f"was {r['previous']}" if r["previous"] else "the first active one of its kind"
            print(f"image model {r['active']} is the active {r['kind']} model ({was})")
        elif args.image_command == "retire":
            kind = registry.get(conn, args.model)["kind"]
            n = registry.retire(conn, args.model)
            print(f"image model {args.model} retired, {n} vectors deleted")
            left = registry.serving(conn)
            if not left:
                print("no image model is left: new images are not embedded, they wait (pending) until "
                      "`pgsynapse image-model add PATH` queues them all")
            elif kind == "clip" and not any(m["kind"] == "clip" for m in left):
                print("no CLIP model is left: a search by text (search --images) needs one: pgsynapse image-model "
                      "add PATH --kind clip")
            elif kind == "image" and not any(m["kind"] == "image" for m in left):
                print("no image encoder is left: searches by example (search --like-image) use the active CLIP model")
        elif args.image_command in ("export", "import-efficientnet"):
            # these two read a torch model and trace it to ONNX: only they import torch and transformers (2.5 s,
            # 300 MB), not `image-model list` or a search (tests/e2e/test_footprint.py). Deferred on purpose, not
            # a cycle
            from pgsynapse.images import convert

            if args.image_command == "export":
                return convert.export(conn, args, settings)
            path, name = convert.import_efficientnet(Path(args.dest), onnx=not args.torch)
            if not args.no_add:
                _print_added(registry.add(conn, path, name=name))
    return 0


def _print_added(row: dict) -> None:
    print(f"image model {row['id']} ({row['kind']}, {row['dim']}-d, {row['runtime']}): {row['status']}; "
          f"{row['queued']} images queued for it")


def run_image_search(args: argparse.Namespace, settings: Settings) -> int:
    limits = ImageLimits.of(settings)
    models = ImageModelCache(threads=settings.torch_threads, data_dir=settings.data_dir)
    # options that contradict each other were refused with the command line (cli_args.search_args_problem)
    if args.like_image:
        try:  # at most max_image_bytes read, and no pipe or device: neither would end
            data = read_bounded(args.like_image, limits.max_bytes)
        except InputError as exc:
            raise InputError(f"cannot search like {args.like_image}: {exc}") from None
        except OSError as exc:
            raise InputError(f"cannot read {args.like_image}: {exc.strerror or exc}") from None
    elif not args.text.strip():
        raise InputError("search --images needs a text to search for")

    async def go(db: Database) -> list[ImageHit]:
        async with db.aconnect(autocommit=True) as conn:
            if args.like_image:
                return await search_by_image(conn, models, data, k=args.k, model=args.image_model, limits=limits)
            return await search_by_text(conn, models, args.text, k=args.k, model=args.image_model,
                                        max_chars=settings.max_question_chars)

    with Database(settings) as db:
        try:
            hits = anyio.run(go, db)
        except InputError as exc:  # the example is no image (decode's refusals): which file
            if not args.like_image:
                raise
            raise InputError(f"cannot search like {args.like_image}: {exc}") from None
    if not hits:
        print("no results: no image is embedded yet (is `pgsynapse run` running?)")
    for i, h in enumerate(hits, 1):
        where = h.source or f"image {h.image_id}"
        doc = f"  document {h.document_id}: {h.document_title}" if h.document_id else ""
        print(f"{i}. {h.score:.3f}  {where}  {h.width}x{h.height} {h.mime_type or ''}{doc}")
        if h.caption:
            print(textwrap.indent(textwrap.shorten(h.caption, 200), "   "))
    return 0
