"""`pgsynapse ingest`: a mixed tree in via COPY once, a second run inserts nothing, bad files skipped with reasons."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import anyio
import psycopg
import pytest

from pgsynapse.cli import main
from pgsynapse.export import EXPORT_LOCK
from pgsynapse.ingest import SkipFile, follow, ingest, read_document
from pgsynapse.images import registry
from pgsynapse.images.ingest import document_for
from pgsynapse.db import take_xact_lock
from tests.helpers import fast_settings, kill_and_see_its_backend_end, running_worker
from tests.image_models import coloured_image, png_bytes

SENTENCE = "Write-ahead logging keeps the database consistent after a crash by replaying the log."


def _pdf(text: str) -> bytes:
    """A minimal valid one-page PDF showing ``text`` (offsets computed, so no reader has to repair it)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "guide").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "notes.txt").write_text(f"{SENTENCE}\nCheckpoints bound the replay.\n")
    (root / "guide" / "vacuum.md").write_text("# Routine Vacuuming\n\nVACUUM reclaims storage held by dead tuples.\n")
    (root / "guide" / "index.html").write_text(
        "<html><head><title>Index Types</title><style>p{color:red}</style><script>var x = '<b>';</script></head>"
        "<body><h1>Index Types</h1><p>B-tree, <b>hash</b>, GiST &amp; GIN.</p></body></html>")
    (root / "manual.pdf").write_bytes(_pdf("Streaming replication ships WAL records to standbys."))
    (root / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\n\x00\x01garbage")
    (root / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    (root / "latin1.md").write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "empty.txt").write_text("   \n")
    (root / "photo.png").write_bytes(b"\x89PNG\r\n")
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgsynapse", "--database-url", url, "ingest", "--no-progress", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def _cli_here(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """:func:`_cli`'s command in this process: the command's output without a new interpreter's imports (seconds
    each); test_ingest_mixed_tree_once_then_nothing runs the command in its own process."""
    capsys.readouterr()
    try:
        code = main(["--database-url", url, "ingest", "--no-progress", *args])
    except SystemExit as exited:  # a usage error: argparse's exit 2
        code = exited.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["pgsynapse", "ingest", *args], code, out, err)


def test_ingest_mixed_tree_once_then_nothing(db_url, tree):
    first = _cli(db_url, str(tree))
    assert first.returncode == 0, first.stderr
    assert "9 file(s): 4 inserted, 0 unchanged (already stored), 4 skipped, 0 failed" in first.stdout, first.stdout
    assert "images: 1 inserted, 0 unchanged" in first.stdout  # photo.png: the worker judges its content
    reasons = dict(line.strip().split(": ", 1) for line in first.stdout.splitlines() if line.startswith("  "))
    assert reasons["blob.txt"] == "binary content (NUL bytes), not text"
    assert reasons["broken.pdf"].startswith("unreadable PDF")
    assert reasons["latin1.md"].startswith("not UTF-8 text (invalid byte 0xe9")
    assert reasons["empty.txt"] == "no text in it (empty)"
    assert reasons["empty.txt"] and "guide/.git" not in first.stdout and ".git/HEAD" not in first.stdout

    with psycopg.connect(db_url, autocommit=True) as conn:
        docs = {r[0]: r[1:] for r in conn.execute(
            "SELECT source, title, body, metadata->>'format' FROM pgsynapse.documents ORDER BY source")}
        assert sorted(docs) == ["guide/index.html", "guide/vacuum.md", "manual.pdf", "notes.txt"]
        assert docs["guide/vacuum.md"][0] == "Routine Vacuuming"
        title, body, fmt = docs["guide/index.html"]
        assert (title, fmt) == ("Index Types", "html")
        assert "B-tree, hash, GiST & GIN." in body and "<" not in body and "color" not in body and "var x" not in body
        assert "Streaming replication ships WAL records" in docs["manual.pdf"][1]
        assert docs["notes.txt"][0] == "notes" and SENTENCE in docs["notes.txt"][1]
        # COPY fired the statement-level AFTER INSERT trigger: one embed job per new document
        jobs = conn.execute("SELECT count(*) FROM pgsynapse.jobs WHERE kind = 'embed' AND status = 'pending'").fetchone()
        assert jobs == (4,)

    second = _cli(db_url, str(tree), str(tree / "notes.txt"))
    assert second.returncode == 0, second.stderr
    assert "10 file(s): 0 inserted, 5 unchanged (already stored), 4 skipped, 0 failed" in second.stdout, second.stdout
    assert "images: 0 inserted, 1 unchanged" in second.stdout
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT content_hash) FROM pgsynapse.documents").fetchone() == (4, 4)
        assert conn.execute("SELECT count(*) FROM pgsynapse.jobs").fetchone() == (5,)  # 4 embed, 1 embed_image


def test_a_broken_link_or_a_pipe_is_skipped_saying_what_it_is(db_url, tmp_path):
    # before: a directory's broken link and pipe were left out without a word, and a pipe named on the command
    # line blocked the ingest until something wrote to it
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "good.txt").write_text(SENTENCE)
    (tmp_path / "docs" / "gone.md").symlink_to("moved-away.md")
    os.mkfifo(tmp_path / "docs" / "pipe.txt")
    os.mkfifo(tmp_path / "named.md")
    out = _cli(db_url, str(tmp_path / "docs"), str(tmp_path / "named.md"))
    assert out.returncode == 0, out.stderr
    assert "4 file(s): 1 inserted, 0 unchanged (already stored), 3 skipped, 0 failed" in out.stdout, out.stdout
    reasons = dict(line.strip().split(": ", 1) for line in out.stdout.splitlines() if line.startswith("  "))
    assert reasons == {"gone.md": "a link to a missing file (moved-away.md)",
                       "pipe.txt": "not a regular file (a pipe, socket or device)",
                       "named.md": "not a regular file (a pipe, socket or device)"}, out.stdout


def test_a_link_to_a_directory_inside_a_tree_is_skipped_saying_so(db_url, tmp_path, capsys):
    # a tree's link to a directory (shared docs linked in) is not followed (a link back to the tree would loop): its
    # files were left out without a word ("1 file(s)")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "guide.md").write_text(SENTENCE)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "good.txt").write_text(SENTENCE)
    (tmp_path / "docs" / "shared").symlink_to(tmp_path / "shared")
    (tmp_path / "docs" / "loop").symlink_to(tmp_path / "docs")
    out = _cli_here(capsys, db_url, str(tmp_path / "docs"))
    assert out.returncode == 0, out.stderr
    assert "3 file(s): 1 inserted, 0 unchanged (already stored), 2 skipped, 0 failed" in out.stdout, out.stdout
    reasons = dict(line.strip().split(": ", 1) for line in out.stdout.splitlines() if line.startswith("  "))
    said = "a link to a directory, not followed: give the directory itself as a PATH to ingest it"
    assert reasons == {"loop": said, "shared": said}, out.stdout


def test_a_file_whose_name_is_not_utf8_is_skipped_saying_so(db_url, tmp_path, capsys):
    # before: its source (the name) reached psycopg, and the whole ingest ended in a traceback,
    # "UnicodeEncodeError: 'utf-8' codec can't encode character '\udcfe' ...: surrogates not allowed"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "good.txt").write_text(SENTENCE)
    with open(os.fsencode(tmp_path / "docs") + b"/caf\xe9.md", "w") as f:  # a name written in Latin-1
        f.write("# Caf\u00e9\n\nThe text is UTF-8; the name is not.")
    out = _cli_here(capsys, db_url, str(tmp_path / "docs"))
    assert out.returncode == 0, out.stderr
    assert "2 file(s): 1 inserted, 0 unchanged (already stored), 1 skipped, 0 failed" in out.stdout, out.stdout
    assert ("  caf\\xe9.md: its name is not UTF-8 (byte 0xe9): rename it, PostgreSQL stores sources as UTF-8 "
            "text") in out.stdout, out.stdout


def test_a_file_in_another_encoding_is_read_with_encoding_and_skipped_with_a_hint_without(db_url, tmp_path, capsys):
    # before: a Windows-1252 or Latin-1 file was skipped as "not UTF-8 text", with no way to read it
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "cafe.txt").write_bytes("Le café est servi après le VACUUM, à 10 €.".encode("cp1252"))
    (tmp_path / "docs" / "utf8.md").write_text("# Déjà vu\n\nUTF-8 is read as UTF-8 whatever --encoding says.")
    out = _cli_here(capsys, db_url, str(tmp_path / "docs"))
    assert out.returncode == 0, out.stderr
    assert ("  cafe.txt: not UTF-8 text (invalid byte 0xe9 at offset 6): give its encoding with --encoding "
            "(cp1252, latin-1, ...)") in out.stdout, out.stdout
    out = _cli_here(capsys, db_url, "--encoding", "cp1252", str(tmp_path / "docs"))
    assert out.returncode == 0, out.stderr
    assert "2 file(s): 1 inserted, 1 unchanged (already stored), 0 skipped" in out.stdout, out.stdout
    with psycopg.connect(db_url) as conn:
        rows = dict(conn.execute("SELECT source, body FROM pgsynapse.documents").fetchall())
    assert rows == {"cafe.txt": "Le café est servi après le VACUUM, à 10 €.",
                    "utf8.md": "# Déjà vu\n\nUTF-8 is read as UTF-8 whatever --encoding says."}, rows
    out = _cli_here(capsys, db_url, "--encoding", "klingon", str(tmp_path / "docs"))
    assert out.returncode == 2, out.stderr
    assert "argument --encoding: not a text encoding Python knows: 'klingon'" in out.stderr, out.stderr


def test_unreadable_file_fails_with_reason_and_exit_1(db_url, tmp_path, capsys):
    missing = tmp_path / "nope.md"
    # a mistyped directory or a file without an extension that is not there: missing, not "unsupported file type"
    out = _cli_here(capsys, db_url, str(missing), str(tmp_path / "no-such-dir"), str(tmp_path / "Makefile"))
    assert out.returncode == 1
    assert "3 file(s): 0 inserted, 0 unchanged (already stored), 0 skipped, 3 failed" in out.stdout, out.stdout
    for name in ("nope.md", "no-such-dir", "Makefile"):  # named as given: the name alone did not say where
        assert f"\n  {tmp_path / name}: No such file or directory" in out.stdout, out.stdout


def test_a_file_with_no_text_says_why_beyond_empty(tmp_path):
    # a scanned PDF (pages, no text layer) and an HTML page of markup only were "no text in it (empty)"
    (tmp_path / "scan.pdf").write_bytes(_pdf(""))
    (tmp_path / "shell.html").write_text("<html><head><script>app()</script></head><body><div></div></body></html>")
    (tmp_path / "blank.md").write_text("")
    with pytest.raises(SkipFile, match=r"^no text in it: a PDF without a text layer \(scanned pages\?\): "
                       r"make it searchable \(OCR\) first$"):
        read_document(tmp_path / "scan.pdf", "scan.pdf")
    with pytest.raises(SkipFile, match=r"^no text in it: markup only \(the page's text may come from scripts\)$"):
        read_document(tmp_path / "shell.html", "shell.html")
    with pytest.raises(SkipFile, match=r"^no text in it \(empty\)$"):
        read_document(tmp_path / "blank.md", "blank.md")


def test_a_text_file_over_max_document_chars_by_its_size_is_refused_without_reading_it(tmp_path):
    """A text file was read whole (then decoded: twice its size in memory) before its length was checked against
    max_document_chars: a 20 GB log file went into memory. A file of more than 4 bytes per character allowed (the most
    UTF-8 takes for one) is refused by its size; one under that is read, at most that many bytes."""
    big = tmp_path / "big.log.txt"
    big.write_bytes(b"a" * 20_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(SkipFile) as refused:
            read_document(big, "big.log.txt", max_chars=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak:,} bytes allocated: the file was read"
    assert str(refused.value) == ("at least 5,000,000 characters (20,000,000 bytes), over "
                                  "max_document_chars=1,000"), refused.value
    # between 1 and 4 bytes per character allowed: read, its characters counted, as before
    (tmp_path / "a.md").write_text("a" * 3000)
    with pytest.raises(SkipFile, match=r"^3,000 characters, over max_document_chars=1,000$"):
        read_document(tmp_path / "a.md", "a.md", max_chars=1000)
    # 4 bytes a character (and a byte-order mark) within the limit: ingested
    (tmp_path / "emoji.txt").write_bytes(b"\xef\xbb\xbf" + "\U0001F418".encode() * 1000)
    assert len(read_document(tmp_path / "emoji.txt", "emoji.txt", max_chars=1000).body) == 1000
    (tmp_path / "emoji.txt").write_bytes("\U0001F418".encode() * 1001)
    with pytest.raises(SkipFile, match=r"^at least 1,001 characters \(4,004 bytes\), over max_document_chars=1,000$"):
        read_document(tmp_path / "emoji.txt", "emoji.txt", max_chars=1000)


def test_an_html_or_pdf_file_over_max_document_file_bytes_is_refused_without_reading_it(db_url, tmp_path,
                                                                                         monkeypatch):
    """An HTML or PDF file was read whole before any check (its size says nothing of its text's length, but a 10 GB
    page went into memory whole, then into the parser). Over max_document_file_bytes by its size, it is skipped
    without a read, the setting named; one under it is read, at most that many bytes."""
    (tmp_path / "big.html").write_bytes(b"<html><body><p>" + b"vacuum " * 200_000 + b"</p></body></html>")
    (tmp_path / "big.pdf").write_bytes(_pdf("Streaming replication ships WAL records.") + b"%" + b"x" * 1_500_000)
    (tmp_path / "small.html").write_text("<html><body><p>VACUUM reclaims storage.</p></body></html>")
    monkeypatch.setenv("PGSYNAPSE_MAX_DOCUMENT_FILE_BYTES", "1000000")
    out = _cli(db_url, str(tmp_path))
    assert "3 file(s): 1 inserted, 0 unchanged (already stored), 2 skipped, 0 failed" in out.stdout, out.stdout
    over = ("bytes, over max_document_file_bytes=1,000,000 (an HTML or PDF file is refused by its size: raise "
            "PGSYNAPSE_MAX_DOCUMENT_FILE_BYTES to ingest it)")
    assert f"  big.html: 1,400,033 {over}" in out.stdout, out.stdout
    assert f"  big.pdf: {(tmp_path / 'big.pdf').stat().st_size:,} {over}" in out.stdout, out.stdout
    tracemalloc.start()
    try:
        with pytest.raises(SkipFile, match=r"^1,400,033 bytes, over max_document_file_bytes=1,000 "):
            read_document(tmp_path / "big.html", "big.html", max_file_bytes=1000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 500_000, f"{peak:,} bytes allocated: the file was read"
    assert read_document(tmp_path / "small.html", "small.html", max_file_bytes=1000).body == "VACUUM reclaims storage."


def test_pdf_without_pypdf_is_skipped_with_a_hint(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pypdf(name, *a, **kw):
        if name == "pypdf" or name.startswith("pypdf."):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    f = tmp_path / "x.pdf"
    f.write_bytes(_pdf("hello"))
    monkeypatch.setattr(builtins, "__import__", no_pypdf)
    with pytest.raises(SkipFile, match=r"pip install 'pgsynapse\[pdf\]'"):
        read_document(f, "x.pdf")


@pytest.mark.anyio
async def test_follow_waits_until_embedded(db_url, tree, models):
    async with running_worker(fast_settings(db_url), models):
        def go():
            with psycopg.connect(db_url, autocommit=True) as conn:
                report = ingest(conn, [tree / "guide", tree / "notes.txt"], progress=False)
                assert report.inserted == 3
                return follow(conn, report, progress=False, timeout=120, note=notes.append)

        notes: list[str] = []
        report = await anyio.to_thread.run_sync(go)
    assert (report.embedded, report.embed_failed) == (3, 0)
    assert notes == []  # a worker embeds them: nothing to warn about
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pgsynapse.documents WHERE status = 'embedded'").fetchone() == (3,)


@pytest.mark.anyio
async def test_a_follow_timeout_of_0_is_no_limit_as_for_asks_timeout(db_url, tree, models, capsys):
    """`--follow-timeout 0` gave up before its first wait, beside a worker that embeds: exit 1, "1 document(s) still
    pending after 0.0s"; 0 is no limit for `ask --timeout` and `sql-ask --timeout`, of the same argument type."""
    async with running_worker(fast_settings(db_url), models):
        out = await anyio.to_thread.run_sync(lambda: _cli_here(
            capsys, db_url, str(tree / "notes.txt"), "--follow", "--follow-timeout", "0"))
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "embedded: 1, embedding failed: 0" in out.stdout, out.stdout


