"""The retrain gate: does a candidate help questions it has not seen? (docs/learning.md, "The gate")

Two evaluation sets, both scored per question at page level for the active model and the candidate on the same
questions over the whole corpus:

- the **grouped hold-out** of feedback (:mod:`pgsynapse.learning.holdout`): whole groups of similar questions,
  and their pages, that training never saw;
- the **canary set** (:mod:`pgsynapse.learning.canary`): questions built once from the corpus, not from feedback,
  frozen, whose pages feed no corpus pairs.

A question's score is ``hit@k + 0.5 x reciprocal rank@10`` (the old gate's mix: recall first, rank as a tie
break); the candidate's gain is the mean of its per-question differences. A **paired cluster bootstrap** resamples
whole groups (hold-out groups; canary documents), so questions that move together count once, and gives a
percentile interval at ``confidence``. The candidate passes when

- the hold-out gain's lower bound is above ``margin`` (0 by default) with at least ``MIN_GROUPS`` held-out
  groups, and
- the canary gain's lower bound is at least ``-tolerance`` (no regression beyond noise) when the canary set
  has at least ``MIN_CANARY`` questions (a smaller one is reported, not used).

``margin = -1`` turns the gate off: every candidate passes, marked ``forced`` (for flow tests and manual rollouts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pgsynapse.learning.metrics import ranked_documents

MIN_GROUPS = 5  # fewer held-out groups than this give no interval worth the name: the candidate is rejected
MIN_CANARY = 20  # a canary set smaller than this is reported but does not decide
RR_WEIGHT = 0.5
BOOTSTRAP_SEED = 0  # the verdict is reproducible: the same scores give the same interval


def question_scores(queries: np.ndarray, chunks: np.ndarray, chunk_docs: Sequence[int],
                    relevant: Sequence[set[int]], k: int = 5) -> dict[str, list[float]]:
    """Per question: ``hit`` (1 when a relevant page is among the first ``k`` distinct pages) and ``rr``
    (reciprocal rank of the first relevant page within the first 10, else 0). Vectors are normalised; the
    chunk vectors are given, never encoded here (a query-side candidate searches its base version's vectors)."""
    if not len(relevant):
        return {"hit": [], "rr": []}
    scores = np.asarray(queries, dtype=np.float32) @ np.asarray(chunks, dtype=np.float32).T
    return ranking_scores([ranked_documents(row, chunk_docs, max(10, k)) for row in scores], relevant, k)


def ranking_scores(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]], k: int = 5) -> dict[str, list[float]]:
    """Per question, from its ranked documents: ``hit`` (a relevant one among the first ``k``) and ``rr``
    (reciprocal rank of the first relevant one within the first 10, else 0)."""
    hit: list[float] = []
    rr: list[float] = []
    for ranked, rel in zip(rankings, relevant, strict=True):
        pos = next((i for i, d in enumerate(ranked) if d in rel), None)
        hit.append(float(pos is not None and pos < k))
        rr.append(1.0 / (pos + 1) if pos is not None and pos < 10 else 0.0)
    return {"hit": hit, "rr": rr}


def evaluate_set(relevant: Sequence[set[int]], groups: Sequence[int], base_queries: np.ndarray,
                 cand_queries: np.ndarray, base_chunks: np.ndarray, cand_chunks: np.ndarray,
                 chunk_docs: Sequence[int], k: int = 5) -> dict[str, Any]:
    """Per-question scores of the active model (``base_*``) and the candidate on one evaluation set; the two
    chunk arrays may be the same object (a query-side candidate). The result is what :func:`verdict` reads."""
    if len(groups) != len(relevant):
        raise ValueError(f"{len(groups)} group ids for {len(relevant)} questions")
    return {"k": k, "groups": [int(g) for g in groups],
            "active": question_scores(base_queries, base_chunks, chunk_docs, relevant, k),
            "candidate": question_scores(cand_queries, cand_chunks, chunk_docs, relevant, k)}


def gate_metrics(base_queries: np.ndarray, cand_queries: np.ndarray, base_chunks: np.ndarray,
                 cand_chunks: np.ndarray, chunk_docs: Sequence[int], *,
                 heldout: tuple[Sequence[set[int]], Sequence[int]], canary: Sequence[int], k: int = 5
                 ) -> dict[str, Any]:
    """The trainer's side of the gate. The query rows are the held-out questions, then the canary questions
    (``heldout``: their relevant pages and group ids; ``canary``: each question's document, its group too).
    Returns ``active`` / ``candidate`` (hold-out recall@k and MRR@10), ``canary_active`` / ``canary_candidate``
    and ``gate_scores`` (per-question scores for :func:`verdict`; kept in the artifact, not in the registry)."""
    relevant, groups = heldout
    n = len(relevant)
    if len(base_queries) != n + len(canary) or len(cand_queries) != n + len(canary):
        raise ValueError(f"{len(base_queries)} / {len(cand_queries)} query vectors for {n} held-out and "
                         f"{len(canary)} canary questions")
    held = evaluate_set(relevant, groups, base_queries[:n], cand_queries[:n], base_chunks, cand_chunks,
                        chunk_docs, k)
    can = evaluate_set([{d} for d in canary], list(canary), base_queries[n:], cand_queries[n:], base_chunks,
                       cand_chunks, chunk_docs, k)
    out: dict[str, Any] = {"gate_scores": {"heldout": held, "canary": can}}
    if n:
        out["active"], out["candidate"] = summary(held["active"], k), summary(held["candidate"], k)
    if len(canary):
        out["canary_active"], out["canary_candidate"] = summary(can["active"], k), summary(can["candidate"], k)
    return out


