"""``pgsynapse`` with the real embed handler plus one injected fault, for chaos tests that need a subprocess.

    python tests/chaos/faulty_worker.py --database-url URL --log-format json run --no-migrate

Faults (environment):
- ``CHAOS_POISON_MARKER``: a document whose body contains it makes the model step raise (a poisoned row).
- ``CHAOS_KILL_MARKER``: a document whose body contains it kills the whole process (SIGKILL) in the model step:
  a row that crashes its worker (a native library fault, the OOM killer).
- ``CHAOS_SLOW_SECONDS``: every batch's compute takes this much longer (a slow model, for overload tests).
- ``CHAOS_SLOW_IMAGES_SECONDS``: every embed_image batch logs ``chaos_image_batch_computing`` (its jobs are
  claimed and leased) and then computes this much longer, so a test can SIGKILL the process mid-batch.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pgsynapse import cli  # noqa: E402
from pgsynapse.handlers.embed import EmbedHandler  # noqa: E402
from pgsynapse.handlers.embed_image import EmbedImageHandler  # noqa: E402
from pgsynapse.listener import worker as worker_module  # noqa: E402
from pgsynapse.logs import get_logger  # noqa: E402

log = get_logger("chaos")

MARKER = os.environ.get("CHAOS_POISON_MARKER", "")
KILL_MARKER = os.environ.get("CHAOS_KILL_MARKER", "")
SLOW = float(os.environ.get("CHAOS_SLOW_SECONDS", "0") or 0)
SLOW_IMAGES = float(os.environ.get("CHAOS_SLOW_IMAGES_SECONDS", "0") or 0)


class FaultyEmbedHandler(EmbedHandler):
    def compute(self, work):
        if SLOW:
            time.sleep(SLOW)  # the handler's own slowness (a slow model), never a test's wait
        return super().compute(work)

    def _encode(self, items, embedders):
        for item in items:
            if KILL_MARKER and KILL_MARKER in (item.body or ""):
                os.kill(os.getpid(), signal.SIGKILL)
            if MARKER and MARKER in (item.body or ""):
                raise ValueError(f"cannot encode poisoned document {item.job.ref_id}")
        return super()._encode(items, embedders)


class SlowEmbedImageHandler(EmbedImageHandler):
    def compute(self, work):
        if SLOW_IMAGES:
            log.info("chaos_image_batch_computing", n=len(work), refs=[w.job.ref_id for w in work])
            time.sleep(SLOW_IMAGES)  # the batch's own slowness, so a kill lands while it is leased; never a test's wait
        return super().compute(work)


_real_registry = worker_module.registry
worker_module.registry = lambda: {**_real_registry(), "embed": FaultyEmbedHandler, "embed_image": SlowEmbedImageHandler}

if __name__ == "__main__":
    raise SystemExit(cli.main(sys.argv[1:]))
