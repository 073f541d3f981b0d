"""Chaos suite: figures of each scenario go to tests/chaos/.results/last_run.json (gitignored), which
docs/reliability.md's table is filled from."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

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
