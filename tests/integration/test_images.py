"""Images: INSERT -> trigger -> NOTIFY -> embed_image -> searchable by text (CLIP) and by image, on real
Postgres with real (tiny, test-built) models; the bad-image matrix; the image model registry."""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import anyio
import numpy as np
import psycopg
import pytest
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.cli import main as cli_main
from pgsynapse.cli_args import build_parser as cli_parser
from pgsynapse.client import Client, format_result
from pgsynapse.errors import InputError, ModelError, PgsynapseError
from pgsynapse.handlers.embed_image import EmbedImageHandler
from pgsynapse.images import registry
from pgsynapse.images.cli import run_image_model_command
from pgsynapse.images.encoders import ImageModelCache
from pgsynapse.images.search import search_by_image, search_by_text
from pgsynapse.retry import retry_failed
from tests.helpers import aconn, fast_settings, running_worker, wait_until
from tests.image_models import COLOURS, coloured_image, png_bytes, tiny_vit

pytestmark = pytest.mark.anyio

ALL_DONE = "SELECT count(*) = 0 FROM pgsynapse.images WHERE status = 'pending'"


def _sync(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def insert_images(url: str, rows: list[dict]) -> list[int]:
    """One INSERT statement for every row (one trigger run, one NOTIFY)."""
    cols = ("data", "path", "mime_type", "caption", "document_id")
    values = [tuple(r.get(c) for c in cols) for r in rows]
    with _sync(url) as conn, conn.cursor() as cur:
        placeholders = ", ".join(["(%s, %s, %s, %s, %s)"] * len(values))
        cur.execute(f"INSERT INTO pgsynapse.images ({', '.join(cols)}) VALUES {placeholders} RETURNING id",
                    [v for row in values for v in row])
        return [r["id"] for r in cur.fetchall()]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose header says width x height (8-bit greyscale) with ``idat`` as its compressed pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


async def test_text_and_image_search_end_to_end(db_url, models, tiny_clip_path, tiny_vit_path):
    conn = await aconn(db_url)
    with pytest.raises(PgsynapseError, match="no active CLIP model: a search by text needs one"):
        await search_by_text(conn, ImageModelCache(), "a red picture")
    await conn.close()
    with _sync(db_url) as conn:
        clip = registry.add(conn, tiny_clip_path, name="tiny-clip")
        doc = conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('Palette', 'Colours.') RETURNING id").fetchone()["id"]
    assert (clip["kind"], clip["status"], clip["dim"], clip["queued"]) == ("clip", "active", 16, 0)
    names = list(COLOURS)
    rows = [{"data": png_bytes(coloured_image(c, seed=10 * i + j)), "caption": f"{c} #{j}",
             "document_id": doc if c == "red" else None} for i, c in enumerate(names) for j in range(2)]
    ids = insert_images(db_url, rows)
    by_colour = {c: set(ids[2 * i : 2 * i + 2]) for i, c in enumerate(names)}
    settings = fast_settings(db_url, kinds=("embed_image",))
    async with running_worker(settings, models):
        conn = await aconn(db_url)
        await wait_until(conn, ALL_DONE, channel="pgsynapse_images")
        row = await (await conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'embedded') AS embedded, min(width) AS w, min(height) AS h,"
            " min(mime_type) AS mime, (SELECT count(*) FROM pgsynapse.image_embeddings) AS vectors FROM pgsynapse.images")).fetchone()
        assert row == {"embedded": 8, "w": 48, "h": 40, "mime": "image/png", "vectors": 8}
        cache = ImageModelCache()
        for colour in names:
            hits = await search_by_text(conn, cache, f"a {colour} picture", k=2)
            assert {h.image_id for h in hits} == by_colour[colour], (colour, hits)
        red = await search_by_text(conn, cache, "a red picture", k=1)
        assert red[0].document_id == doc and red[0].document_title == "Palette"

        # an image encoder added later: a candidate, queued every image, embedded beside the CLIP vectors
        with _sync(db_url) as sync:
            vit = registry.add(sync, tiny_vit_path)
            # the first of its kind, a candidate all the same: the CLIP model serves searches by example meanwhile
            assert (vit["kind"], vit["status"], vit["queued"]) == ("image", "candidate", 8)
        await wait_until(conn, "SELECT count(*) = 16 FROM pgsynapse.image_embeddings", channel="pgsynapse_images")
        with _sync(db_url) as sync:
            registry.promote(sync, vit["id"])
        # by example: a JPEG re-encoding of one image finds that image first, with either model
        target = ids[5]
        copy = png_bytes(coloured_image(names[2], seed=21), fmt="JPEG")
        for model in (None, clip["id"]):
            hits = await search_by_image(conn, cache, copy, k=3, model=model)
            assert hits[0].image_id == target, (model, hits)
        # in SQL: the images like one image (the active image encoder), joined to their documents (docs/sql.md)
        similar = await (await conn.execute(
            "SELECT s.image_id, d.title, s.similarity FROM pgsynapse.similar_images(%s, 4) s"
            " LEFT JOIN pgsynapse.documents d ON d.id = s.document_id", (ids[0],))).fetchall()
        exact = await (await conn.execute(
            "SELECT e.image_id, 1 - (e.embedding <=> q.embedding) AS similarity FROM pgsynapse.image_embeddings q"
            " JOIN pgsynapse.image_embeddings e ON e.model_id = q.model_id AND e.image_id <> q.image_id"
            " WHERE q.model_id = %s AND q.image_id = %s ORDER BY e.embedding <=> q.embedding LIMIT 4", (vit["id"], ids[0]))).fetchall()
        assert [r["image_id"] for r in similar] == [r["image_id"] for r in exact]
        assert [r["title"] for r in similar if r["image_id"] == ids[1]] in ([], ["Palette"])
        # the join examples of docs/sql.md, as written there
        docs_sql = (Path(__file__).parents[2] / "docs" / "sql.md").read_text()
        examples = re.findall(r"```sql\n(-- which documents have pictures like image 42.*?)```", docs_sql, re.S)[0]
        first, second = (x.strip() for x in examples.replace("image 42", "image").split(";")[:2])
        rows = await (await conn.execute(first.replace("similar_images(42", f"similar_images({ids[1]}"))).fetchall()
        assert rows and {r["title"] for r in rows} == {"Palette"} and rows[0]["image_id"] == ids[0]
        rows = await (await conn.execute(second)).fetchall()
        assert len(rows) == 2 and {r["image_id"] for r in rows} == set(ids[:2])  # the red ones are linked
        assert all(r["looks_like"] not in ids[:2] for r in rows)
        await conn.close()


