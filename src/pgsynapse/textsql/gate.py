"""The SQL retrain's gate: is the fine-tuned candidate better than the active model on corrected questions that
training never saw?

Both models answer the same held-out pairs (whole groups of the same normalised question, never seen in
training); a pair counts as correct for a model when its statement passes the safety check, runs as the reader
role and returns the same result as the target SQL (**execution accuracy**, :mod:`pgsynapse.textsql.train`). The
candidate passes when

- at least one held-out pair was scored (``MIN_HELDOUT``), and
- its accuracy is **strictly above** the active model's plus ``margin`` (``sql_retrain_margin``).

The verdict is a pure function of the per-pair outcomes: the same outcomes give the same verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MIN_HELDOUT = 1


def accuracy(correct: Sequence[bool]) -> float | None:
    """The share of correct pairs; None when there is none."""
    return sum(bool(c) for c in correct) / len(correct) if len(correct) else None


def sql_verdict(candidate: Sequence[bool], active: Sequence[bool], *, margin: float) -> dict[str, Any]:
    """The gate's decision on paired per-pair outcomes (``candidate[i]`` and ``active[i]``: the same held-out
    pair, True when that model's statement returned the target's result).

    Returns ``passed``, both accuracies, ``delta`` (candidate - active), ``heldout`` (pairs), the counts of pairs
    only one model got right (``wins``, ``losses``), ``margin`` and human-readable ``reasons``."""
    if len(candidate) != len(active):
        raise ValueError(f"the gate needs paired outcomes: {len(candidate)} for the candidate, {len(active)} for the "
                         "active model")
    n = len(candidate)
    cand, act = accuracy(candidate), accuracy(active)
    out: dict[str, Any] = {
        "passed": False, "candidate": cand, "active": act, "delta": None, "heldout": n, "margin": margin,
        "wins": sum(bool(c) and not bool(a) for c, a in zip(candidate, active)),
        "losses": sum(bool(a) and not bool(c) for c, a in zip(candidate, active)),
        "reasons": [],
    }
    if n < MIN_HELDOUT or cand is None or act is None:
        out["reasons"].append(f"no held-out pair to judge the candidate on (need at least {MIN_HELDOUT}): more "
                              "corrections of different questions are needed")
        return out
    out["delta"] = round(cand - act, 6)
    if cand > act + margin:
        out["passed"] = True
        out["reasons"].append(f"execution accuracy {cand:.3f} beats the active model's {act:.3f} by "
                              f"{cand - act:+.3f}, more than the margin {margin:.3f} ({n} held-out pairs)")
    else:
        out["reasons"].append(f"execution accuracy {cand:.3f} is not above the active model's {act:.3f} plus the "
                              f"margin {margin:.3f} ({n} held-out pairs)")
    return out
