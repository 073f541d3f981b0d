"""The image half of ``pgsynapse ingest``: png, jpeg and webp files beside the documents.

An image is stored by its bytes (``images.data``, so the worker needs no access to the files), idempotent by
content (``md5(data)``, the table's ``content_hash``), and linked to the document it sits beside: the document
file in the same directory whose name (without extension) is the image's, or a prefix of it followed by ``-``,
``_`` or ``.`` (``guide.md`` <- ``guide.png``, ``guide-1.webp``, ``guide_fig2.jpg``); the longest such name wins.
The worker checks the content (type, size, dimensions); ingest only refuses files over ``max_image_bytes``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import PurePosixPath

import psycopg
from psycopg.rows import tuple_row

from pgsynapse.images.decode import EXTENSIONS
from pgsynapse.queries import q


@dataclass
class FileImage:
    source: str
    data: bytes
    mime_type: str

    @property
    def content_hash(self) -> str:
        """The same value as the generated column ``images.content_hash``."""
        return hashlib.md5(self.data).hexdigest()


def is_image(suffix: str) -> bool:
    return suffix.lower() in EXTENSIONS


def document_for(image_source: str, document_sources: set[str]) -> str | None:
    """The source of the document ``image_source`` sits beside (see the module docstring), if any."""
    img = PurePosixPath(image_source)
    best: str | None = None
    for src in document_sources:
        doc = PurePosixPath(src)
        if doc.parent != img.parent:
            continue
        stem = doc.stem
        if img.stem == stem or (img.stem.startswith(stem) and img.stem[len(stem)] in "-_."):
            if best is None or len(stem) > len(PurePosixPath(best).stem):
                best = src
    return best


def flush_images(conn: psycopg.Connection, images: list[FileImage], document_sources: set[str]) -> tuple[int, int, list[str]]:
    """Insert the images not stored yet (one COPY: one trigger run, one NOTIFY). Returns (inserted, unchanged,
    hashes of them all)."""
    if not images:
        return 0, 0, []
    cur = conn.cursor(row_factory=tuple_row)
    hashes = [im.content_hash for im in images]
    with conn.transaction():
        conn.execute(q("ingest_lock", "ops.sql"))
        seen = {r[0] for r in cur.execute(q("existing_image_hashes", "images.sql"), {"hashes": hashes})}
        new = []
        for im, h in zip(images, hashes, strict=True):
            if h not in seen:
                seen.add(h)
                new.append(im)
        linked = {im.source: document_for(im.source, document_sources) for im in new}
        wanted = sorted({s for s in linked.values() if s})
        doc_ids = dict(cur.execute(q("documents_by_source", "images.sql"), {"sources": wanted}).fetchall()) if wanted else {}
        if new:
            with conn.cursor().copy(q("copy_images", "images.sql")) as copy:
                for im in new:
                    copy.write_row((im.data, im.source, im.mime_type, doc_ids.get(linked[im.source]),
                                    json.dumps({"bytes": len(im.data)})))
    return len(new), len(images) - len(new), hashes