async def test_bad_images_fail_alone_with_clear_errors(db_url, models, tiny_clip_path, tmp_path):
    good = png_bytes(coloured_image("blue", seed=1))
    zip_bomb = io.BytesIO()
    with zipfile.ZipFile(zip_bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.png", b"\0" * 20_000_000)
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(good)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "fine.png").write_bytes(png_bytes(coloured_image("green", seed=2)))
    bad = {
        "empty": (b"", "empty image data"),
        "truncated": (good[: len(good) // 2], "truncated or corrupt PNG image"),
        "wrong_type": (b"%PDF-1.7 not a picture", "not an image in an allowed format"),
        "zip_archive": (zip_bomb.getvalue(), "a ZIP archive"),
        # the header alone says 100000 x 100000: refused before any pixel is decoded
        "huge_dimensions": (png_claiming(100_000, 100_000, zlib.compress(b"\0" * 1000)), "over max_image_pixels"),
        # a real decompression bomb: 60 KB that would inflate to 60 million pixels
        "png_bomb": (png_claiming(10_000, 6_000, zlib.compress(b"\0" * 6_006_000 * 10, 9)), "refused before decoding"),
        "too_many_bytes": (b"\x89PNG" + b"\0" * 300_000, "over max_image_bytes=250,000"),
        "nul_bytes": (b"\0" * 16, "16 bytes starting 00 00 00 00 00 00 00 00"),  # was called "text"
        "text": (b"just some words", "allowed format (PNG, JPEG, WEBP, GIF, BMP): text"),
    }
    rows = [{"data": good, "caption": "good 1"}]
    rows += [{"data": data, "caption": name} for name, (data, _) in bad.items()]
    rows += [{"path": str(outside), "caption": "outside_roots"}, {"path": str(allowed / "fine.png"), "caption": "path_ok"},
             {"path": str(allowed / "missing.png"), "caption": "missing_file"}, {"data": good[::-1] + good, "caption": "garbage"},
             # the worker reads files, never URLs; relative to what? ('' was the worker's own directory); and a
             # file outside the roots is refused whether it exists or not (the error told which files existed)
             {"path": "https://example.com/figure.png", "caption": "url"}, {"path": "fine.png", "caption": "relative"},
             {"path": "", "caption": "empty_path"}, {"path": str(tmp_path / "nowhere.png"), "caption": "nowhere"},
             {"data": png_bytes(coloured_image("red", seed=3), fmt="WEBP"), "caption": "webp"}]
    with _sync(db_url) as conn:
        registry.add(conn, tiny_clip_path)
    insert_images(db_url, rows)
    settings = fast_settings(db_url, kinds=("embed_image",), max_image_bytes=250_000, image_roots=(allowed,))
    async with running_worker(settings, models):
        conn = await aconn(db_url)
        await wait_until(conn, ALL_DONE, channel="pgsynapse_images")
        got = {r["caption"]: r for r in await (await conn.execute(
            "SELECT i.caption, i.status, i.error, i.mime_type, j.attempts, j.status AS job"
            " FROM pgsynapse.images i JOIN pgsynapse.jobs j ON j.kind = 'embed_image' AND j.ref_id = i.id")).fetchall()}
        await conn.close()
    for name, (_, message) in bad.items():
        assert got[name]["status"] == "failed" and message in got[name]["error"], (name, got[name])
        assert got[name]["error"].startswith("InputError: ") and got[name]["attempts"] == 1, got[name]  # never retried
    assert "outside image_roots" in got["outside_roots"]["error"]
    assert "cannot read image file" in got["missing_file"]["error"]
    assert got["missing_file"]["error"].endswith("missing.png': no such file"), got["missing_file"]
    assert ("image path 'https://example.com/figure.png' is a URL: the worker reads no URL, only files under "
            "image_roots; store the bytes in images.data") in got["url"]["error"], got["url"]
    assert "image path 'fine.png' is relative: give an absolute path under image_roots" in got["relative"]["error"]
    assert got["empty_path"]["error"] == "InputError: empty image path: give an absolute path under image_roots"
    assert got["nowhere"]["error"].endswith("nowhere.png' is outside image_roots (" + str(allowed) + ")")
    assert got["garbage"]["status"] == "failed"
    # the healthy neighbours of the same statement and batch were embedded
    for name in ("good 1", "path_ok", "webp"):
        assert got[name]["status"] == "embedded" and got[name]["error"] is None, got[name]
    assert got["webp"]["mime_type"] == "image/webp"

    # the cause fixed (a root added), retry-failed puts the failed rows back and only that one now succeeds
    with _sync(db_url) as conn:
        assert retry_failed(conn, "embed_image").requeued == {"embed_image": 16}
        assert conn.execute("SELECT count(*) AS n FROM pgsynapse.images WHERE status = 'pending'").fetchone()["n"] == 16
    async with running_worker(settings.model_copy(update={"image_roots": (allowed, tmp_path)}), models):
        conn = await aconn(db_url)
        await wait_until(conn, ALL_DONE, channel="pgsynapse_images")
        row = await (await conn.execute("SELECT count(*) FILTER (WHERE status = 'embedded') AS embedded,"
                                        " bool_or(status = 'embedded' AND caption = 'outside_roots') AS fixed"
                                        " FROM pgsynapse.images")).fetchone()
        await conn.close()
    assert row == {"embedded": 4, "fixed": True}


async def test_changed_image_is_embedded_again_and_unchanged_update_is_not(db_url, models, tiny_clip_path):
    with _sync(db_url) as conn:
        registry.add(conn, tiny_clip_path)
    [img] = insert_images(db_url, [{"data": png_bytes(coloured_image("red", seed=5)), "caption": "x"}])
    async with running_worker(fast_settings(db_url, kinds=("embed_image",)), models):
        conn = await aconn(db_url)
        await wait_until(conn, ALL_DONE, channel="pgsynapse_images")
        first = await (await conn.execute("SELECT embedding::text AS e FROM pgsynapse.image_embeddings")).fetchone()
        await conn.execute("UPDATE pgsynapse.images SET caption = 'renamed' WHERE id = %s", (img,))
        await conn.execute("UPDATE pgsynapse.images SET data = %s WHERE id = %s",
                           (png_bytes(coloured_image("yellow", seed=6)), img))
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.images WHERE id = %s", (img,),
                         channel="pgsynapse_images")
        second = await (await conn.execute("SELECT embedding::text AS e FROM pgsynapse.image_embeddings")).fetchone()
        jobs = await (await conn.execute(
            "SELECT count(*) AS n FROM pgsynapse.jobs WHERE kind = 'embed_image' AND ref_id = %s", (img,))).fetchone()
        await conn.close()
    assert first != second and jobs["n"] == 2  # the caption edit queued nothing


async def test_an_image_changed_into_a_bad_one_is_no_longer_found(db_url, models, tiny_clip_path):
    with _sync(db_url) as conn:
        registry.add(conn, tiny_clip_path)
    blue, red = insert_images(db_url, [{"data": png_bytes(coloured_image("blue", seed=11)), "caption": "blue"},
                                       {"data": png_bytes(coloured_image("red", seed=12)), "caption": "red"}])
    async with running_worker(fast_settings(db_url, kinds=("embed_image",)), models):
        conn = await aconn(db_url)
        await wait_until(conn, ALL_DONE, channel="pgsynapse_images")
        await conn.execute("UPDATE pgsynapse.images SET data = %s WHERE id = %s", (b"%PDF-1.7 not a picture", blue))
        await wait_until(conn, "SELECT status = 'failed' FROM pgsynapse.images WHERE id = %s", (blue,),
                         channel="pgsynapse_images")
        # the blue picture's vector described bytes the row no longer has: it was the top hit for "blue", with the
        # old picture's 48x40, and similar_images() listed it
        hits = await search_by_text(conn, ImageModelCache(), "a blue picture", k=5)
        similar = await (await conn.execute("SELECT image_id FROM pgsynapse.similar_images(%s, 5)", (red,))).fetchall()
        row = await (await conn.execute(
            "SELECT width, height, (SELECT count(*) FROM pgsynapse.image_embeddings WHERE image_id = i.id) AS vectors"
            " FROM pgsynapse.images i WHERE id = %s", (blue,))).fetchone()
        await conn.close()
    assert [h.image_id for h in hits] == [red], hits
    assert similar == [] and row == {"width": None, "height": None, "vectors": 0}, (similar, row)


def test_search_refuses_image_options_it_would_ignore(db_url, tiny_clip_path, tmp_path, capsys):
    with _sync(db_url) as conn:
        registry.add(conn, tiny_clip_path)
    picture = tmp_path / "red.png"
    picture.write_bytes(png_bytes(coloured_image("red", seed=1)))
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    # --image-model without --images searched the documents; --like-image with a text dropped the text: both
    # printed results (or "no results") and exited 0
    for argv, message in [
        # which file was not an image: the message did not say
        (["search", "--like-image", str(text)],
         f"cannot search like {text}: not an image in an allowed format (PNG, JPEG, WEBP, GIF, BMP): text"),
        (["search", "--image-model", "1", "a red picture"],
         "--image-model chooses the model of an image search: add --images to search images by text, or "
         "--like-image PATH"),
        (["search", "--like-image", str(picture), "a red picture"],
         "search --like-image searches by example and takes no text: drop 'a red picture', or search by text "
         "with --images 'a red picture'"),
        # with --images given, the hint to search by text "with --images" was the command as typed
        (["search", "--images", "a red picture", "--like-image", str(picture)],
         f"search --images searches by text and --like-image by example, not both: drop --like-image {picture} to "
         f"search for 'a red picture', or drop --images 'a red picture' to search like {picture}"),
    ]:
        # the CLI configures logging for the process: tests/conftest.py puts it back after each test
        if argv[1:] == ["--like-image", str(text)]:  # a file that is not an image: the search refuses it, exit 1
            assert cli_main(["--database-url", db_url, *argv]) == 1, argv
        else:  # options that contradict each other: a command line argparse refuses (exit 2); they exited 1
            with pytest.raises(SystemExit) as refused:
                cli_main(["--database-url", db_url, *argv])
            assert refused.value.code == 2, argv
        assert message in capsys.readouterr().err, argv


async def test_search_by_text_refuses_a_text_over_its_max_chars(db_url):
    # only the CLI checked the length (search() does, with its max_chars): search_by_text took a text of any size to
    # the CLIP model's tokenizer; here it is refused before any model work (no CLIP model is registered)
    conn = await aconn(db_url)
    try:
        with pytest.raises(InputError, match=r"^the search text has 20,001 characters, over max_question_chars=20,000"):
            await search_by_text(conn, ImageModelCache(), "x" * 20_001)  # the setting's default
        with pytest.raises(InputError, match=r"^the search text has 11 characters, over max_question_chars=10:"):
            await search_by_text(conn, ImageModelCache(), "x" * 11, max_chars=10)
        with pytest.raises(InputError, match=r"^the search text is empty"):
            await search_by_text(conn, ImageModelCache(), " ")
    finally:
        await conn.close()


def test_a_model_wider_than_the_index_takes_is_refused_saying_so(db_url, tmp_path):
    # a ResNet-50 gives 2048-d vectors: the registration failed on the HNSW index with pgvector's own words,
    # "database error: column cannot have more than 2000 dimensions for hnsw index", exit status 69 (try later)
    wide = tiny_vit(tmp_path / "wide-vit", width=2048)
    with _sync(db_url) as conn:
        with pytest.raises(ModelError, match=(
                r"wide-vit gives 2048-dimensional vectors: the vector index \(pgvector HNSW\) takes at most 2000; "
                r"choose a model of at most 2000 dimensions")):
            registry.add(conn, wide)
        assert registry.list_models(conn) == []


async def test_a_model_whose_files_are_gone_is_named_with_what_to_do(db_url, models, tiny_clip_path, tmp_path):
    another = tmp_path / "clip-2"
    shutil.copytree(tiny_clip_path, another)
    with _sync(db_url) as conn:
        registry.add(conn, tiny_clip_path)
        candidate = registry.add(conn, another, name="clip-2")["id"]
    shutil.rmtree(another)
    handler = EmbedImageHandler(fast_settings(db_url, kinds=("embed_image",)), models)
    conn = await aconn(db_url)
    # the worker stopped at start with "image model path does not exist: .../clip-2": which model, and what now?
    try:
        with pytest.raises(ModelError, match=(
                rf"^image model {candidate} \(clip-2, candidate\): image model path does not exist: {another}: "
                rf"restore its files, or retire it \(pgsynapse image-model retire {candidate}\)$")):
            await handler.warm_up(conn)  # as Worker.warm_up calls it
    finally:
        await conn.close()


async def test_a_first_image_encoder_waits_as_a_candidate_while_clip_serves_searches_by_example(
        db_url, models, tiny_clip_path, tiny_vit_path):
    with _sync(db_url) as conn:
        clip = registry.add(conn, tiny_clip_path)["id"]
    pictures = [png_bytes(coloured_image(c, seed=40 + i)) for i, c in enumerate(["red", "red", "blue"])]
    ids = insert_images(db_url, [{"data": p} for p in pictures])
    settings = fast_settings(db_url, kinds=("embed_image",))
    async with running_worker(settings, models):
        conn = await aconn(db_url)
        await wait_until(conn, ALL_DONE, channel="pgsynapse_images")
        await conn.close()
    with _sync(db_url) as sync:
        vit = registry.add(sync, tiny_vit_path)
    # it was active at once with no vector: search --like-image and similar_images() switched to it and found
    # nothing (for hours on a large collection) while the CLIP model had every image
    assert (vit["status"], vit["queued"]) == ("candidate", 3), vit
    conn = await aconn(db_url)
    hits = await search_by_image(conn, ImageModelCache(), pictures[2], k=1)
    similar = await (await conn.execute("SELECT image_id FROM pgsynapse.similar_images(%s, 1)", (ids[2],))).fetchall()
    assert [h.image_id for h in hits] == [ids[2]] and len(similar) == 1, (hits, similar)
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT count(*) = 6 FROM pgsynapse.image_embeddings", channel="pgsynapse_images")
    await conn.close()
    with _sync(db_url) as sync:
        assert registry.promote(sync, vit["id"]) == {"active": vit["id"], "previous": None, "kind": "image"}
        assert [(m["id"], m["status"]) for m in registry.list_models(sync)] == [(clip, "active"), (vit["id"], "active")]


def test_registry_lifecycle(db_url, tiny_clip_path, tiny_vit_path, tmp_path):
    with _sync(db_url) as conn:
        insert_images(db_url, [{"data": png_bytes(coloured_image("red", seed=7))}])
        with capture_logs() as logs:
            first = registry.add(conn, tiny_clip_path)
        # the check before registering loads a model with no id yet: it said "model=0 dim=0"
        [probe] = [e for e in logs if e["event"] == "image_model_loaded"]
        assert probe["unregistered"] is True and "model" not in probe and "dim" not in probe, probe
        # the same model twice: every image would be embedded twice for the same vectors
        with pytest.raises(PgsynapseError, match=r"is already image model 1 \(active\): retire it first to add it"):
            registry.add(conn, str(tiny_clip_path) + "/")
        another = tmp_path / "clip-2"
        shutil.copytree(tiny_clip_path, another)
        second = registry.add(conn, another, name="clip-2")
        assert (first["status"], second["status"], second["queued"]) == ("active", "candidate", 0)  # already queued
        with pytest.raises(PgsynapseError, match="has vectors for 0 of 1 images"):
            registry.promote(conn, second["id"])
        with pytest.raises(PgsynapseError, match="is active: promote another clip model first"):
            registry.retire(conn, first["id"])
        with pytest.raises(ModelError, match="holds a 'image' model, not 'clip'"):
            registry.add(conn, tiny_vit_path, kind="clip")
        with pytest.raises(ModelError, match="has neither pgsynapse_image.json nor a transformers config.json"):
            registry.add(conn, tiny_vit_path.parent)
        n = registry.retire(conn, second["id"])
        assert n == 0 and registry.get(conn, second["id"])["status"] == "retired"
        with pytest.raises(PgsynapseError, match=f"^image model {second['id']} is already retired: nothing to do$"):
            registry.retire(conn, second["id"])  # it said "retired, 0 vectors deleted" again
        assert not conn.execute("SELECT 1 FROM pg_indexes WHERE indexname = %s",
                                (f"image_embeddings_hnsw_m{second['id']}",)).fetchone()
        assert conn.execute("SELECT 1 FROM pg_indexes WHERE indexname = %s",
                            (f"image_embeddings_hnsw_m{first['id']}",)).fetchone()


async def test_the_only_model_of_its_kind_can_be_retired_and_new_images_then_wait(db_url, models, tiny_clip_path,
                                                                                    capsys):
    # "image model 1 is active: promote another clip model first": with no other model to promote, nothing could
    # stop the embedding of every new image once a model was added
    with _sync(db_url) as conn:
        clip = registry.add(conn, tiny_clip_path)["id"]
    insert_images(db_url, [{"data": png_bytes(coloured_image("red", seed=3))}])
    settings = fast_settings(db_url, kinds=("embed_image",))
    conn = await aconn(db_url)
    async with running_worker(settings, models):
        await wait_until(conn, ALL_DONE, channel="pgsynapse_images")
    capsys.readouterr()  # the worker's log
    assert cli_main(["--database-url", db_url, "image-model", "retire", str(clip)]) == 0
    assert capsys.readouterr().out == (
        f"image model {clip} retired, 1 vectors deleted\n"
        "no image model is left: new images are not embedded, they wait (pending) until `pgsynapse image-model add "
        "PATH` queues them all\n")
    [later] = insert_images(db_url, [{"data": png_bytes(coloured_image("blue", seed=4))}])
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.jobs WHERE kind = 'embed_image' AND ref_id = %s "
                               "AND status IN ('pending', 'running')", (later,), channel="pgsynapse_jobs")
    row = await (await conn.execute(
        "SELECT i.status, (SELECT count(*) FROM pgsynapse.image_embeddings) AS vectors, j.skip_reason FROM "
        "pgsynapse.images i JOIN pgsynapse.jobs j ON j.kind = 'embed_image' AND j.ref_id = i.id WHERE i.id = %s",
        (later,))).fetchone()
    assert row == {"status": "pending", "vectors": 0,
                   "skip_reason": "no image model (none added, or all retired): pgsynapse image-model add PATH"}, row
    with pytest.raises(PgsynapseError, match="no active CLIP model"):
        await search_by_text(conn, ImageModelCache(), "a blue picture")
    await conn.close()
    with _sync(db_url) as sync:
        assert not sync.execute("SELECT 1 FROM pg_indexes WHERE indexname = %s",
                                (f"image_embeddings_hnsw_m{clip}",)).fetchone()
        again = registry.add(sync, tiny_clip_path)  # the same path again, now that it is retired
    # both queued: the red one's vectors went with the retired model, the blue one waited
    assert (again["status"], again["queued"]) == ("active", 2), again