def test_follow_without_a_worker_gives_up_with_a_hint(db_url, tree):
    out = _cli(db_url, str(tree / "notes.txt"), "--follow", "--follow-timeout", "0.5")
    assert out.returncode == 1
    assert "1 inserted" in out.stdout
    assert "1 document(s) still pending after 0.5s: is `pgsynapse run` running?" in out.stderr
    # said at once, not after the timeout: without --follow-timeout it waited for ever without a word
    assert ("pgsynapse: no running worker takes embed jobs: the documents are embedded once `pgsynapse run` "
            "starts (waiting; Ctrl-C stops waiting, the documents stay stored)") in out.stderr
    # with JSON logs the note is an event too: it was the one plain line among them
    out = _cli(db_url, "--log-format", "json", str(tree / "guide" / "vacuum.md"), "--follow", "--follow-timeout", "0.5")
    assert out.returncode == 1 and "1 inserted" in out.stdout
    events = [json.loads(line) for line in out.stderr.splitlines()]
    [waiting] = [e for e in events if e["event"] == "ingest_follow_waiting"]
    assert waiting["level"] == "warning" and waiting["note"].startswith("no running worker takes embed jobs: "), waiting
    assert events[-1]["event"] == "fatal_error"


def test_follow_that_times_out_beside_a_running_worker_does_not_ask_whether_one_runs(db_url, tree, capsys):
    """A worker that embeds runs, registered and listening, but has not come to the documents within the timeout
    (busy with a backlog, slow): the timeout asked "is `pgsynapse run` running?" of a worker that was. The test
    registers that worker as a real one does (its LISTEN connection's name, its row in pgsynapse.workers)."""
    with psycopg.connect(db_url, autocommit=True, application_name="pgsynapse-listener") as busy:
        busy.execute("LISTEN pgsynapse_jobs")
        busy.execute("INSERT INTO pgsynapse.workers (worker_id, host, pid, kinds, models, rss_mb, processed) "
                     "VALUES ('busy:1:a', 'busy', 1, '{embed}', '[]', 1, '{}')")
        out = _cli_here(capsys, db_url, str(tree / "notes.txt"), "--follow", "--follow-timeout", "0.5")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "is `pgsynapse run` running?" not in out.stderr and "no running worker" not in out.stderr, out.stderr
    assert ("1 document(s) still pending after 0.5s: 1 running worker embeds them but has not come to them yet (a "
            "queue ahead of them, or slower than that: `pgsynapse status`); they are embedded when it does: follow "
            "them again later, `pgsynapse ingest --follow` of the same files inserts nothing new") in out.stderr, out.stderr


