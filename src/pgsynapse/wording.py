"""Small pieces of wording that messages share."""

from __future__ import annotations

from collections.abc import Sequence


def listed(names: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` names, and how many more: what a message has room for ("a, b, c and 4 more")."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
