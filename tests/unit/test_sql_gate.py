"""The SQL retrain's gate (textsql/gate.py): a pure verdict on paired per-pair outcomes."""

from __future__ import annotations

import pytest

from pgsynapse.textsql.gate import sql_verdict


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
