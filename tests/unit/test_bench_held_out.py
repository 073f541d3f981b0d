"""bench/data/user_questions.jsonl, the user-worded held-out set: well formed, its pages real, never a train or
dev question, split by the dev rule into two halves that both have questions."""

import json
from pathlib import Path

import pytest

from bench.devsplit import HALVES, USERS, half, split

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def users() -> list[dict]:
    return [json.loads(line) for line in USERS.read_text().splitlines()]


def test_every_question_is_well_formed_and_unique() -> None:
    items = users()
    assert len(items) >= 100
    seen = set()
    for it in items:
        assert set(it) == {"q", "relevant"}, it
        assert it["q"].strip() and it["q"] == it["q"].strip(), it
        assert 1 <= len(it["relevant"]) <= 3 and all(r.endswith(".html") for r in it["relevant"]), it
        key = " ".join(it["q"].lower().split())
        assert key not in seen, it
        seen.add(key)


def test_both_halves_have_questions_by_the_dev_rule() -> None:
    halves = split(users())
    assert set(halves) == set(HALVES)
    assert all(len(halves[h]) >= 40 for h in HALVES), {h: len(v) for h, v in halves.items()}
    assert all(half(it["q"]) == h for h in HALVES for it in halves[h])


@pytest.mark.skipif(not (SHARED / "pg_docs_corpus.jsonl").exists(), reason=f"no {SHARED} (the shared data)")
def test_pages_exist_and_no_train_or_dev_question_is_reused() -> None:
    pages = {json.loads(line)["id"] for line in (SHARED / "pg_docs_corpus.jsonl").open()}
    known = {" ".join(json.loads(line)["q"].lower().split())
             for name in ("pg_docs_train.jsonl", "pg_docs_dev.jsonl") for line in (SHARED / name).open()}
    for it in users():
        assert set(it["relevant"]) <= pages, it
        assert " ".join(it["q"].lower().split()) not in known, it