async def test_answers_cite_the_images_of_the_documents_they_cite(db_url, models, tiny_clip_path):
    with _sync(db_url) as conn:
        registry.add(conn, tiny_clip_path)
        vacuum, wal = (conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES (%s, %s) RETURNING id", d).fetchone()["id"]
                       for d in [("Routine Vacuuming", "VACUUM reclaims storage occupied by dead tuples. Run it regularly."),
                                 ("Write-Ahead Log", "WAL records every change before it reaches the data files.")])
    [diagram, _] = insert_images(db_url, [
        {"data": png_bytes(coloured_image("red", seed=8)), "caption": "dead tuples before and after VACUUM", "document_id": vacuum},
        {"data": png_bytes(coloured_image("blue", seed=9)), "caption": "the WAL buffers", "document_id": wal}])
    settings = fast_settings(db_url, kinds=("embed", "embed_image", "answer"))
    async with running_worker(settings, models):
        conn = await aconn(db_url)
        await wait_until(conn, ALL_DONE, channel="pgsynapse_images")
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'")
        async with Client(db_url) as client:
            result = await client.ask("How do I reclaim the storage of dead tuples?", timeout=60)
        await conn.close()
    assert result.status == "answered"
    first = result.sources[0]
    assert first["document_id"] == vacuum
    assert first["images"] == [{"image_id": diagram, "caption": "dead tuples before and after VACUUM",
                                "mime_type": "image/png", "width": 48, "height": 40, "source": None}]
    assert all("images" not in s or s["document_id"] == wal for s in result.sources[1:])
    assert f"image {diagram}: dead tuples before and after VACUUM (48x40 image/png)" in format_result(result)


