"""bench/data/answer_patterns.jsonl: one well-formed pattern per dev and user-worded question, each one matching
a sentence of its question's relevant pages (else it could never be met); and how an answer is judged by it."""

import json
import re
from pathlib import Path

import pytest

from bench.answer_patterns import PATTERNS, SHORT_PATTERNS, figures, load, matches
from bench.answer_quality import SHORT
from bench.devsplit import USERS
from pgsynapse.answerers.base import sentence_runs

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def rows() -> list[dict]:
    return [json.loads(line) for line in PATTERNS.read_text().splitlines()]


def test_every_user_worded_question_has_one_row_and_every_pattern_compiles() -> None:
    items = rows()
    assert all(set(r) == {"q", "pattern", "matches", "note"} for r in items)
    assert len({r["q"] for r in items}) == len(items)
    users = {json.loads(line)["q"] for line in USERS.read_text().splitlines()}
    assert users <= {r["q"] for r in items}
    for r in items:
        if r["pattern"] is None:
            assert r["note"].strip(), f"a question without a pattern says why: {r['q']!r}"
        else:
            re.compile(r["pattern"], re.IGNORECASE)
    assert sum(r["pattern"] is not None for r in items) >= 0.8 * len(items)


@pytest.mark.skipif(not (SHARED / "pg_docs_corpus.jsonl").exists(), reason=f"no {SHARED} (the shared data)")
def test_every_pattern_matches_a_sentence_of_its_relevant_pages_and_dev_is_covered() -> None:
    pages = {}
    for line in (SHARED / "pg_docs_corpus.jsonl").open():
        page = json.loads(line)
        pages[page["id"]] = [s for s, _ in sentence_runs(page["text"])]
    questions = [json.loads(line) for source in (SHARED / "pg_docs_dev.jsonl", USERS) for line in source.open()]
    relevant = {q["q"]: q["relevant"] for q in questions}
    assert set(relevant) == {r["q"] for r in rows()}
    for q, pattern in load().items():
        if pattern is not None:
            assert any(pattern.search(s) for page in relevant[q] for s in pages[page]), q


@pytest.mark.skipif(not (SHARED / "pg_docs_corpus.jsonl").exists(), reason=f"no {SHARED} (the shared data)")
def test_every_short_question_has_a_pattern_that_matches_a_sentence_of_its_relevant_pages() -> None:
    relevant = {q["q"]: q["relevant"] for q in map(json.loads, SHORT.read_text().splitlines())}
    short = [json.loads(line) for line in SHORT_PATTERNS.read_text().splitlines()]
    assert [r["q"] for r in short] == list(relevant)
    pages = {}
    for line in (SHARED / "pg_docs_corpus.jsonl").open():
        page = json.loads(line)
        if any(page["id"] in r for r in relevant.values()):
            pages[page["id"]] = [s for s, _ in sentence_runs(page["text"])]
    for q, pattern in load(SHORT_PATTERNS).items():
        assert pattern is not None and any(pattern.search(s) for page in relevant[q] for s in pages[page]), q


def test_an_answer_is_judged_by_its_sentences_first_and_any() -> None:
    pattern = re.compile(r"VACUUM FULL rewrites", re.IGNORECASE)
    wrong_first = ["Plain VACUUM (without FULL) simply reclaims space.", "VACUUM FULL  rewrites the entire table."]
    assert matches(pattern, wrong_first) == (True, False)
    assert matches(pattern, wrong_first[::-1]) == (True, True)
    assert matches(pattern, wrong_first[:1]) == (False, False)
    assert matches(pattern, []) == (False, False)
    judged = [{"answered": True, "answered_first": False}, {"answered": False, "answered_first": False},
              {"answered": None, "answered_first": None}]
    assert figures(judged) == {"n_patterns": 2, "answered": 50.0, "answered_first": 0.0}
    assert figures(judged[2:]) == {"n_patterns": 0}
