"""SIGKILL mid-batch of embed_image: a worker process is killed while it holds a claimed, leased batch of images
(the moment is an event the worker logs once its jobs are claimed), the application keeps inserting and changing
images meanwhile, and a restarted worker finishes: every image ends with exactly one current set of vectors,
the bad ones with their error, and no job is lost, left running or done twice."""

from __future__ import annotations

import signal
from pathlib import Path

import psycopg
import pytest

from pgsynapse.images import registry
from tests.chaos.invariants import QUIET, assert_exactly_once
from tests.helpers import aconn, spawn_worker, wait_until
from tests.image_models import COLOURS, coloured_image, png_bytes

pytestmark = pytest.mark.anyio

FAULTY = [str(Path(__file__).with_name("faulty_worker.py"))]
ENV = {"PGSYNAPSE_LEASE_SECONDS": "1"}  # killed batches come back fast; otherwise the default settings
KINDS = ("--kinds", "embed_image")


def _insert(url: str, images: list[bytes]) -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO pgsynapse.images (data) SELECT unnest(%s::bytea[]) RETURNING id", (images,))
        return [r[0] for r in cur.fetchall()]


def _images(n: int, seed: int) -> list[bytes]:
    colours = list(COLOURS)
    return [png_bytes(coloured_image(colours[i % len(colours)], seed=seed + i)) for i in range(n)]


async def test_sigkill_mid_image_batch_loses_and_duplicates_nothing(db_url, tiny_clip_path, record):
    with psycopg.connect(db_url, autocommit=True) as conn:
        registry.add(conn, tiny_clip_path)
    ids = _insert(db_url, _images(40, seed=0) + [b"", b"not an image"])
    conn = await aconn(db_url)
    kills, killed_jobs = 0, 0
    for round_ in range(3):
        worker = spawn_worker(db_url, *KINDS, entry=FAULTY, env={**ENV, "CHAOS_SLOW_IMAGES_SECONDS": "60"})
        try:
            ev = worker.wait_event("chaos_image_batch_computing")
            # the batch's jobs are claimed and leased at this moment: the process dies holding them
            row = await (await conn.execute(
                "SELECT count(*) AS n FROM pgsynapse.jobs WHERE kind = 'embed_image' AND status = 'running'"
                " AND ref_id = ANY(%s)", (ev["refs"],))).fetchone()
            assert row["n"] == len(ev["refs"]) > 0
            worker.proc.send_signal(signal.SIGKILL)
            worker.proc.wait(30)
            kills, killed_jobs = kills + 1, killed_jobs + len(ev["refs"])
        finally:
            worker.stop()
        # the application goes on meanwhile: new images, and one changed while its job may be in flight
        ids += _insert(db_url, _images(4, seed=100 * (round_ + 1)))
        await conn.execute("UPDATE pgsynapse.images SET data = %s WHERE id = %s",
                           (png_bytes(coloured_image("green", seed=500 + round_)), ids[round_]))
    worker = spawn_worker(db_url, *KINDS, env=ENV)  # what ships: no fault, default settings
    try:
        await wait_until(conn, QUIET, channel="pgsynapse_images")
    finally:
        worker.stop()
    result = assert_exactly_once(db_url)
    totals = result["totals"]
    assert (totals["images"], totals["images_failed"]) == (len(ids), 2)
    assert totals["image_embeddings"] == len(ids) - 2
    failed = await (await conn.execute("SELECT error FROM pgsynapse.images WHERE status = 'failed' ORDER BY id")).fetchall()
    assert [r["error"] for r in failed] == ["InputError: empty image data (0 bytes)",
                                            "InputError: not an image in an allowed format (PNG, JPEG, WEBP, GIF, BMP): text"]
    await conn.close()
    record(kills=kills, killed_jobs=killed_jobs, images=len(ids), **result["violations"])
