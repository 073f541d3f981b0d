"""``pgsynapse ingest``: files and directories into ``pgsynapse.documents``, in batches via COPY.

Idempotent by content: a file whose ``md5(title || chr(30) || body)`` (the table's generated ``content_hash``)
is already stored is counted ``unchanged`` and not inserted again, so re-ingesting a tree inserts nothing.
A changed file is a new document, its old version kept (the summary counts them), unless ``replace``: then the
newest stored document of the same ``source`` is updated in place, keeps its id, and the update trigger embeds it
again; the source's other versions (kept by earlier runs without ``replace``) are deleted, and the images ingest
stored beside them (an application's are linked to the kept document), and a changed picture replaces the one
stored from its file. Opt-in, because a
source is the path relative to the directory given: two trees with a file of the same name share a source.
COPY fires the table's statement-level AFTER INSERT trigger like any INSERT: every new document gets its
``embed`` job and the worker is woken by one NOTIFY per batch.

Text, Markdown and HTML (tags stripped) always; PDF when the optional ``pypdf`` is installed. A file that
cannot be read as text (binary, neither UTF-8 nor the ``encoding`` given, corrupt PDF, empty), a link to a missing
file and a pipe or socket are skipped with their reason, never a crash or a wait.
Images (png, jpeg, webp, gif, bmp) go to ``pgsynapse.images``, linked to the document beside them
(:mod:`pgsynapse.images.ingest`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.rows import tuple_row
from tqdm import tqdm

from pgsynapse.db import EXPORT_COMMAND, command_exporting, starting_export, worker_takes, workers_take
from pgsynapse.errors import InputError, PgsynapseError
from pgsynapse.images.decode import EXTENSIONS as IMAGE_EXTENSIONS, read_bounded
from pgsynapse.images.ingest import FileImage, flush_images, is_image, lock_ingests
from pgsynapse.logs import get_logger
from pgsynapse.queries import q
from pgsynapse.textextract import html_to_text

log = get_logger(__name__)

FORMATS = {
    ".txt": "text", ".text": "text", ".rst": "text", ".md": "markdown", ".markdown": "markdown",
    ".html": "html", ".htm": "html", ".pdf": "pdf",
}
DOCUMENTS_CHANNEL = "pgsynapse_documents"
IMAGES_CHANNEL = "pgsynapse_images"


class FollowTimeout(PgsynapseError, TimeoutError):
    """``follow`` gave up waiting (the CLI prints it and exits 1)."""


class SkipFile(Exception):
    """This file is not ingestible; the message is the reason shown in the summary."""


@dataclass
class FileDoc:
    source: str
    title: str
    body: str
    format: str
    size: int

    @property
    def content_hash(self) -> str:
        """The same value as the generated column ``documents.content_hash``."""
        return hashlib.md5(f"{self.title}\x1e{self.body}".encode()).hexdigest()


@dataclass
class IngestReport:
    files: int = 0
    inserted: int = 0
    unchanged: int = 0
    replaced: int = 0  # stored documents updated with their file's new content (replace)
    same_source: int = 0  # inserted beside a stored document of the same source and other content (no replace)
    dropped: int = 0  # other versions of the files' sources deleted (replace)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason): not ingestible
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path as found, reason): could not be read
    hashes: list[str] = field(default_factory=list)  # of every ingestible file, new or already stored
    no_files: list[tuple[str, int]] = field(default_factory=list)  # (directory given, its hidden files): none read
    images: int = 0  # image files inserted
    images_linked: int = 0  # stored before the document beside them, linked to it now
    images_unchanged: int = 0
    images_replaced: int = 0  # older pictures of the image files deleted (replace)
    image_ids: list[int] = field(default_factory=list)  # the rows of the image files, for follow
    embedded: int | None = None  # set by follow
    embed_failed: int | None = None
    images_embedded: int | None = None  # set by follow when an image model serves
    images_failed: int | None = None

    def summary(self, limit: int = 20) -> str:
        replaced = f"{self.replaced} replaced, " if self.replaced else ""
        lines = [f"{self.files} file(s): {self.inserted} inserted, {replaced}{self.unchanged} unchanged (already "
                 f"stored), {len(self.skipped)} skipped, {len(self.failed)} failed"]
        for directory, hidden in self.no_files:
            why = (f"its {hidden} file(s) are hidden (a name or a directory that starts with a dot: left out)"
                   if hidden else "it has none")
            lines.append(f"no files to ingest in {shown_name(directory)}: {why}")
        if self.same_source:
            lines.append(f"{self.same_source} inserted file(s) have the source of a stored document with other "
                         "content: both versions are kept (--replace updates the stored one instead, and deletes the "
                         "versions kept)")
        if self.dropped:
            lines.append(f"{self.dropped} older version(s) of these files' sources deleted (--replace)")
        if self.images or self.images_linked or self.images_unchanged:
            linked = f", {self.images_linked} linked to a document" if self.images_linked else ""
            replaced = (f", {self.images_replaced} older picture(s) of these files deleted (--replace)"
                        if self.images_replaced else "")
            lines.append(f"images: {self.images} inserted{linked}, {self.images_unchanged} unchanged{replaced}")
        for title, items in (("skipped", self.skipped), ("failed", self.failed)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  {shown_name(source)}: {reason}" for source, reason in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        if self.embedded is not None:
            lines.append(f"embedded: {self.embedded}, embedding failed: {self.embed_failed}")
        if self.images_embedded is not None:
            lines.append(f"images embedded: {self.images_embedded}, failed: {self.images_failed}")
        return "\n".join(lines)


def shown_name(name: str) -> str:
    """A file name as it can be printed: a byte that is not UTF-8 (kept by Python's surrogateescape) as ``\\xe9``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _require_utf8_name(source: str) -> None:
    """Skip a file whose name (its ``source``) is not UTF-8: PostgreSQL cannot store it (it ended the whole ingest
    in a UnicodeEncodeError)."""
    try:
        source.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = os.fsencode(source[exc.start])[0]
        raise SkipFile(f"its name is not UTF-8 (byte 0x{byte:02x}): rename it, PostgreSQL stores sources as UTF-8 "
                       "text") from None


def discover(paths: Iterable[str | Path]) -> Iterator[tuple[Path, str]]:
    """``(file, source)``: a directory's files (hidden ones left out) with sources relative to it; a file by name.
    A broken link, a link to a directory (not followed: it may loop), a pipe or a socket is yielded too, for the
    report to say what it is."""
    for raw in paths:
        root = Path(raw)
        if root.is_dir():
            for f in sorted(root.rglob("*")):
                rel = f.relative_to(root)
                if any(part.startswith(".") for part in rel.parts) or (f.is_dir() and not f.is_symlink()):
                    continue
                yield f, rel.as_posix()
        else:
            yield root, root.name


# why a file that is not empty gave no text, by format
NO_TEXT = {"pdf": "no text in it: a PDF without a text layer (scanned pages?): make it searchable (OCR) first",
           "html": "no text in it: markup only (the page's text may come from scripts)"}


def read_document(path: Path, source: str, *, max_chars: int | None = None, encoding: str | None = None,
                  max_file_bytes: int | None = None) -> FileDoc:
    """Read and extract one file. Raises :class:`SkipFile` (with the reason) or ``OSError``. A text file is read as
    UTF-8, else as ``encoding`` when one is given (the files of a Windows or Latin-1 tree). An HTML or PDF file over
    ``max_file_bytes`` (the setting ``max_document_file_bytes``) is refused by its size, without a read."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SkipFile(f"unsupported file type {path.suffix.lower() or '(no extension)'}")
    if fmt in TEXT_FORMATS:
        data = _read_text(path, max_chars) if max_chars is not None else path.read_bytes()
    else:
        data = _read_file(path, max_file_bytes) if max_file_bytes is not None else path.read_bytes()
    if fmt == "pdf":
        title, body = _pdf_text(data)
    else:
        if b"\x00" in data:
            raise SkipFile("binary content (NUL bytes), not text")
        text = _decode(data, encoding)
        if fmt == "html":
            title, body = html_to_text(text)
        elif fmt == "markdown":
            m = re.search(r"^#\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
            title, body = (m.group(1) if m else ""), text.strip()
        else:
            title, body = "", text.strip()
    if not body.strip():
        raise SkipFile(NO_TEXT.get(fmt, "no text in it (white space only)") if data.strip() else
                       "no text in it (empty)")
    if max_chars is not None and len(body) > max_chars:
        raise SkipFile(f"{len(body):,} characters, over max_document_chars={max_chars:,}")
    return FileDoc(source, title.strip() or path.stem, body, fmt, len(data))


# the formats whose body is the file's text (stripped): never more characters than the file has
TEXT_FORMATS = {"text", "markdown"}
UTF8_MAX = 4  # bytes of one character at most in UTF-8 (and in the single- and double-byte encodings)
BOM = 3  # bytes of UTF-8's byte-order mark, which is no character


def _read_text(path: Path, max_chars: int) -> bytes:
    """The bytes of a text file that may hold at most ``max_chars`` characters: one of more than ``UTF8_MAX`` bytes
    per character (a byte-order mark aside) holds more whatever its encoding, and is refused by its size without a
    read."""
    data, size, grew = _read_at_most(path, UTF8_MAX * max_chars + BOM)
    if data is not None:
        return data
    # ceil((size - BOM) / UTF8_MAX) characters at least: size // UTF8_MAX, over max_chars
    raise SkipFile(f"at least {size // UTF8_MAX:,} characters ({size:,} bytes{grew}), over "
                   f"max_document_chars={max_chars:,}")


def _read_file(path: Path, limit: int) -> bytes:
    """The bytes of an HTML or PDF file of at most ``limit`` bytes: one larger is refused by its size without a read
    (its size says nothing of its text's length, but it would be read and parsed whole)."""
    data, size, grew = _read_at_most(path, limit)
    if data is not None:
        return data
    raise SkipFile(f"{size:,} bytes{grew}, over max_document_file_bytes={limit:,} (an HTML or PDF file is refused by "
                   "its size: raise PGSYNAPSE_MAX_DOCUMENT_FILE_BYTES to ingest it)")


def _read_at_most(path: Path, limit: int) -> tuple[bytes | None, int, str]:
    """``(data, size, "")`` for a file of at most ``limit`` bytes; else ``(None, size, grew)``, unread when its size
    is over the limit, and never more than ``limit + 1`` bytes read (a file that grows meanwhile: ``grew`` says so)."""
    size = path.stat().st_size
    if size > limit:
        return None, size, ""
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) <= limit:
        return data, len(data), ""
    return None, len(data), " or more: it grew while it was read"


def _decode(data: bytes, encoding: str | None) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        not_utf8 = f"not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset {exc.start})"
    if encoding is None:
        raise SkipFile(f"{not_utf8}: give its encoding with --encoding (cp1252, latin-1, ...)")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise SkipFile(f"{not_utf8}, nor {encoding} (invalid byte 0x{data[exc.start]:02x} at offset "
                       f"{exc.start})") from None


def _pdf_text(data: bytes) -> tuple[str, str]:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise SkipFile("PDF support is not installed: pip install 'pgsynapse[pdf]'") from None
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = (reader.metadata.title if reader.metadata else None) or ""
    except Exception as exc:  # noqa: BLE001 - pypdf raises many types on a damaged file
        raise SkipFile(f"unreadable PDF ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    return str(meta_title), "\n\n".join(p.strip() for p in pages).replace("\x00", "").strip()


def ingest(
    conn: psycopg.Connection,
    paths: Iterable[str | Path],
    *,
    batch_files: int = 200,
    batch_chars: int = 8_000_000,
    max_chars: int | None = None,
    max_file_bytes: int | None = None,
    max_image_bytes: int = 20 * 1024 * 1024,
    progress: bool | None = None,
    replace: bool = False,
    encoding: str | None = None,
) -> IngestReport:
    """Load ``paths`` into ``documents`` (see the module docstring). ``progress=None`` shows a bar on a TTY;
    ``replace`` updates the stored document of a changed file's source instead of adding one; ``encoding`` reads
    the text files that are not UTF-8; ``max_chars`` and ``max_file_bytes``: the settings ``max_document_chars`` and
    ``max_document_file_bytes`` (None: no limit)."""
    report = IngestReport()
    files: list[tuple[Path, str]] = []
    for raw in paths:
        found = list(discover([raw]))
        if not found and Path(raw).is_dir():  # said so: "0 file(s)" alone read as if all were stored before
            report.no_files.append((str(raw), sum(1 for f in Path(raw).rglob("*") if not f.is_dir())))
        files += found
    report.files = len(files)
    batch: list[FileDoc] = []
    images: list[FileImage] = []
    doc_sources: set[str] = set()
    with tqdm(total=len(files), unit="file", desc="ingest", disable=None if progress is None else not progress) as bar:
        for path, source in files:
            try:
                _require_utf8_name(source)
                if path.is_symlink() and not path.exists():
                    raise SkipFile(f"a link to a missing file ({os.readlink(path)})")
                if path.is_dir():  # inside a tree: its files were left out without a word
                    raise SkipFile("a link to a directory, not followed: give the directory itself as a PATH to "
                                   "ingest it")
                # a path that is not there fails as missing, whatever its name says its type is
                if not stat.S_ISREG(path.stat().st_mode):
                    raise SkipFile("not a regular file (a pipe, socket or device)")  # reading a pipe would wait
                if is_image(path.suffix):
                    images.append(read_image(path, source, max_image_bytes))
                else:
                    batch.append(read_document(path, source, max_chars=max_chars, encoding=encoding,
                                                       max_file_bytes=max_file_bytes))
                    doc_sources.add(source)
            except SkipFile as exc:
                report.skipped.append((source, str(exc)))
            except OSError as exc:
                report.failed.append((str(path), exc.strerror or str(exc)))  # where it is, to go and look
            if len(batch) >= batch_files or sum(len(d.body) for d in batch) >= batch_chars:
                _flush(conn, batch, report, replace)
                batch = []
            bar.update()
            bar.set_postfix(inserted=report.inserted, unchanged=report.unchanged, skipped=len(report.skipped))
            if sum(len(im.data) for im in images) >= batch_chars:  # documents first: images link to them
                _flush(conn, batch, report, replace)
                batch = []
                _flush_images(conn, images, doc_sources, report, replace)
                images = []
        _flush(conn, batch, report, replace)
        _flush_images(conn, images, doc_sources, report, replace)
    log.info("ingest_finished", files=report.files, inserted=report.inserted, replaced=report.replaced,
             unchanged=report.unchanged, dropped=report.dropped,
             images=report.images, images_linked=report.images_linked, images_unchanged=report.images_unchanged,
             images_replaced=report.images_replaced,
             skipped=len(report.skipped), failed=len(report.failed))
    return report


def read_image(path: Path, source: str, max_bytes: int) -> FileImage:
    """An image file's bytes, at most ``max_bytes``: never more is read (a file that grows while it is read)."""
    size = path.stat().st_size
    if size > max_bytes:
        raise SkipFile(f"image of {size:,} bytes, over max_image_bytes={max_bytes:,}")
    try:
        data = read_bounded(path, max_bytes)
    except InputError as exc:
        raise SkipFile(f"image: {exc}") from None
    return FileImage(source, data, IMAGE_EXTENSIONS[path.suffix.lower()])


def _flush_images(conn: psycopg.Connection, images: list[FileImage], doc_sources: set[str], report: IngestReport,
                  replace: bool) -> None:
    done, ids = flush_images(conn, images, doc_sources, replace)
    report.images += done.inserted
    report.images_linked += done.linked
    report.images_unchanged += done.unchanged
    report.images_replaced += done.replaced
    report.image_ids += ids


def _flush(conn: psycopg.Connection, batch: list[FileDoc], report: IngestReport, replace: bool) -> None:
    if not batch:
        return
    with conn.transaction():
        lock_ingests(conn)  # one ingest at a time decides what is new
        hashes = [d.content_hash for d in batch]
        cur = conn.cursor(row_factory=tuple_row)
        seen = {r[0] for r in cur.execute(q("existing_hashes", "ops.sql"), {"hashes": hashes})}
        new: list[FileDoc] = []
        for d, h in zip(batch, hashes, strict=True):
            report.hashes.append(h)
            if h in seen:
                report.unchanged += 1
            else:
                seen.add(h)
                new.append(d)
        stored = {r[0]: r[1] for r in cur.execute(q("documents_by_source", "ops.sql"),
                                                   {"sources": [d.source for d in new]})} if new else {}
        if replace:
            updates = [d for d in new if d.source in stored]
            new = [d for d in new if d.source not in stored]
            cur.executemany(q("replace_document", "ops.sql"), [
                {"id": stored[d.source], "title": d.title, "body": d.body, "metadata": _metadata(d)} for d in updates])
            report.replaced += len(updates)
        else:
            report.same_source += sum(d.source in stored for d in new)
        if new:
            with conn.cursor().copy(q("copy_documents", "ops.sql")) as copy:
                for d in new:
                    copy.write_row((d.source, d.title, d.body, _metadata(d)))
        if replace:  # the versions a run without --replace kept beside the file, their images to the file's
            files = {"sources": [d.source for d in batch], "hashes": hashes}
            cur.execute(q("move_images_of_other_versions", "ops.sql"), files)
            report.dropped += cur.execute(q("drop_other_versions", "ops.sql"), files).rowcount
    report.inserted += len(new)
    log.debug("ingest_batch_copied", n=len(new), batch=len(batch))


def _metadata(d: FileDoc) -> str:
    return json.dumps({"format": d.format, "bytes": d.size})


def follow(conn: psycopg.Connection, report: IngestReport, *, progress: bool | None = None,
           timeout: float | None = None, note: Callable[[str], None] | None = None) -> IngestReport:
    """Wait until every ingested document (new or already stored) is embedded or failed, re-checking on each
    ``pgsynapse_documents`` NOTIFY; then the same for images, when an image model serves (without one they wait
    for it). ``conn`` must be in autocommit mode. ``timeout`` None waits for ever. ``note`` is told, before the
    wait, when no running worker takes the jobs waited for (:func:`worker_note`)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    cur = conn.cursor(row_factory=tuple_row)
    ids = [r[0] for r in cur.execute(q("documents_by_hash", "ops.sql"), {"hashes": list(set(report.hashes))})]
    report.embedded, report.embed_failed = _wait(conn, ids, q("follow_progress", "ops.sql"), DOCUMENTS_CHANNEL,
                                                 "document", progress, deadline, timeout, note)
    if report.image_ids and cur.execute(q("image_models_serving", "images.sql")).fetchone():
        ids = sorted(set(report.image_ids))
        report.images_embedded, report.images_failed = _wait(
            conn, ids, q("follow_images", "images.sql"), IMAGES_CHANNEL, "image", progress, deadline, timeout, note)
    return report


# the job kind that embeds each unit ``follow`` waits for
EMBED_KINDS = {"document": "embed", "image": "embed_image"}


def worker_note(conn: psycopg.Connection, unit: str) -> str | None:
    """What to tell someone about to wait for ``unit``s (document, image) to be embedded when no running worker
    takes their jobs (none listening, or those seen lately run other kinds), else None. A worker starting (its
    first start's export, before it registers: :func:`~pgsynapse.db.worker_starting`) is waited for, as one that
    will take them; so is one waiting for `pgsynapse model export --switch`'s export. That command's export with no
    worker is said as it is: it embeds nothing."""
    kind = EMBED_KINDS[unit]
    if worker_takes(conn, kind):
        return None
    waiting = f"(waiting; Ctrl-C stops waiting, the {unit}s stay stored)"
    export = starting_export(conn)
    if export is not None and export["by"] == "worker":
        return (f"a worker is starting: it exports a model version to its runtime first (minutes on a small host: "
                f"`pgsynapse status`), then embeds the {unit}s if it runs {kind} jobs {waiting}")
    if export is not None and export["workers_waiting"]:
        return (f"a worker is starting: it waits for {EXPORT_COMMAND} to export a model version to its runtime "
                f"first (minutes on a small host: `pgsynapse status`), then embeds the {unit}s if it runs {kind} jobs "
                f"{waiting}")
    if export is not None:
        return (f"no running worker takes {kind} jobs, and {command_exporting(export)}: the {unit}s are embedded "
                f"once `pgsynapse run` starts, which waits for that export first {waiting}")
    return f"no running worker takes {kind} jobs: the {unit}s are embedded once `pgsynapse run` starts {waiting}"


def _not_yet(conn: psycopg.Connection, unit: str) -> str:
    """Why ``unit``s are still pending when ``--follow`` gives up: a worker starting, running, or none."""
    again = "follow them again later, `pgsynapse ingest --follow` of the same files inserts nothing new"
    export = starting_export(conn)
    if export is not None and export["by"] == "worker":
        return f"a worker is still starting (exporting a model version to its runtime): {again}"
    if export is not None and export["workers_waiting"]:
        return f"a worker is still starting (waiting for {EXPORT_COMMAND}'s export of a model version): {again}"
    listening, seen, taking = conn.cursor(row_factory=tuple_row).execute(
        q("workers_answering", "ops.sql"), {"kind": EMBED_KINDS[unit]}).fetchone()
    if not workers_take(listening, seen, taking):
        return "is `pgsynapse run` running?"
    who, does = ((f"{taking} running workers embed them but have", "one does") if taking > 1
                 else ("1 running worker embeds them but has", "it does"))
    return (f"{who} not come to them yet (a queue ahead of them, or slower than that: `pgsynapse status`); they are "
            f"embedded when {does}: {again}")


def _wait(conn: psycopg.Connection, ids: list[int], progress_sql: str, channel: str, unit: str,
          progress: bool | None, deadline: float | None, timeout: float | None,
          note: Callable[[str], None] | None = None) -> tuple[int, int]:
    """Wait until none of ``ids`` is pending; ``progress_sql`` counts (embedded, failed, pending)."""
    cur = conn.cursor(row_factory=tuple_row)
    conn.execute(f"LISTEN {channel}")
    with tqdm(total=len(ids), unit=unit, desc="embed", disable=None if progress is None else not progress) as bar:
        while True:
            row = cur.execute(progress_sql, {"ids": ids}).fetchone()
            embedded, failed, pending = row if row else (0, 0, 0)
            bar.update(embedded + failed - bar.n)
            if not pending:
                break
            if note is not None and (why := worker_note(conn, unit)):
                note(why)
            note = None  # said once, before the first wait
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise FollowTimeout(f"{pending} {unit}(s) still pending after {timeout}s: {_not_yet(conn, unit)}")
            # a NOTIFY re-checks at once; the cap re-checks now and then in case one was missed
            for _ in conn.notifies(timeout=min(5.0, left) if left is not None else 5.0, stop_after=1):
                pass
    conn.execute(f"UNLISTEN {channel}")
    return embedded, failed