class PoisonedImageHandler(EmbedImageHandler):
    """The real handler, with a model step that raises on any batch holding a 13-pixel-wide image (a fault
    injected in the test, as tests/chaos/faulty_worker.py does for documents)."""

    def _encode(self, items, models):
        if any(item.decoded and item.decoded.width == 13 for item in items):
            raise ValueError("model step failed on a 13-pixel-wide image")
        return super()._encode(items, models)


async def test_a_poisoned_image_is_bisected_out_of_its_batch(db_url, models, tiny_clip_path):
    with _sync(db_url) as conn:
        registry.add(conn, tiny_clip_path)
    rows = [{"data": png_bytes(coloured_image("red", seed=i)), "caption": f"ok {i}"} for i in range(7)]
    rows.insert(3, {"data": png_bytes(coloured_image("blue", seed=99, size=(13, 20))), "caption": "poisoned"})
    insert_images(db_url, rows)
    settings = fast_settings(db_url, kinds=("embed_image",), batch_size=8)
    async with running_worker(settings, models, handlers={"embed_image": PoisonedImageHandler(settings, models)}):
        conn = await aconn(db_url)
        await wait_until(conn, ALL_DONE, channel="pgsynapse_images")
        got = {r["caption"]: r for r in await (await conn.execute(
            "SELECT i.caption, i.status, i.error, j.attempts FROM pgsynapse.images i"
            " JOIN pgsynapse.jobs j ON j.kind = 'embed_image' AND j.ref_id = i.id")).fetchall()}
        await conn.close()
    assert got.pop("poisoned") == {"caption": "poisoned", "status": "failed", "attempts": 3,
                                   "error": "ValueError: model step failed on a 13-pixel-wide image"}
    assert {r["status"] for r in got.values()} == {"embedded"} and {r["attempts"] for r in got.values()} == {1}


