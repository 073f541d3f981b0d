"""The SQL retrain's pure parts: the gate's verdict (textsql/gate.py), the held-out split by normalised question
and the trainer's helpers (textsql/train.py)."""

from __future__ import annotations

import pytest

from pgsynapse.textsql.gate import sql_verdict
from pgsynapse.textsql.train import Pair, _micro_batches, normalise_question, ordered_target, split_pairs


def test_the_gate_passes_a_candidate_strictly_better_by_the_margin():
    v = sql_verdict([True, True, False, True], [True, False, False, False], margin=0.0)
    assert v["passed"] and v["candidate"] == 0.75 and v["active"] == 0.25 and v["delta"] == 0.5
    assert (v["wins"], v["losses"], v["heldout"]) == (2, 0, 4)
    assert "beats" in v["reasons"][0]
    # the same gain is not enough above a larger margin, and a tie never passes
    assert not sql_verdict([True, True, False, True], [True, False, False, False], margin=0.5)["passed"]
    tie = sql_verdict([True, False], [False, True], margin=0.0)
    assert not tie["passed"] and tie["delta"] == 0 and (tie["wins"], tie["losses"]) == (1, 1)
    assert "not above" in tie["reasons"][0]


def test_the_gate_rejects_without_a_held_out_pair_and_needs_paired_outcomes():
    v = sql_verdict([], [], margin=0.0)
    assert not v["passed"] and v["candidate"] is None and v["delta"] is None
    assert "no held-out pair" in v["reasons"][0]
    with pytest.raises(ValueError, match="paired"):
        sql_verdict([True], [True, False], margin=0.0)


def _pair(q: str, sql: str = "select 1") -> Pair:
    return Pair(q, "CREATE TABLE t (a int);", sql)


def test_the_split_keeps_each_normalised_question_on_one_side():
    assert normalise_question("  How MANY orders?! ") == normalise_question("how many orders") == "how many orders"
    assert normalise_question("how many orders") != normalise_question("how many order lines")
    texts = [f"question number {i}" for i in range(20)]
    pairs = [_pair(t) for t in texts] + [_pair(t.upper() + " ?") for t in texts[:10]]  # each asked twice
    for seed in range(5):
        train, held = split_pairs(pairs, 0.25, seed)
        assert len(train) + len(held) == len(pairs) and held and train
        tk = {normalise_question(p.question) for p in train}
        hk = {normalise_question(p.question) for p in held}
        assert not tk & hk
        assert 0.2 * len(pairs) <= len(held) <= 0.4 * len(pairs)
    assert split_pairs(pairs, 0.25, 3) == split_pairs(pairs, 0.25, 3)  # reproducible
    # one group only: nothing can be held out; two groups: one of each side
    assert split_pairs([_pair("a"), _pair("A")], 0.5)[1] == []
    train, held = split_pairs([_pair("a"), _pair("b")], 0.1)
    assert len(train) == len(held) == 1


def test_row_order_counts_only_when_the_target_orders_at_the_top_level():
    assert ordered_target("SELECT a FROM t ORDER BY a")
    assert ordered_target("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1 LIMIT 3")
    assert not ordered_target("SELECT a FROM (SELECT a FROM t ORDER BY a LIMIT 3) s")
    assert not ordered_target("SELECT count(*) FROM t")
    assert not ordered_target("not sql at all")


def test_micro_batches_stay_within_their_token_budget():
    batch = [([1] * n, [1] * n, False) for n in (10, 300, 20, 290, 5)]
    pieces = _micro_batches(batch, 600)
    assert sorted(len(e[0]) for p in pieces for e in p) == [5, 10, 20, 290, 300]
    for p in pieces:
        assert len(p) == 1 or len(p) * max(len(e[0]) for e in p) <= 600
    assert [len(p) for p in _micro_batches(batch, 10)] == [1] * 5  # an example longer than the budget runs alone
