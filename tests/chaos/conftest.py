"""Chaos suite: figures of each scenario go to tests/chaos/.results/last_run.json (gitignored), which
docs/reliability.md's table is filled from.

The suite tests what ships: workers run the default runtime (onnx-int8, exported once per test session by the
same start-up export a fresh install runs, then adopted by each scenario's database) and the default settings,
except a short lease where a scenario waits for leases to run out. Each database gets a write audit
(:func:`tests.chaos.invariants.install_audit`) so duplicates are counted per row.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from pgsynapse.config import load_settings
from pgsynapse.export import optimise_active_version
from tests.chaos.invariants import install_audit

RESULTS = Path(__file__).parent / ".results" / "last_run.json"


@pytest.fixture
def record(request: pytest.FixtureRequest, full: bool):
    """``record(**figures)``: store this scenario's figures under its test name (merged into the results file)."""

    def write(**figures: Any) -> None:
        RESULTS.parent.mkdir(exist_ok=True)
        try:
            data = json.loads(RESULTS.read_text())
        except (OSError, ValueError):
            data = {}
        data[request.node.name] = {**figures, "full": full, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    return write


@pytest.fixture(scope="session")
def default_runtime(pg_url: str, template_db: str) -> Iterator[dict[str, Any]]:
    """The active version as a fresh install leaves it after its first worker start: exported to the default
    runtime, with its artifact. Returns the ``model_versions`` columns a scenario's database adopts."""
    from tests.conftest import _with_db, drop_database

    data_dir = Path(tempfile.mkdtemp(prefix="pgsynapse-chaos-models-", dir="/tmp"))
    name = f"pgsynapse_int8_{data_dir.name[-8:].lower()}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    url = _with_db(pg_url, name)
    try:
        # the export's agreement check on its smallest sample: the same export and INT8 schemes in a fraction
        # of the time (tests/integration/test_runtime_switch.py checks the agreement itself)
        settings = load_settings(environ={}, database_url=url, data_dir=data_dir, export_sample_chunks=16)
        assert settings.runtime == "onnx-int8"  # the default, the one this suite must run
        optimise_active_version(settings, url)
        with psycopg.connect(url, row_factory=dict_row) as conn:
            row = conn.execute("SELECT runtime, artifact_path, metrics FROM pgsynapse.model_versions WHERE id = 1").fetchone()
        assert row and row["runtime"] != "torch", row
        yield {**row, "data_dir": str(data_dir)}
    finally:
        drop_database(pg_url, name)
        shutil.rmtree(data_dir, ignore_errors=True)


def adopt(url: str, version: dict[str, Any]) -> None:
    """Give a scenario's database the exported version and the write audit."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pgsynapse.model_versions SET runtime = %s, artifact_path = %s, metrics = %s::jsonb"
                     " WHERE id = 1", (version["runtime"], version["artifact_path"], json.dumps(version["metrics"])))
    install_audit(url)


@pytest.fixture
def db_url(new_db, template_db: str, default_runtime: dict[str, Any]) -> str:
    url = new_db(template_db)
    adopt(url, default_runtime)
    return url


@pytest.fixture(autouse=True)
def shipped_runtime(monkeypatch: pytest.MonkeyPatch, default_runtime: dict[str, Any]) -> None:
    """Worker subprocesses of this suite run the default runtime (the rest of the tests pin torch)."""
    monkeypatch.setenv("PGSYNAPSE_RUNTIME", "onnx-int8")
    monkeypatch.setenv("PGSYNAPSE_DATA_DIR", default_runtime["data_dir"])
