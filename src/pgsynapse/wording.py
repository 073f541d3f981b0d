"""Small pieces of wording that messages share."""

from __future__ import annotations

from collections.abc import Sequence


def listed(names: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` names, and how many more: what a message has room for ("a, b, c and 4 more")."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def counted(n: int, word: str, words: str | None = None) -> str:
    """``n`` and the word in its number: "1 row", "2 rows", "1 entry" ("entries" given as ``words``)."""
    return f"{n} {word if n == 1 else words or word + 's'}"
