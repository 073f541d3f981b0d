"""The image half of ``pgsynapse ingest``: png, jpeg, webp, gif and bmp files beside the documents.

An image is stored by its bytes (``images.data``, so the worker needs no access to the files) and linked to the
document it sits beside: the document file in the same directory whose name (without extension) is the image's,
or a prefix of it followed by ``-``, ``_`` or ``.`` (``guide.md`` <- ``guide.png``, ``guide-1.webp``,
``guide_fig2.jpg``); the longest such name wins. Idempotent by content (``md5(data)``, the table's
``content_hash``) and link: the same picture beside two documents is stored for each (:func:`flush_images`).
The worker checks the content (type, size, dimensions); ingest only refuses files over ``max_image_bytes``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import PurePosixPath

import psycopg
from psycopg.rows import tuple_row

from pgsynapse.db import take_xact_lock
from pgsynapse.images.decode import EXTENSIONS
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger("pgsynapse.ingest")


def lock_ingests(conn: psycopg.Connection) -> None:
    """In the transaction open on ``conn``, the lock that makes ingests store their batches (documents' and
    images') one at a time, so that two concurrent runs never insert the same content twice; a wait of more than a
    moment says so (another ingest's batch, or a transaction that holds the lock and does not end)."""
    take_xact_lock(conn, q("ingest_lock", "ops.sql"), {}, waiting=lambda: log.info(
        "ingest_waiting", note="another `pgsynapse ingest` is storing a batch in this database: waiting for it to "
        "commit (pg_locks shows who holds the advisory lock)"))


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


@dataclass
class ImageFlush:
    inserted: int = 0
    linked: int = 0  # stored before the document beside them was, linked to it now
    unchanged: int = 0
    replaced: int = 0  # older pictures of the same files deleted (replace)


def flush_images(conn: psycopg.Connection, images: list[FileImage], document_sources: set[str],
                 replace: bool = False) -> tuple[ImageFlush, list[int]]:
    """Store the images not stored yet (one COPY: one trigger run, one NOTIFY); returns the counts and the ids of
    the rows of them all (new, linked or unchanged: what ``ingest --follow`` waits for, and no other row of the same
    bytes). An image is stored when no row has its content and the document it sits beside: the same picture
    beside two documents is a row for each, and an image stored unlinked, of the same source, is linked to the
    document written beside it since (an UPDATE of the link alone: it is not embedded again). ``replace``: the
    pictures stored from these files before, of another content, are deleted (a changed picture replaces its old
    one, which stayed linked to the document beside it)."""
    done = ImageFlush()
    if not images:
        return done, []
    cur = conn.cursor(row_factory=tuple_row)
    hashes = [im.content_hash for im in images]
    with conn.transaction():
        lock_ingests(conn)
        beside = {im.source: document_for(im.source, document_sources) for im in images}
        wanted = sorted({s for s in beside.values() if s})
        doc_ids = dict(cur.execute(q("documents_by_source", "images.sql"), {"sources": wanted}).fetchall()) if wanted else {}
        if replace:
            done.replaced = cur.execute(q("delete_replaced_images", "images.sql"), {
                "sources": [im.source for im in images], "hashes": hashes,
                "documents": [doc_ids.get(beside[im.source]) for im in images]}).rowcount
        stored = cur.execute(q("stored_images_by_hash", "images.sql"), {"hashes": hashes}).fetchall()
        # each file's row: its id, or for a row copied below, its (content, source, document)
        have: dict[tuple[str, int | None], int | tuple[str, str, int | None]] = {
            (h, doc): image_id for image_id, h, _, doc in stored}
        unlinked = {(h, src): image_id for image_id, h, src, doc in stored if doc is None}
        new: list[tuple[FileImage, int | None]] = []
        rows: list[int | tuple[str, str, int | None]] = []
        for im, h in zip(images, hashes, strict=True):
            doc = doc_ids.get(beside[im.source])
            if (h, doc) in have:
                done.unchanged += 1
            elif doc is not None and (image_id := unlinked.pop((h, im.source), None)) is not None:
                cur.execute(q("link_image", "images.sql"), {"id": image_id, "document_id": doc})
                done.linked += 1
                have[(h, doc)] = image_id
            else:
                have[(h, doc)] = (h, im.source, doc)
                new.append((im, doc))
            rows.append(have[(h, doc)])
        copied: dict[tuple[str, str, int | None], int] = {}
        if new:
            with conn.cursor().copy(q("copy_images", "images.sql")) as copy:
                for im, doc in new:
                    copy.write_row((im.data, im.source, im.mime_type, doc, json.dumps({"bytes": len(im.data)})))
            # the rows just copied: the newest of each content, source and document (the ingest lock is held)
            copied = {(h, src, doc): image_id for image_id, h, src, doc in cur.execute(
                q("stored_images_by_hash", "images.sql"), {"hashes": [im.content_hash for im, _ in new]})}
        done.inserted = len(new)
    return done, [r if isinstance(r, int) else copied[r] for r in rows]
