"""The commands' --json output: numeric columns stay numbers and times are ISO 8601 (`status --json` gave a ranker's
traffic as the string "0.00" and times as "2026-12-06 17:15:44+00:00")."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from pgsynapse.jsonout import dumps


def test_numbers_stay_numbers_and_times_are_iso():
    out = json.loads(dumps({"traffic_percent": Decimal("0.00"), "share": Decimal("12.50"),
                            "seen": datetime(2026, 12, 6, 17, 15, 44, tzinfo=timezone.utc), "path": Path("/m")}))
    assert out == {"traffic_percent": 0, "share": 12.5, "seen": "2026-12-06T17:15:44+00:00", "path": "/m"}