class RetiringImageHandler(EmbedImageHandler):
    """The real handler, with a candidate model retired (by `pgsynapse image-model retire`, in another session)
    while the batch is computed: after the vectors are computed, before they are written."""

    def __init__(self, settings, models, url: str, retire: int) -> None:
        super().__init__(settings, models)
        self.url, self.retire = url, retire

    def compute(self, work):
        outcomes = super().compute(work)
        if self.retire:
            with _sync(self.url) as conn:
                registry.retire(conn, self.retire)
            self.retire = 0
        return outcomes


async def test_a_model_retired_while_a_batch_computes_gets_no_vectors(db_url, models, tiny_clip_path, tmp_path):
    another = tmp_path / "clip-2"
    shutil.copytree(tiny_clip_path, another)
    with _sync(db_url) as conn:
        registry.add(conn, tiny_clip_path)
        candidate = registry.add(conn, another)["id"]
    insert_images(db_url, [{"data": png_bytes(coloured_image("red", seed=31))}])
    settings = fast_settings(db_url, kinds=("embed_image",))
    handler = RetiringImageHandler(settings, models, db_url, candidate)
    async with running_worker(settings, models, handlers={"embed_image": handler}):
        conn = await aconn(db_url)
        await wait_until(conn, ALL_DONE, channel="pgsynapse_images")
        await conn.close()
    with _sync(db_url) as conn:
        listed = {r["id"]: (r["status"], r["vectors"]) for r in registry.list_models(conn)}
    # the retired model's vectors were written after retire had deleted them: kept for ever, with no index
    assert listed == {1: ("active", 1), candidate: ("retired", 0)}, listed


