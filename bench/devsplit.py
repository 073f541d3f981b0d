"""The fixed split of the held-out dev questions (pg_docs_dev.jsonl) into a ``tune`` half and a ``report`` half.

Choose settings on ``tune`` only; headline figures come from ``report``. A question's half is decided by its own
text alone, so the split does not depend on the file's order, survives added questions (each new one lands in a
half by the same rule), and anyone can recompute it:

    half(q) = "tune" if sha256(q["q"].strip().lower().encode()).digest()[0] % 2 == 0 else "report"

    python -m bench.devsplit          # prints the count of each half and its questions

A second held-out set, ``bench/data/user_questions.jsonl`` (146 questions written in users' own words, each with the
pages that answer it, checked against the page text; never trained on), is split by the same rule into
``users-tune`` and ``users-report``: 27 report questions can tell apart about ±11 points of recall@5, so the
figures that decide a default are also read on the larger set. :func:`held_out` gives all four.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bench.common import questions, run_benchmark

HALVES = ("tune", "report")
USERS = Path(__file__).parent / "data" / "user_questions.jsonl"
# the sets of held_out(), in a fixed order: choose on the *tune ones, report the *report ones
SETS = ("tune", "report", "users-tune", "users-report")


def half(question: str) -> str:
    """``tune`` or ``report``: the half of one question, from the SHA-256 of its stripped, lower-cased text."""
    return HALVES[hashlib.sha256(question.strip().lower().encode()).digest()[0] % 2]


def split(questions: list[dict[str, Any]], key: str = "q") -> dict[str, list[dict[str, Any]]]:
    """``{"tune": [...], "report": [...]}``, each in the input's order."""
    out: dict[str, list[dict[str, Any]]] = {h: [] for h in HALVES}
    for item in questions:
        out[half(item[key])].append(item)
    return out


def held_out() -> dict[str, list[dict[str, Any]]]:
    """The dev halves and the user-worded set's halves (:data:`SETS`), each ``{"q", "relevant": [...]}``."""
    users = split([json.loads(line) for line in USERS.open()])
    return {**split(questions("pg_docs_dev.jsonl")), **{f"users-{h}": users[h] for h in HALVES}}


def main() -> None:
    for name, items in held_out().items():
        print(f"{name}: {len(items)}")
        for item in items:
            print(f"  {item['q']}")


if __name__ == "__main__":
    run_benchmark(main)
