"""A/B routing: a stable hash of the session id picks the model version, so a session never flips."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

BUCKETS = 10_000


def bucket(key: str) -> int:
    """A stable bucket in [0, 10000) for a session id (the same in every process and on every run)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % BUCKETS


def choose_version(versions: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The active version, unless the key's bucket falls in a candidate's traffic share.

    ``versions`` are the rows of ``routable_versions``: the active one plus backfilled candidates with traffic.
    Candidates take consecutive bucket ranges from 0 (in id order); the active version takes the rest.
    Raising a candidate's share only moves more sessions to it: none moves back.
    """
    active = next((v for v in versions if v["status"] == "active"), None)
    if active is None:
        raise LookupError("no active model version")
    b = bucket(key)
    edge = 0
    for v in versions:
        if v["status"] != "candidate":
            continue
        edge += int(round(float(v["traffic_percent"]) * BUCKETS / 100))
        if b < edge:
            return v
    return active