async def test_onnx_export_of_an_image_tower_is_a_candidate_promoted_once_complete(db_url, models, tiny_vit_path,
                                                                                  tmp_path, capsys):
    with _sync(db_url) as conn:
        vit = registry.add(conn, tiny_vit_path)
    ids = insert_images(db_url, [{"data": png_bytes(coloured_image(c, seed=i))} for i, c in enumerate(list(COLOURS) * 2)])
    settings = fast_settings(db_url, kinds=("embed_image",))
    async with running_worker(settings, models):
        conn = await aconn(db_url)
        await wait_until(conn, ALL_DONE, channel="pgsynapse_images")

        def export() -> int:  # the CLI's command, in-process (its parser, its settings)
            args = cli_parser().parse_args(["image-model", "export", str(vit["id"]), "--dest", str(tmp_path / "onnx")])
            return run_image_model_command(args, settings)

        assert await anyio.to_thread.run_sync(export) == 0
        out = capsys.readouterr().out
        assert f"onnx: registered image model {vit['id'] + 1} (candidate)" in out
        report = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
        assert report["sample"] == 8 and report["min_cosine"] >= 0.99
        # the worker embeds every image with the candidate too; then it can be promoted
        await wait_until(conn, "SELECT count(*) = 16 FROM pgsynapse.image_embeddings", channel="pgsynapse_images")
        await conn.close()
    with _sync(db_url) as sync:
        assert registry.promote(sync, vit["id"] + 1) == {"active": vit["id"] + 1, "previous": vit["id"], "kind": "image"}
        assert registry.get(sync, vit["id"] + 1)["runtime"] == "onnx"
    conn = await aconn(db_url)
    hits = await search_by_image(conn, ImageModelCache(), png_bytes(coloured_image("blue", seed=2)), k=1)
    await conn.close()
    assert hits[0].image_id == ids[2] and hits[0].score > 0.999


