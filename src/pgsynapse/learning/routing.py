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


def share_left(asked: float, held: float) -> float:
    """The share a candidate joining the A/B test gets: what it ``asked``, at most what the other candidates'
    ``held`` leaves (candidates take consecutive bucket ranges: one past 100 % would get less than said, without a
    word). The retrains of the text model, the ranker and the SQL model all register theirs so."""
    return max(0.0, min(float(asked), 100.0 - float(held)))


def served_shares(versions: Sequence[dict[str, Any]], routable: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``versions`` with the active version's ``traffic_percent`` the share it serves: what the
    candidates routed leave it (its row says 100 whatever they take). A candidate's is its own share. ``routable``:
    the rows of ``routable_versions`` (answers.sql), the one rule of which versions get sessions."""
    taken = min(100.0, sum(float(v["traffic_percent"]) for v in routable if v["status"] == "candidate"))
    return [{**v, "traffic_percent": 100.0 - taken} if v["status"] == "active" else v for v in versions]
