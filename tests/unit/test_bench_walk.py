"""The benchmarks as a contributor runs them (`python -m bench.NAME`, BENCHMARKS.md): what one needs is asked for
before any work, a missing data file is named in a line, and nothing is left behind in the temp dir."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_peers_without_pgai_stops_before_any_work(tmp_path):
    venv = tmp_path / "no-pgai"
    r = bench("bench.peers", "--quick", "--pgai-venv", str(venv))
    assert r.returncode == 1, r.stderr
    assert f"pgai not found at {venv}/bin/pgai: python3 -m venv {venv}" in r.stderr
    # the pgsynapse half (minutes) did not run first: no server started, no result printed
    out = r.stdout + r.stderr
    assert "embedded_postgres_started" not in out
    assert '"bench": "peers"' not in out


def test_a_missing_data_file_is_named_with_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "DATA", tmp_path)
    with pytest.raises(SystemExit, match=rf"bench: {tmp_path}/pg_docs_dev.jsonl not found: .*PGSYNAPSE_BENCH_DATA"):
        common.questions("pg_docs_dev.jsonl")


def test_runtimes_leaves_no_work_dir_behind(tmp_path):
    r = bench("bench.runtimes", "--quick", "--runtimes", "torch", "--pages", "1", "--rounds", "1",
              env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"name": "torch"' in r.stdout
    assert not list(tmp_path.glob("pgsynapse-runtimes-*"))