def test_a_directory_without_files_to_ingest_is_said_so(db_url, tmp_path):
    """`pgsynapse ingest EMPTY_DIR` printed "0 file(s): 0 inserted, ..." and nothing else, as if its files had all
    been stored before; a directory of hidden files only, the same."""
    empty, hidden = tmp_path / "empty", tmp_path / "hidden"
    empty.mkdir()
    (hidden / ".git").mkdir(parents=True)
    (hidden / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (hidden / ".notes.txt").write_text("a hidden note")
    out = _cli(db_url, str(empty), str(hidden))
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert out.stdout.splitlines()[1:] == [
        f"no files to ingest in {empty}: it has none",
        f"no files to ingest in {hidden}: its 2 file(s) are hidden (a name or a directory that starts with a dot: "
        "left out)"], out.stdout


def test_a_follow_timeout_without_follow_is_refused_before_anything_is_ingested(db_url, tree):
    # it was ignored: the files ingested, nothing followed, exit 0, as if they had been embedded within the time
    out = _cli(db_url, str(tree / "notes.txt"), "--follow-timeout", "60")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "--follow-timeout is how long --follow waits: add --follow" in out.stderr, out.stderr
    assert "inserted" not in out.stdout
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgsynapse.documents").fetchone() == (0,)


def test_follow_while_a_worker_starts_says_so_and_waits_for_it(db_url, tree):
    """At a first start a worker exports its model to the INT8 runtime (minutes) before it registers and listens:
    `ingest --follow` said `no running worker takes embed jobs: ... once `pgsynapse run` starts` beside a worker
    that was starting, and its timeout asked "is `pgsynapse run` running?"; `status` said a worker is starting.
    The test holds the export lock, as that worker's export does."""
    with psycopg.connect(db_url, autocommit=True) as exporting:
        exporting.execute("SELECT pg_advisory_lock(hashtext(%s))", (EXPORT_LOCK,))
        out = _cli(db_url, str(tree / "notes.txt"), "--follow", "--follow-timeout", "0.5")
    assert out.returncode == 1
    assert "no running worker" not in out.stderr, out.stderr
    assert ("pgsynapse: a worker is starting: it exports a model version to its runtime first (minutes on a small "
            "host: `pgsynapse status`), then embeds the documents if it runs embed jobs (waiting; Ctrl-C stops "
            "waiting, the documents stay stored)") in out.stderr, out.stderr
    assert ("1 document(s) still pending after 0.5s: a worker is still starting (exporting a model version to its "
            "runtime): follow them again later, `pgsynapse ingest --follow` of the same files inserts nothing new"
            ) in out.stderr, out.stderr


@pytest.mark.anyio
async def test_follow_waits_for_the_starting_worker_to_embed(db_url, tree, models):
    notes: list[str] = []
    noted, reports, followed = threading.Event(), [], anyio.Event()

    def note(why: str) -> None:
        notes.append(why)
        noted.set()

    def go():
        with psycopg.connect(db_url, autocommit=True) as conn:
            return follow(conn, ingest(conn, [tree / "notes.txt"], progress=False), progress=False, timeout=120,
                          note=note)

    async def following():
        reports.append(await anyio.to_thread.run_sync(go))
        followed.set()

    with psycopg.connect(db_url, autocommit=True) as exporting:
        exporting.execute("SELECT pg_advisory_lock(hashtext(%s))", (EXPORT_LOCK,))
        async with anyio.create_task_group() as tg:
            tg.start_soon(following)
            assert await anyio.to_thread.run_sync(noted.wait, 60)
            assert notes[0].startswith("a worker is starting:"), notes
            exporting.execute("SELECT pg_advisory_unlock(hashtext(%s))", (EXPORT_LOCK,))  # exported: it serves
            async with running_worker(fast_settings(db_url), models):
                with anyio.fail_after(120):
                    await followed.wait()
    assert len(notes) == 1, notes  # said once, not again while it waited
    assert (reports[0].embedded, reports[0].embed_failed) == (1, 0)


def test_an_image_is_linked_to_the_document_beside_it():
    docs = {"guide/vacuum.md", "guide/vacuum-full.md", "guide/index.html", "notes.txt"}
    assert document_for("guide/vacuum.png", docs) == "guide/vacuum.md"
    assert document_for("guide/vacuum_fig2.jpg", docs) == "guide/vacuum.md"
    assert document_for("guide/vacuum-full-1.webp", docs) == "guide/vacuum-full.md"  # the longest name wins
    assert document_for("guide/vacuumed.png", docs) is None  # a prefix, but not followed by - _ or .
    assert document_for("vacuum.png", docs) is None  # another directory
    assert document_for("notes.png", docs) == "notes.txt"


@pytest.mark.anyio
async def test_images_beside_documents_are_ingested_linked_and_embedded(db_url, tree, models, tiny_clip_path):
    (tree / "guide" / "vacuum-diagram.png").write_bytes(png_bytes(coloured_image("red", seed=1)))
    (tree / "guide" / "unrelated.webp").write_bytes(png_bytes(coloured_image("blue", seed=2), fmt="WEBP"))
    (tree / "guide" / "photo.jpg").write_bytes(png_bytes(coloured_image("green", seed=3), fmt="JPEG"))
    # the worker decodes GIF and BMP too: ingest skipped them as "unsupported file type"
    (tree / "guide" / "vacuum-anim.gif").write_bytes(png_bytes(coloured_image("red", seed=6), fmt="GIF"))
    (tree / "guide" / "index.bmp").write_bytes(png_bytes(coloured_image("blue", seed=7), fmt="BMP"))
    with psycopg.connect(db_url, autocommit=True) as conn:
        registry.add(conn, tiny_clip_path)
        # the same picture, stored by an application and linked to no document: no file of this ingest (follow
        # counted every row of the same bytes: "images embedded: 6" for 5 files, and another row's failure as its own)
        conn.execute("INSERT INTO pgsynapse.images (data, caption) VALUES (%s, 'a copy')",
                     ((tree / "guide" / "vacuum-diagram.png").read_bytes(),))
    async with running_worker(fast_settings(db_url, kinds=("embed", "embed_image")), models):
        def go():
            with psycopg.connect(db_url, autocommit=True) as conn:
                report = ingest(conn, [tree / "guide"], progress=False)
                assert (report.inserted, report.images, report.skipped) == (2, 5, [])
                return follow(conn, report, progress=False, timeout=120)

        report = await anyio.to_thread.run_sync(go)
    assert (report.images_embedded, report.images_failed) == (5, 0)
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = {r[0]: r[1:] for r in conn.execute("SELECT i.source, d.source, i.mime_type FROM pgsynapse.images i"
                                                  " LEFT JOIN pgsynapse.documents d ON d.id = i.document_id"
                                                  " WHERE i.source IS NOT NULL")}
    assert rows == {"vacuum-diagram.png": ("vacuum.md", "image/png"), "unrelated.webp": (None, "image/webp"),
                    "photo.jpg": (None, "image/jpeg"), "vacuum-anim.gif": ("vacuum.md", "image/gif"),
                    "index.bmp": ("index.html", "image/bmp")}


@pytest.mark.anyio
async def test_a_changed_file_is_added_beside_its_old_version_or_replaces_it_with_replace(db_url, tree, models):
    guide = tree / "guide"
    by_source = "SELECT id, body, status FROM pgsynapse.documents WHERE source = %s ORDER BY id"
    async with running_worker(fast_settings(db_url), models):
        def go():
            with psycopg.connect(db_url, autocommit=True) as conn:
                follow(conn, ingest(conn, [guide], progress=False), progress=False, timeout=120)
                [(vacuum, _, _)] = conn.execute(by_source, ("vacuum.md",)).fetchall()
                (guide / "vacuum.md").write_text("# Routine Vacuuming\n\nVACUUM FULL rewrites the whole table.\n")
                (guide / "index.html").write_text("<html><title>Index Types</title><p>BRIN too.</p></html>")

                # by default a changed file is a new document, and the summary says its old version stays
                kept = ingest(conn, [guide / "index.html"], progress=False)
                assert (kept.inserted, kept.replaced, kept.same_source) == (1, 0, 1)
                assert "1 inserted file(s) have the source of a stored document with other content" in kept.summary()
                assert len(conn.execute(by_source, ("index.html",)).fetchall()) == 2

                # --replace: the stored document takes the new content, keeps its id, and is embedded again
                replaced = ingest(conn, [guide], progress=False, replace=True)
                assert (replaced.inserted, replaced.replaced, replaced.unchanged) == (0, 1, 1)
                assert "0 inserted, 1 replaced, 1 unchanged" in replaced.summary()
                [(same, body, status)] = conn.execute(by_source, ("vacuum.md",)).fetchall()
                assert (same, status) == (vacuum, "pending") and "VACUUM FULL rewrites" in body
                follow(conn, replaced, progress=False, timeout=120)
                return conn.execute("SELECT string_agg(c.text, ' ') FROM pgsynapse.chunks c"
                                    " WHERE c.document_id = %s", (vacuum,)).fetchone()[0]

        chunks = await anyio.to_thread.run_sync(go)
    assert "VACUUM FULL rewrites" in chunks and "dead tuples" not in chunks


def test_replace_from_the_command_line(db_url, tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\nFirst version.\n")
    assert "1 inserted, 0 unchanged" in _cli_here(capsys, db_url, str(page)).stdout
    page.write_text("# Page\n\nSecond version.\n")
    out = _cli_here(capsys, db_url, "--replace", str(page))
    assert out.returncode == 0 and "1 file(s): 0 inserted, 1 replaced, 0 unchanged" in out.stdout, out.stdout + out.stderr
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT source, body FROM pgsynapse.documents").fetchall() == [("page.md", "# Page\n\nSecond version.")]


def test_replace_after_a_run_that_kept_both_versions_keeps_only_the_file_s(db_url, tmp_path, capsys):
    """A run without --replace keeps a changed file's old version beside it, and its summary says --replace updates
    the stored one instead; a --replace run after it said "unchanged" and left both (only a DELETE removed the old
    one). --replace makes the file its source's one document: the other versions of that source go."""
    page, other = tmp_path / "page.md", tmp_path / "other.md"
    page.write_text("# Page\n\nFirst version.\n")
    other.write_text("# Other\n\nNever changed.\n")
    assert "2 inserted, 0 unchanged" in _cli_here(capsys, db_url, str(tmp_path)).stdout
    page.write_text("# Page\n\nSecond version.\n")
    kept = _cli_here(capsys, db_url, str(tmp_path))
    assert "1 inserted, 1 unchanged" in kept.stdout and "both versions are kept" in kept.stdout, kept.stdout
    out = _cli_here(capsys, db_url, "--replace", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 file(s): 0 inserted, 2 unchanged (already stored)" in out.stdout, out.stdout
    assert "1 older version(s) of these files' sources deleted (--replace)" in out.stdout, out.stdout
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT source, body FROM pgsynapse.documents ORDER BY source").fetchall() == [
            ("other.md", "# Other\n\nNever changed."), ("page.md", "# Page\n\nSecond version.")]
    # nothing left to delete: a second --replace run says nothing of it
    again = _cli_here(capsys, db_url, "--replace", str(tmp_path))
    assert "2 unchanged" in again.stdout and "older version" not in again.stdout, again.stdout


def test_replace_moves_the_images_of_the_versions_it_deletes_to_the_kept_document_without_duplicates(
        db_url, tmp_path, capsys):
    """A run without --replace stores a changed file's new version and the picture beside it again, linked to it;
    the --replace run after it deleted the old version, and left its copy of the picture unlinked (document_id NULL,
    ON DELETE SET NULL): the same bytes twice, one found by image search with no document. The old version's images
    go to the kept document of its source: one stored from a file beside it is deleted (the run stores the file's
    picture for the kept document: a file removed since leaves no stale picture), and so is a picture that document
    has already; another (an application's) is linked to it."""
    page = tmp_path / "vacuum.md"
    page.write_text("# Vacuum\n\nFirst version.\n")
    (tmp_path / "vacuum.png").write_bytes(png_bytes(coloured_image("red", seed=8)))
    (tmp_path / "vacuum-old.png").write_bytes(png_bytes(coloured_image("green", seed=10)))  # removed below
    assert "1 inserted, 0 unchanged" in _cli_here(capsys, db_url, str(tmp_path)).stdout
    with psycopg.connect(db_url, autocommit=True) as conn:
        old = conn.execute("SELECT id FROM pgsynapse.documents").fetchone()[0]
        conn.execute("INSERT INTO pgsynapse.images (data, caption, document_id) VALUES (%s, 'an app''s', %s)",
                     (png_bytes(coloured_image("blue", seed=9)), old))
    page.write_text("# Vacuum\n\nSecond version.\n")
    (tmp_path / "vacuum-old.png").unlink()
    assert "both versions are kept" in _cli_here(capsys, db_url, str(tmp_path)).stdout
    out = _cli_here(capsys, db_url, "--replace", str(tmp_path))
    assert "1 older version(s) of these files' sources deleted (--replace)" in out.stdout, out.stdout + out.stderr
    with psycopg.connect(db_url) as conn:
        [kept] = conn.execute("SELECT id FROM pgsynapse.documents").fetchone()
        images = conn.execute("SELECT coalesce(source, caption), document_id FROM pgsynapse.images ORDER BY id").fetchall()
    assert kept != old and sorted(images, key=repr) == [("an app's", kept), ("vacuum.png", kept)], images


def test_replace_replaces_the_changed_picture_of_the_document_it_updates_in_place(db_url, tmp_path):
    """--replace updated a changed document in place (same id) and stored the changed picture beside it as one more:
    the old picture stayed linked to it (status: 2 images for 1 document; image search found the stale one). The
    picture a file beside it changed to replaces the one ingest stored from that file; an application's stays."""
    page, picture = tmp_path / "vacuum.md", tmp_path / "vacuum.png"
    page.write_text("# Vacuum\n\nFirst version.\n")
    picture.write_bytes(png_bytes(coloured_image("red", seed=8)))
    images = "SELECT coalesce(source, caption), document_id, data FROM pgsynapse.images ORDER BY id"
    with psycopg.connect(db_url, autocommit=True) as conn:
        ingest(conn, [tmp_path], progress=False)
        [(doc,)] = conn.execute("SELECT id FROM pgsynapse.documents").fetchall()
        app = png_bytes(coloured_image("blue", seed=9))
        conn.execute("INSERT INTO pgsynapse.images (data, caption, document_id) VALUES (%s, 'an app''s', %s)",
                     (app, doc))
        page.write_text("# Vacuum\n\nSecond version.\n")
        picture.write_bytes(green := png_bytes(coloured_image("green", seed=10)))
        report = ingest(conn, [tmp_path], progress=False, replace=True)
        assert [(s, d, bytes(b)) for s, d, b in conn.execute(images)] == [("an app's", doc, app), ("vacuum.png", doc, green)]
        assert (report.replaced, report.images, report.images_replaced) == (1, 1, 1), report
        assert "images: 1 inserted, 0 unchanged, 1 older picture(s) of these files deleted (--replace)" in report.summary()
        # the picture alone changed: the same
        picture.write_bytes(yellow := png_bytes(coloured_image("yellow", seed=11)))
        report = ingest(conn, [tmp_path], progress=False, replace=True)
        assert (report.unchanged, report.images, report.images_replaced) == (1, 1, 1), report
        assert [(s, d, bytes(b)) for s, d, b in conn.execute(images)] == [("an app's", doc, app), ("vacuum.png", doc, yellow)]
        # without --replace, a changed picture is kept beside the old one, as a changed document is
        picture.write_bytes(png_bytes(coloured_image("red", seed=12)))
        report = ingest(conn, [tmp_path], progress=False)
        assert (report.images, report.images_replaced) == (1, 0), report
        assert conn.execute("SELECT count(*) FROM pgsynapse.images WHERE source = 'vacuum.png'").fetchone()[0] == 2


def test_the_same_picture_beside_two_documents_is_linked_to_both_and_a_later_document_links_it(db_url, tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    picture = png_bytes(coloured_image("red", seed=4))
    (root / "backup-diagram.png").write_bytes(picture)
    (root / "restore-diagram.png").write_bytes(picture)  # the same bytes, beside another page
    (root / "wal.png").write_bytes(png_bytes(coloured_image("blue", seed=5)))  # no page beside it yet
    (root / "backup.md").write_text("# Backup\n\npg_basebackup copies a running cluster.\n")
    (root / "restore.md").write_text("# Restore\n\nA base backup is restored by copying it back.\n")
    links = ("SELECT i.source, d.source FROM pgsynapse.images i"
             " LEFT JOIN pgsynapse.documents d ON d.id = i.document_id ORDER BY i.id")
    with psycopg.connect(db_url, autocommit=True) as conn:
        first = ingest(conn, [root], progress=False)
        assert (first.images, first.images_unchanged) == (3, 0)
        assert conn.execute(links).fetchall() == [
            ("backup-diagram.png", "backup.md"), ("restore-diagram.png", "restore.md"), ("wal.png", None)]

        # the page written later: its picture, stored unlinked, is linked (not stored twice); the rest unchanged
        (root / "wal.md").write_text("# WAL\n\nThe write-ahead log records every change.\n")
        second = ingest(conn, [root], progress=False)
        assert (second.images, second.images_linked, second.images_unchanged) == (0, 1, 2)
        assert "images: 0 inserted, 1 linked to a document, 2 unchanged" in second.summary()
        assert conn.execute(links).fetchall() == [
            ("backup-diagram.png", "backup.md"), ("restore-diagram.png", "restore.md"), ("wal.png", "wal.md")]
        third = ingest(conn, [root], progress=False)
        assert (third.images, third.images_linked, third.images_unchanged) == (0, 0, 3)


INGEST_LOCK = "SELECT pg_advisory_xact_lock(hashtext('pgsynapse.ingest'))"
INGEST_WAITERS = ("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objsubid = 1"
                  " AND objid::bigint = hashtext('pgsynapse.ingest')::bigint & 4294967295"
                  " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY pid")


def _wait_for_waiters(conn: psycopg.Connection, n: int, procs: list[subprocess.Popen]) -> list[int]:
    deadline = time.monotonic() + 60  # a safety net: the row state ends the wait
    while len(pids := [r[0] for r in conn.execute(INGEST_WAITERS).fetchall()]) < n:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
        with pytest.raises(subprocess.TimeoutExpired):  # polled: a lock's waiter sends no event
            procs[0].wait(0.05)
    return pids


def _said(proc: subprocess.Popen, word: str) -> str:
    """What ``proc`` wrote on stderr until ``word``, read as it is written (60 s at most: a safety net)."""
    said, deadline = b"", time.monotonic() + 60
    while word.encode() not in said and select.select([proc.stderr], [], [], max(0, deadline - time.monotonic()))[0]:
        if not (chunk := os.read(proc.stderr.fileno(), 65536)):
            break
        said += chunk
    return said.decode()


def test_an_ingest_waiting_for_another_says_so_and_a_killed_one_s_wait_ends_with_it(db_url, tmp_path):
    """Two ingests store batches one at a time (a transaction advisory lock). One waiting for another said nothing,
    and one killed meanwhile (Ctrl-C twice, SIGKILL) left its server backend waiting on the lock until it was granted:
    a backend for nobody. Now a wait of more than a second says so (`ingest_waiting`), a killed one's wait ends
    within a second or so, and the other ingests its file once the lock is free."""
    (tmp_path / "a.md").write_text("# A\n\nVacuum reclaims storage.\n")
    (tmp_path / "b.md").write_text("# B\n\nCheckpoints flush dirty pages.\n")
    env = {**os.environ, "DATABASE_URL": db_url, "PGSYNAPSE_LOG_LEVEL": "info"}
    procs: list[subprocess.Popen] = []
    with psycopg.connect(db_url, autocommit=True) as watch, psycopg.connect(db_url) as holder:
        holder.execute(INGEST_LOCK)  # another ingest's batch, not committed yet
        try:
            first: list[int] = []  # the first ingest's backend: the one waiter before the second starts
            for name in ("a.md", "b.md"):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "pgsynapse", "ingest", "--no-progress", str(tmp_path / name)], env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
                first = first or _wait_for_waiters(watch, len(procs), procs)
                said = _said(procs[-1], "ingest_waiting")
                assert "ingest_waiting" in said, f"{name}: an ingest waited on another without a word: {said!r}"
            killed, waiting = procs
            _wait_for_waiters(watch, 2, procs)
            kill_and_see_its_backend_end(killed, first[0], "ingest", "ingest lock")
            holder.commit()  # the lock is free: the other ingest goes on
            out, err = waiting.communicate(timeout=120)
            assert waiting.returncode == 0 and b"1 file(s): 1 inserted" in out, out + err
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(60)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT source FROM pgsynapse.documents ORDER BY source").fetchall() == [("b.md",)]


def test_take_xact_lock_takes_the_lock_in_the_transaction_and_keeps_its_lock_timeout(db_url):
    with psycopg.connect(db_url) as conn:
        conn.execute("SET LOCAL lock_timeout = '7s'")
        take_xact_lock(conn, INGEST_LOCK, {})
        assert conn.execute("SHOW lock_timeout").fetchone() == ("7s",)
        assert conn.execute("SELECT granted FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
                            ).fetchall() == [(True,)]
        conn.commit()
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
                            ).fetchone() == (0,)
