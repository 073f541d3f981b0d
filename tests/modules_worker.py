"""``pgsynapse`` that reports, as its last log line, which heavy libraries the process imported.

    python tests/modules_worker.py --database-url URL --log-format json run --no-migrate

At exit it writes ``{"event": "modules_at_exit", "torch": ..., "transformers": ..., "sentence_transformers": ...}``
to stderr, the JSON log's stream, so ``WorkerProcess.wait_event`` reads it like any other event.
"""

from __future__ import annotations

import atexit
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgsynapse.cli import program  # noqa: E402

HEAVY = ("torch", "transformers", "sentence_transformers")


@atexit.register
def _report() -> None:
    print(json.dumps({"event": "modules_at_exit", **{name: name in sys.modules for name in HEAVY}}),
          file=sys.stderr, flush=True)


program()  # as the console script: a stopped worker ends at once, after the exit handlers (this one too)
