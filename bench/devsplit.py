"""The fixed split of the held-out dev questions (pg_docs_dev.jsonl) into a ``tune`` half and a ``report`` half.

Choose settings on ``tune`` only; headline figures come from ``report``. A question's half is decided by its own
text alone, so the split does not depend on the file's order, survives added questions (each new one lands in a
half by the same rule), and anyone can recompute it:

    half(q) = "tune" if sha256(q["q"].strip().lower().encode()).digest()[0] % 2 == 0 else "report"

    python -m bench.devsplit          # prints the count of each half and its questions
"""

from __future__ import annotations

import hashlib
from typing import Any

HALVES = ("tune", "report")


def half(question: str) -> str:
    """``tune`` or ``report``: the half of one question, from the SHA-256 of its stripped, lower-cased text."""
    return HALVES[hashlib.sha256(question.strip().lower().encode()).digest()[0] % 2]


def split(questions: list[dict[str, Any]], key: str = "q") -> dict[str, list[dict[str, Any]]]:
    """``{"tune": [...], "report": [...]}``, each in the input's order."""
    out: dict[str, list[dict[str, Any]]] = {h: [] for h in HALVES}
    for item in questions:
        out[half(item[key])].append(item)
    return out


def main() -> None:
    from bench.common import questions

    halves = split(questions("pg_docs_dev.jsonl"))
    for name, items in halves.items():
        print(f"{name}: {len(items)}")
        for item in items:
            print(f"  {item['q']}")


if __name__ == "__main__":
    main()
