"""Answer patterns: whether an answer quotes the sentence that answers its question, not only the right page.

``first_cite`` judges an answer by its page: "What does VACUUM FULL do?" answered with "Plain VACUUM (without
FULL) ..." from the VACUUM page counts as right. An answer pattern (as in the TREC question-answering track) is a
regular expression, one per question, written by reading the relevant pages' sentences: it matches the sentences
a person who asked would accept as the answer ("VACUUM FULL rewrites the entire contents of the table") and as few
others as possible. ``bench/data/answer_patterns.jsonl`` has one per dev and user-worded question, written by
annotators who saw the question and the docs pages only, never an answer of the answerers
(``bench/data/short_answer_patterns.jsonl``: one per short "What is X?" question, the sentences that define X); ``pattern`` is null
where no prose sentence of the pages answers it (the answer is a code example, a synopsis or a table), and such
questions are left out of the figures.

- ``answered``: % of the questions with a pattern whose answer quotes a matching sentence (anywhere in it);
- ``answered_first``: % whose answer's first sentence matches.

An extractive answer quotes the docs verbatim, so a pattern sees exactly what a reader sees; a generator's own
words rarely repeat a sentence, so for a generator these figures are a lower bound.

    python -m bench.answer_patterns      # each set's count of questions with a pattern, and each null's reason
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from bench.devsplit import held_out

PATTERNS = Path(__file__).parent / "data" / "answer_patterns.jsonl"
# the short "What is X?" questions' (bench/data/short_questions.jsonl, session 33): the sentences that define X,
# written from the relevant pages' sentences (session 35)
SHORT_PATTERNS = Path(__file__).parent / "data" / "short_answer_patterns.jsonl"


def load(path: Path = PATTERNS) -> dict[str, re.Pattern[str] | None]:
    """``{question text: compiled pattern or None}`` (None: no prose sentence answers it)."""
    out: dict[str, re.Pattern[str] | None] = {}
    if path.exists():
        for line in path.open():
            row = json.loads(line)
            out[row["q"]] = re.compile(row["pattern"], re.IGNORECASE) if row["pattern"] else None
    return out


def matches(pattern: re.Pattern[str], sentences: list[str]) -> tuple[bool, bool]:
    """``(answered, answered_first)``: whether any of an answer's sentences matches, and whether its first does."""
    hits = [bool(pattern.search(" ".join(s.split()))) for s in sentences]
    return any(hits), bool(hits) and hits[0]


def figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``answered`` and ``answered_first`` (%) over the rows that have a pattern (``row["answered"]`` not None),
    and how many those are (``n_patterns``)."""
    judged = [r for r in rows if r.get("answered") is not None]
    if not judged:
        return {"n_patterns": 0}
    return {"n_patterns": len(judged),
            "answered": round(100 * sum(r["answered"] for r in judged) / len(judged), 1),
            "answered_first": round(100 * sum(r["answered_first"] for r in judged) / len(judged), 1)}


def main() -> None:
    patterns = load()
    rows = [json.loads(line) for line in PATTERNS.open()]
    for name, items in held_out().items():
        have = sum(patterns.get(q["q"]) is not None for q in items)
        print(f"{name}: {len(items)} questions, {have} with a pattern")
    for row in rows:
        if not row["pattern"]:
            print(f"  no pattern: {row['q']!r}: {row['note']}")


if __name__ == "__main__":
    main()
