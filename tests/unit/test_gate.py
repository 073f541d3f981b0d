"""The retrain gate's parts without a database: the grouped hold-out (learning/holdout.py), the canary questions
(learning/canary.py) and the paired cluster bootstrap verdict (learning/gate.py), on seeded data."""

from __future__ import annotations

import numpy as np
import pytest

from pgsynapse.config import Settings
from pgsynapse.learning.canary import build_questions
from pgsynapse.learning.distill import judge
from pgsynapse.learning.gate import MIN_GROUPS, cluster_bootstrap, evaluate_set, verdict
from pgsynapse.learning.holdout import grouped_holdout, question_groups, template_keys

TEMPLATES = ["what does the {} setting do", "what is the default value of {}", "sql command to {}",
             "{} syntax and options", "how do i install and use {}", "{} parameter meaning and default"]


def _feedback(seed: int = 0, n_templated: int = 180, n_free: int = 60, n_pages: int = 90):
    """Templated questions (a rare slot word each) and free-form ones, random unit vectors with a few near
    duplicates, and the page of each."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}x" for i in range(2000)]
    questions, pages = [], []
    for i in range(n_templated):
        questions.append(TEMPLATES[i % len(TEMPLATES)].format(words[i]))
        pages.append(int(rng.integers(n_pages)))
    for i in range(n_free):
        questions.append(" ".join(words[1000 + 4 * i: 1004 + 4 * i]))
        pages.append(int(rng.integers(n_pages)))
    v = rng.normal(size=(len(questions), 32))
    dups = [(n_templated + 2 * j, n_templated + 2 * j + 1) for j in range(5)]
    for a, b in dups:  # near duplicates in other words: only the embeddings link them
        v[b] = v[a] + 0.05 * rng.normal(size=32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return questions, v.astype(np.float32), pages, dups


def test_template_keys_mask_the_slot_and_keep_the_frame():
    questions, _, _, _ = _feedback()
    keys = template_keys(questions)
    assert keys[0] == ["what does the …", "… setting do"]
    assert keys[1] == ["what is the …"]
    assert keys[2] == ["sql command to …"]
    assert keys[3] == ["… syntax and options"]
    assert all(keys[i] == keys[0] for i in range(0, 180, 6))  # one template, the same keys whatever the slot
    assert keys[-1] == []  # rare words only: no template
    # a slot filled with common words still opens with its template's frame
    common = template_keys([f"what is the syntax of {w}" for w in ("create table", "drop table", "insert")] * 2)
    assert {k[0] for k in common} == {"what is the …"}


def test_grouped_split_keeps_groups_and_pages_apart_and_is_deterministic():
    questions, v, pages, dups = _feedback()
    split = grouped_holdout(questions, v, pages, fraction=0.2, seed=3, threshold=0.85)
    groups = split.groups
    held, train, dropped = set(split.heldout), set(split.train), set(split.dropped)
    assert held and train and held.isdisjoint(train) and held.isdisjoint(dropped) and train.isdisjoint(dropped)
    assert held | train | dropped == set(range(len(questions)))
    # no group on both sides (dropped examples are on neither)
    assert {groups[i] for i in held}.isdisjoint({groups[i] for i in train | dropped})
    # no held-out page is touched by a training example; every dropped one is on a held-out page
    assert {pages[i] for i in held}.isdisjoint({pages[i] for i in train})
    assert all(pages[i] in split.heldout_pages for i in dropped)
    # near duplicates share a group; one template is one group
    assert all(groups[a] == groups[b] for a, b in dups)
    assert len({groups[i] for i in range(0, 180, 6)}) == 1
    # about the fraction asked for, in whole groups (a template is 30 questions: some overshoot is allowed)
    assert 0.15 * len(questions) <= len(held) <= 0.3 * len(questions)
    again = grouped_holdout(questions, v, pages, fraction=0.2, seed=3, threshold=0.85)
    assert (again.train, again.heldout, again.groups) == (split.train, split.heldout, split.groups)
    other = grouped_holdout(questions, v, pages, fraction=0.2, seed=4, threshold=0.85)
    assert other.heldout != split.heldout


def test_a_template_larger_than_the_holdout_stays_on_the_training_side():
    """A feedback set of two templates (a memoriser's) leaves nothing to hold out but lone questions."""
    words = [f"w{i}x" for i in range(200)]
    questions = [TEMPLATES[i % 2].format(words[i]) for i in range(80)]
    v = np.eye(80, dtype=np.float32)
    split = grouped_holdout(questions, v, list(range(80)), fraction=0.2, seed=0)
    assert len(set(question_groups(questions, v, 0.85))) == 2
    assert split.heldout == [] and len(split.train) == 80


def test_a_template_asked_about_every_page_is_not_held_out_with_all_the_pages():
    """Three templates, each asked about the same 16 pages: holding one out would take every page (and so every
    training example) with it. Nothing is held out; the gate then says there is no hold-out."""
    words = [f"w{i}x" for i in range(16)]
    frames = ["how do i {}", "which statement can {}", "what is the syntax of {}"]
    questions = [f.format(w) for f in frames for w in words]
    pages = [i for _ in frames for i in range(16)]
    split = grouped_holdout(questions, np.eye(48, dtype=np.float32), pages, fraction=0.25, seed=0)
    assert len(set(split.groups)) == 3 and split.heldout == [] and len(split.train) == 48


def _scores(rng, n_groups: int, size: int, p_active: float, gained: int, lost: int):
    """Per-question hit / rr of the active model and of a candidate that turns ``gained`` of its misses into
    hits and ``lost`` of its hits into misses, in ``n_groups`` groups of ``size`` questions."""
    n = n_groups * size
    a_hit = (rng.random(n) < p_active).astype(float)
    c_hit = a_hit.copy()
    c_hit[rng.choice(np.flatnonzero(a_hit == 0), gained, replace=False)] = 1.0
    c_hit[rng.choice(np.flatnonzero(a_hit == 1), lost, replace=False)] = 0.0
    a_rr = a_hit * rng.uniform(0.3, 1, n)
    c_rr = np.where(c_hit == a_hit, a_rr, c_hit * rng.uniform(0.3, 1, n))
    return {"k": 5, "groups": np.repeat(np.arange(n_groups), size).tolist(),
            "active": {"hit": a_hit.tolist(), "rr": a_rr.tolist()}, "candidate": {"hit": c_hit.tolist(), "rr": c_rr.tolist()}}


def test_the_bootstrap_passes_a_clear_gain_and_rejects_noise_and_canary_regressions():
    rng = np.random.default_rng(7)
    gain = _scores(rng, 30, 3, 0.6, gained=16, lost=2)  # +15.6 points of recall
    noise = _scores(rng, 30, 3, 0.6, gained=8, lost=8)  # as many questions won as lost
    canary_flat = _scores(rng, 200, 1, 0.5, gained=5, lost=5)
    canary_worse = _scores(rng, 200, 1, 0.6, gained=5, lost=30)  # -12.5 points on the canary set

    ok = verdict(gain, canary_flat, samples=1000)
    assert ok["passed"] and ok["heldout"]["score"]["low"] > 0, ok["reasons"]
    assert ok["heldout"]["groups"] == 30 and ok["canary"]["n"] == 200
    assert ok == verdict(gain, canary_flat, samples=1000)  # reproducible

    flat = verdict(noise, canary_flat, samples=1000)
    assert not flat["passed"] and flat["heldout"]["score"]["low"] <= 0 <= flat["heldout"]["score"]["high"]
    assert any("not above" in r for r in flat["reasons"])

    regress = verdict(gain, canary_worse, samples=1000)
    assert not regress["passed"] and regress["canary"]["score"]["low"] < -0.05
    assert any("may regress" in r for r in regress["reasons"])
    # a looser tolerance lets the same candidate through; the gate off lets anything through, marked forced
    assert verdict(gain, canary_worse, samples=1000, tolerance=1.0)["passed"]
    forced = verdict(noise, canary_worse, samples=1000, margin=-1)
    assert forced["passed"] and forced["forced"]


def test_too_few_groups_or_none_is_a_rejection():
    rng = np.random.default_rng(1)
    few = _scores(rng, MIN_GROUPS - 1, 20, 0.2, gained=50, lost=0)
    v = verdict(few, None, samples=500)
    assert not v["passed"] and f"fewer than {MIN_GROUPS}" in v["reasons"][0]
    none = verdict({"k": 5, "groups": [], "active": {"hit": [], "rr": []}, "candidate": {"hit": [], "rr": []}},
                   None, samples=500)
    assert not none["passed"] and none["reasons"][0].startswith("no grouped hold-out")


def test_the_gate_off_names_the_setting_that_turned_it_off():
    """A student distilled with distill_margin = -1 was said to pass because "retrain_margin = -1", a setting the
    user had not touched: the reason names the margin of what was judged."""
    v = judge({"gate_scores": {}}, Settings(distill_margin=-1))
    assert v["passed"] and v["reasons"][-1].startswith("distill_margin = -1: the gate is off"), v["reasons"]
    assert verdict(None, None, margin=-1)["reasons"][-1].startswith("retrain_margin = -1: the gate is off")


def test_the_cluster_bootstrap_resamples_groups_not_questions():
    """One group of 50 questions that all gained and 20 lone questions that did not: resampling questions
    would call it a sure gain; resampling groups knows it is one group's luck."""
    d = np.array([1.0] * 50 + [0.0] * 20)
    groups = [0] * 50 + list(range(1, 21))
    by_group = cluster_bootstrap({"d": d}, groups, 2000, 0.95)["d"]
    by_question = cluster_bootstrap({"d": d}, list(range(70)), 2000, 0.95)["d"]
    assert by_group["low"] == 0.0 < by_question["low"]
    assert by_group["gain"] == by_question["gain"] == pytest.approx(50 / 70, abs=1e-4)


def test_evaluate_set_scores_pages_with_the_given_vectors():
    chunks = np.eye(4, dtype=np.float32)
    chunk_docs = [10, 10, 20, 30]
    base_q = np.array([[0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    cand_q = np.array([[1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float32)
    ev = evaluate_set([{10}, {30}], [0, 1], base_q, cand_q, chunks, chunks, chunk_docs, k=1)
    assert ev["active"] == {"hit": [0.0, 1.0], "rr": [0.5, 1.0]}
    assert ev["candidate"] == {"hit": [1.0, 1.0], "rr": [1.0, 1.0]}


def test_canary_questions_are_phrased_as_questions_and_deterministic():
    docs = [
        (1, "sql-altertable.html", "ALTER TABLE", "ALTER TABLE\nALTER TABLE — change the definition of a table\nSynopsis"),
        (2, "runtime-config-query.html", "20.7. Query Planning",
         "20.7. Query Planning\nintro\nenable_seqscan (boolean)\nEnables the planner's use of sequential scans."),
        (3, "ddl-system-columns.html", "5.5. System Columns", "5.5. System Columns\nEvery table has columns."),
        (4, "overview.html", "Overview", "Overview\nnothing to ask here"),
    ]
    qs = build_questions(docs, 10)
    by_doc = {c.document_id: c for c in qs}
    assert set(by_doc) == {1, 2, 3}  # a generic one-word title gives no question
    assert by_doc[1].origin == "summary" and by_doc[1].question in (
        "How can I change the definition of a table?", "Which command would change the definition of a table?")
    assert by_doc[2] == by_doc[2].__class__("What is the enable_seqscan parameter for?", 2, "parameter")
    assert by_doc[3].question == "Where can I read about system columns?"
    # the same corpus in another order and under other ids: the same questions for the same documents
    shuffled = [(i + 100, s, t, b) for i, s, t, b in reversed(docs)]
    assert [(c.question, c.origin) for c in build_questions(shuffled, 10)] == [(c.question, c.origin) for c in qs]
    assert len(build_questions(docs, 2)) == 2