def test_import_efficientnet_registers_its_onnx_runtime(db_url, tmp_path, capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    settings = fast_settings(db_url)
    args = cli_parser().parse_args(["image-model", "import-efficientnet", str(tmp_path / "effnet")])
    assert run_image_model_command(args, settings) == 0
    out = capsys.readouterr().out
    assert "ONNX runtime written to" in out and "image model 1 (image, 1280-d, onnx): active" in out
    with _sync(db_url) as conn:
        row = registry.get(conn, 1)
    assert (row["name"], row["artifact_path"]) == ("efficientnet-lite0-onnx", str(tmp_path / "effnet-onnx"))
    # the pretrained features tell a photo's copy from other pictures
    enc = ImageModelCache().get(row)
    photos = [coloured_image(c, seed=i, size=(256, 240)) for i, c in enumerate(COLOURS)]
    v = enc.encode_images(photos + [photos[1].rotate(3)])
    assert int(np.argmax(v[:4] @ v[4])) == 1


def test_similar_images_says_why_it_has_nothing_to_compare(db_url, tiny_clip_path):
    """similar_images() said "no active image model" for a model id that does not exist, and returned no row, without
    a word, for an image that is not embedded (pending, failed) or does not exist, or under a retired model."""
    call = "SELECT * FROM pgsynapse.similar_images(%s, 5, %s)"
    with _sync(db_url) as conn:
        clip = registry.add(conn, tiny_clip_path)
        other = conn.execute("INSERT INTO pgsynapse.image_models (name, kind, artifact_path, runtime, dim, status)"
                             " SELECT 'old', kind, artifact_path, runtime, dim, 'retired' FROM pgsynapse.image_models"
                             " WHERE id = %s RETURNING id", (clip["id"],)).fetchone()["id"]
    pending, failed = insert_images(db_url, [{"data": png_bytes(coloured_image("blue", seed=1))},
                                             {"data": png_bytes(coloured_image("red", seed=2))}])
    with _sync(db_url) as conn:
        conn.execute("UPDATE pgsynapse.images SET status = 'failed', error = 'InputError: not an image' WHERE id = %s",
                     (failed,))
    for args, says in (((pending, 99), "image model 99 does not exist (pgsynapse image-model list)"),
                       ((pending, other), f"image model {other} is retired: its vectors are gone; leave the model out "
                                          "for the active one"),
                       ((424242, None), "image 424242 does not exist")):
        with _sync(db_url) as conn, pytest.raises(psycopg.errors.RaiseException) as exc:
            conn.execute(call, args)
        assert exc.value.diag.message_primary == says, args
    # an image with no vector gives no row, saying why in a NOTICE: a LATERAL join over many images goes on
    for image, says in ((pending, f"image {pending} has no vector yet (pending): the worker embeds it"),
                        (failed, f"image {failed} failed: InputError: not an image")):
        with _sync(db_url) as conn:
            notices = []
            conn.add_notice_handler(lambda n: notices.append(n.message_primary))
            assert conn.execute(call, (image, None)).fetchall() == []
        assert notices == [says], image
