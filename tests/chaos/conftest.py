"""Chaos suite: figures of each scenario go to tests/chaos/.results/last_run.json (gitignored), which
docs/reliability.md's table is filled from.

The suite tests what ships: workers run the default runtime (onnx-int8, exported once per test session by the
same start-up export a fresh install runs, then adopted by each scenario's database: the ``default_runtime``
fixture of tests/conftest.py) and the default settings,
except a short lease where a scenario waits for leases to run out. Each database gets a write audit
(:func:`tests.chaos.invariants.install_audit`) so duplicates are counted per row.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.invariants import install_audit
from tests.helpers import adopt_runtime

RESULTS = Path(__file__).parent / ".results" / "last_run.json"


@pytest.fixture
def record(request: pytest.FixtureRequest, full: bool):
    """``record(**figures)``: store this scenario's figures under its test name (merged into the results file)."""

    def write(**figures: Any) -> None:
        RESULTS.parent.mkdir(exist_ok=True)
        # pytest-xdist's workers finish scenarios at the same time: one read-modify-write at a time
        with open(RESULTS.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = json.loads(RESULTS.read_text())
            except (OSError, ValueError):
                data = {}
            data[request.node.name] = {**figures, "full": full,
                                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    return write


def adopt(url: str, version: dict[str, Any]) -> None:
    """Give a scenario's database the exported version and the write audit."""
    adopt_runtime(url, version)
    install_audit(url)


@pytest.fixture
def db_url(new_db, template_db: str, default_runtime: dict[str, Any]) -> str:
    url = new_db(template_db)
    adopt(url, default_runtime)
    return url


@pytest.fixture(autouse=True)
def shipped_runtime(shipped: Callable[[str], None]) -> None:
    """Worker subprocesses of this suite run the default runtime (tests/conftest.py's ``shipped``; the rest of the
    tests pin torch)."""
