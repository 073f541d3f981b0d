"""Paraphrases of the dev and train questions for the answer cache benchmark (bench/answer_cache.py).

Two kinds, each line of ``bench/data/paraphrases.jsonl`` is ``{"q", "of", "pages", "set", "kind"}``:

- ``hand``: one hand-written rewording of every dev question (``bench/data/dev_paraphrases_hand.txt``, line i
  rewords dev question i): other words and word order, the same need;
- ``rule``: one rule-based rewrite of every dev and train question (:data:`RULES`, the first that matches, else the
  question wrapped in a prefix or suffix such as "in postgresql, ..."): a user's rewording of the same template
  ("how do I X" -> "how can I X").

    python -m bench.paraphrases      # rewrites bench/data/paraphrases.jsonl (deterministic)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bench.common import questions, run_benchmark

HERE = Path(__file__).parent / "data"
OUT = HERE / "paraphrases.jsonl"
HAND = HERE / "dev_paraphrases_hand.txt"

RULES: list[tuple[str, str]] = [
    (r"^how do I install and use (.+)$", r"installing and using the \1 extension"),
    (r"^how do I use (.+)$", r"what is \1 for and how is it used"),
    (r"^how do I (.+)$", r"how can I \1"),
    (r"^how can I (.+)$", r"how do I \1"),
    (r"^how to (.+)$", r"what is the way to \1"),
    (r"^what does the (\S+) setting do$", r"explain the \1 setting"),
    (r"^(\S+) parameter meaning and default$", r"what does \1 mean and what is its default"),
    (r"^what is the default value of (.+)$", r"default value for \1?"),
    (r"^which function (.+)$", r"what function \1"),
    (r"^what does (.+?) do(?: in .+)?$", r"explain what \1 does"),
    (r"^(.+) example in postgres$", r"show me an example of \1"),
    (r"^what's the syntax to (.+?)(?: in postgres)?$", r"syntax to \1"),
    (r"^(.+) syntax and options$", r"options and syntax of \1"),
    (r"^which (.+)$", r"what \1"),
    (r"^what is (.+)$", r"explain \1"),
    (r"^write (.+)$", r"how do I write \1"),
]


def rewrite(q: str) -> str:
    for pattern, repl in RULES:
        if re.match(pattern, q, flags=re.IGNORECASE):
            return re.sub(pattern, repl, q, count=1, flags=re.IGNORECASE)
    lowered = q[0].lower() + q[1:] if q[1:2].islower() else q  # "SPI function ..." keeps its acronym
    wrappers = ("in postgresql, {}", "{} in postgres?", "postgres question: {}", "{}, using postgresql")
    return wrappers[len(q) % len(wrappers)].format(lowered)


def build() -> list[dict]:
    dev = questions("pg_docs_dev.jsonl")
    train = questions("pg_docs_train.jsonl")
    hand = [line.strip() for line in HAND.read_text().splitlines() if line.strip()]
    assert len(hand) == len(dev), (len(hand), len(dev))
    out = [{"q": h, "of": d["q"], "pages": d["relevant"], "set": "dev", "kind": "hand"} for h, d in zip(hand, dev)]
    out += [{"q": rewrite(d["q"]), "of": d["q"], "pages": d["relevant"], "set": "dev", "kind": "rule"} for d in dev]
    out += [{"q": rewrite(t["q"]), "of": t["q"], "pages": [t["page"]], "set": "train", "kind": "rule"} for t in train]
    return out


def main() -> None:
    rows = build()
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} paraphrases -> {OUT}")


if __name__ == "__main__":
    run_benchmark(main)