def summary(scores: dict[str, list[float]], k: int) -> dict[str, float]:
    """recall@k and MRR@10 of per-question scores (the shape of metrics.recall_mrr)."""
    n = len(scores["hit"])
    return {f"recall@{k}": float(np.mean(scores["hit"])) if n else 0.0,
            "mrr@10": float(np.mean(scores["rr"])) if n else 0.0, "n": n}


def cluster_bootstrap(diffs: dict[str, np.ndarray], groups: Sequence[int], samples: int, confidence: float,
                      seed: int = BOOTSTRAP_SEED) -> dict[str, dict[str, float]]:
    """Percentile intervals of the mean of each per-question difference in ``diffs``, resampling whole groups
    with replacement (the same resamples for every difference: they stay paired)."""
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    sizes = np.bincount(inv).astype(np.float64)
    n_groups = len(sizes)
    counts = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=samples)
    weights = counts @ sizes
    tail = (1.0 - confidence) / 2.0
    out = {}
    for name, d in diffs.items():
        sums = np.bincount(inv, weights=np.asarray(d, dtype=np.float64), minlength=n_groups)
        est = (counts @ sums) / np.maximum(weights, 1.0)
        low, high = np.quantile(est, [tail, 1.0 - tail])
        out[name] = {"gain": round(float(np.mean(d)), 4), "low": round(float(low), 4), "high": round(float(high), 4)}
    return out


def _intervals(ev: dict[str, Any], samples: int, confidence: float) -> dict[str, Any]:
    a, c = ev["active"], ev["candidate"]
    hit = np.asarray(c["hit"]) - np.asarray(a["hit"])
    rr = np.asarray(c["rr"]) - np.asarray(a["rr"])
    k = ev["k"]
    out: dict[str, Any] = {"n": len(hit), "groups": len(set(ev["groups"])),
                           "active": summary(a, k), "candidate": summary(c, k)}
    if len(hit):
        out.update(cluster_bootstrap({"score": hit + RR_WEIGHT * rr, f"recall@{k}": hit, "mrr@10": rr},
                                     ev["groups"], samples, confidence))
    return out


def verdict(heldout: dict[str, Any] | None, canary: dict[str, Any] | None, *, margin: float = 0.0,
            tolerance: float = 0.05, confidence: float = 0.95, samples: int = 2000,
            margin_setting: str = "retrain_margin") -> dict[str, Any]:
    """The gate's decision from :func:`evaluate_set` results. Returns ``passed``, ``forced``, the intervals of
    both sets and ``reasons`` (one line per check, failed or not). ``margin_setting``: the setting ``margin``
    came from, named when it turns the gate off."""
    forced = margin <= -1
    reasons: list[str] = []
    out: dict[str, Any] = {"confidence": confidence, "samples": samples, "margin": margin, "tolerance": tolerance,
                           "score": f"hit@k + {RR_WEIGHT} x rr@10"}
    held_ok = False
    if heldout is None or not heldout["groups"]:
        reasons.append("no grouped hold-out: the feedback has no group small enough to hold out")
    else:
        h = out["heldout"] = _intervals(heldout, samples, confidence)
        s = h["score"]
        if h["groups"] < MIN_GROUPS:
            reasons.append(f"hold-out has {h['groups']} groups, fewer than {MIN_GROUPS}: no interval to trust")
        elif s["low"] > margin:
            held_ok = True
            reasons.append(f"hold-out gain {s['gain']:+.4f}, {confidence:.0%} interval [{s['low']:+.4f}, "
                           f"{s['high']:+.4f}] is above {margin:+.4f}")
        else:
            reasons.append(f"hold-out gain {s['gain']:+.4f}, {confidence:.0%} interval [{s['low']:+.4f}, "
                           f"{s['high']:+.4f}] is not above {margin:+.4f}")
    canary_ok = True
    if canary is None or not canary["groups"]:
        reasons.append("no canary set: not checked")
    else:
        cy = out["canary"] = _intervals(canary, samples, confidence)
        s = cy["score"]
        if cy["n"] < MIN_CANARY:
            reasons.append(f"canary set has {cy['n']} questions, fewer than {MIN_CANARY}: reported, not checked")
        elif s["low"] >= -tolerance:
            reasons.append(f"canary gain {s['gain']:+.4f}, {confidence:.0%} interval [{s['low']:+.4f}, "
                           f"{s['high']:+.4f}]: no regression beyond -{tolerance:.4f}")
        else:
            canary_ok = False
            reasons.append(f"canary gain {s['gain']:+.4f}, {confidence:.0%} interval [{s['low']:+.4f}, "
                           f"{s['high']:+.4f}]: may regress by more than {tolerance:.4f}")
    if forced:
        reasons.append(f"{margin_setting} = -1: the gate is off, the candidate passes whatever it scores")
    out.update(passed=forced or (held_ok and canary_ok), forced=forced, reasons=reasons)
    out["delta"] = out.get("heldout", {}).get("score", {}).get("gain", 0.0)
    return out
