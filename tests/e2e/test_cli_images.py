"""The image commands as a user runs them: add a model, ingest images beside documents, search by text and by
image, status."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import anyio
import pytest

from tests.helpers import fast_settings, pgsynapse, running_worker
from tests.image_models import coloured_image, png_bytes

pytestmark = pytest.mark.anyio


async def test_image_commands_end_to_end(db_url, models, tiny_clip_path, tmp_path):
    add = pgsynapse("image-model", "add", str(tiny_clip_path), "--name", "tiny-clip", url=db_url)
    assert add.returncode == 0, add.stderr
    assert "image model 1 (clip, 16-d, torch): active; 0 images queued for it" in add.stdout

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "palette.md").write_text("# Palette\n\nThe colours we use.\n")
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        (tmp_path / "docs" / f"palette-{colour}.png").write_bytes(png_bytes(coloured_image(colour, seed=i)))
    (tmp_path / "query.jpg").write_bytes(png_bytes(coloured_image("blue", seed=2), fmt="JPEG"))

    async with running_worker(fast_settings(db_url, kinds=("embed", "embed_image")), models):
        ing = await anyio.to_thread.run_sync(lambda: pgsynapse(
            "ingest", "--no-progress", "--follow", "--follow-timeout", "120", str(tmp_path / "docs"), url=db_url))
    assert ing.returncode == 0, ing.stdout + ing.stderr
    assert "images: 4 inserted, 0 unchanged" in ing.stdout and "images embedded: 4, failed: 0" in ing.stdout

    by_text = pgsynapse("search", "--images", "a yellow picture", "-k", "1", url=db_url)
    assert by_text.returncode == 0, by_text.stderr
    assert by_text.stdout.startswith("1. ") and "palette-yellow.png  48x40 image/png  document 1: Palette" in by_text.stdout
    like = pgsynapse("search", "--like-image", str(tmp_path / "query.jpg"), "-k", "1", url=db_url)
    assert like.returncode == 0 and "palette-blue.png" in like.stdout, like.stdout + like.stderr
    status = pgsynapse("status", url=db_url)
    assert "images         : 4 (0 pending, 0 failed)" in status.stdout
    assert "image model 1  : active clip tiny-clip (torch, dim 16), 4/4 images embedded" in status.stdout
    listed = json.loads(pgsynapse("image-model", "list", "--json", url=db_url).stdout)
    assert [(m["id"], m["status"], m["vectors"]) for m in listed] == [(1, "active", 4)]


def _at_most_4_gib() -> None:
    """A child's address space, bounded: reading /dev/zero whole fails at once instead of filling the host."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_search_like_image_refuses_a_pipe_a_device_and_a_file_over_the_limit_unread(db_url, tmp_path):
    # it read the whole file first: a named pipe hung it, /dev/zero filled memory (MemoryError traceback), and a
    # file over max_image_bytes was read whole before the limit was checked
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * 1996)
    env = {**os.environ, "DATABASE_URL": db_url, "PGSYNAPSE_MAX_IMAGE_BYTES": "1000"}
    for path, said in [
        (fifo, f"cannot search like {fifo}: not a regular file (a named pipe): give an image file"),
        ("/dev/zero", "cannot search like /dev/zero: not a regular file (a character device): give an image file"),
        (big, f"cannot search like {big}: 2,000 bytes, over max_image_bytes=1,000"),
    ]:
        r = subprocess.run([sys.executable, "-m", "pgsynapse", "search", "--like-image", str(path)], env=env,
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                           preexec_fn=_at_most_4_gib)
        assert (r.returncode, r.stdout) == (1, ""), (path, r.returncode, r.stdout, r.stderr[-2000:])
        assert said in r.stderr and "Traceback" not in r.stderr, (path, r.stderr[-2000:])
