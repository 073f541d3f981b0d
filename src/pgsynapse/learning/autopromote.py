"""The online safety net (issue 23, item 4): the worker promotes a candidate whose A/B helpful rate is not
significantly worse than the active version's, and rolls back one that is significantly worse.

The rule, and why it survives repeated looks. The worker looks at the figures every ``auto_promote_interval``
seconds, but it *tests* each candidate exactly once: at the first look where both the candidate and the active
version have ``auto_promote_min_rated`` rated questions (over the same period: since the candidate's first
question). Before that point it neither promotes nor rolls back, whatever the figures say; at that point it
always decides, and either decision ends the A/B test. One test per candidate means the peeking problem (a test
repeated on growing data until it fires) does not arise: the chance of rolling back a candidate that is as good
as the active version is the test's level, ``auto_promote_alpha``. Which look is the first past the minimum
depends on how fast feedback arrives, never on what it says.

The test: one-sided two-proportion z-test (pooled), H0 "the candidate's helpful rate equals the active's"
against H1 "it is lower"; ``p = Phi(z)``. ``p < alpha``: significantly worse, auto-rollback (status
``rejected``, traffic 0). Otherwise: not significantly worse, auto-promote.

What "not significantly worse" guarantees depends on the minimum: with ``n`` rated questions per side, a drop
the test detects with 80 % power is about ``(z_alpha + 0.84) * sqrt(2 p (1 - p) / n)``: at p = 0.6, alpha 0.05,
n = 200 about 12 points, n = 1000 about 5.5 points (:func:`detectable_drop`). Smaller drops are promoted more
often than not: choose the minimum for the drop you cannot accept (docs/learning.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgsynapse.learning.metrics import two_proportion_z
from pgsynapse.learning.registry import RegistryError, promote, reject
from pgsynapse.logs import get_logger
from pgsynapse.queries import q
from pgsynapse.table_locks import lock_table

log = get_logger(__name__)

# one worker decides at a time (transaction-level: released at commit or when the connection drops)
DECISION_LOCK = "pgsynapse.auto_promote"


def normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """Inverse of :func:`normal_cdf` by bisection (enough for a level given once in the settings)."""
    lo, hi = -12.0, 12.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if normal_cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def detectable_drop(rate: float, n: int, alpha: float, power: float = 0.8) -> float:
    """The drop of the helpful rate below ``rate`` that the test finds with ``power`` at ``n`` per side."""
    return (normal_quantile(1 - alpha) + normal_quantile(power)) * math.sqrt(2 * rate * (1 - rate) / n)


@dataclass(frozen=True)
class Decision:
    action: str | None  # "promote", "rollback", or None (not yet at the decision point)
    reason: str
    cand_rated: int
    cand_helpful: int
    active_rated: int
    active_helpful: int
    z: float | None = None
    p_value: float | None = None  # one-sided: P(Z <= z) with equal rates
    alpha: float | None = None
    min_rated: int | None = None

    def figures(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("action", "reason")}


def decide(cand_helpful: int, cand_rated: int, active_helpful: int, active_rated: int, *,
           min_rated: int, alpha: float) -> Decision:
    """The decision at this look (see the module's docstring for the rule)."""
    base = dict(cand_rated=cand_rated, cand_helpful=cand_helpful, active_rated=active_rated,
                active_helpful=active_helpful, alpha=alpha, min_rated=min_rated)
    if min(cand_rated, active_rated) < min_rated:
        return Decision(None, f"waiting: {cand_rated} and {active_rated} rated questions, {min_rated} needed on each "
                        "side", **base)
    z = two_proportion_z(cand_helpful, cand_rated, active_helpful, active_rated)
    p = normal_cdf(z)
    rates = f"{cand_helpful}/{cand_rated} helpful vs {active_helpful}/{active_rated}"
    if p < alpha:
        return Decision("rollback", f"significantly worse: {rates}, z = {z:.2f}, one-sided p = {p:.4f} < {alpha}",
                        z=round(z, 4), p_value=round(p, 6), **base)
    return Decision("promote", f"not significantly worse: {rates}, z = {z:.2f}, one-sided p = {p:.4f} >= {alpha}",
                    z=round(z, 4), p_value=round(p, 6), **base)


def run_decisions(conn: psycopg.Connection, *, min_rated: int, alpha: float, actor: str) -> list[dict[str, Any]]:
    """Decide every candidate at its decision point, in one transaction under :data:`DECISION_LOCK` (a second
    worker meanwhile does nothing). Returns what was done (and logs it once committed).

    A look that only waits reads the figures without locking the registry (on a large feedback table the query
    takes a while: ``python -m bench.ab_decision --sql``); a look with a decision due takes the registry's lock
    (``promote`` takes it too), reads the figures again under it and acts on those. Each look's figures are
    written last, to the candidate's ``metrics->'ab'``."""
    done: list[dict[str, Any]] = []

    def looks() -> list[tuple[dict[str, Any], Decision]]:
        return [(r, decide(r["cand_helpful"], r["cand_rated"], r["active_helpful"], r["active_rated"],
                           min_rated=min_rated, alpha=alpha))
                for r in conn.execute(q("ab_decisions", "learning.sql")).fetchall()]

    with conn.transaction():
        got = conn.execute(q("try_decision_lock", "learning.sql"), {"lock": DECISION_LOCK}).fetchone()
        if not got["got"]:
            return []
        seen = looks()
        if any(d.action for _, d in seen):
            # a wait past a second says so (registry_lock_waiting), as the registry commands do
            lock_table(conn, q("lock_model_versions", "learning.sql"), "pgsynapse.model_versions")
            seen = looks()
        for r, d in seen:
            if d.action is None or any(x["action"] == "promote" for x in done):
                continue  # after a promotion the others are compared with the new active version at the next look
            # still in its A/B test under the row lock (a person may have promoted, retired or stopped it)
            if conn.execute(q("lock_candidate", "learning.sql"), {"version": r["version"]}).fetchone() is None:
                continue
            figures = {**d.figures(), "active": r["active"], "since": r["since"].isoformat()}
            try:
                if d.action == "promote":
                    promote(conn, r["version"], event="auto_promoted", reason=d.reason, figures=figures, actor=actor)
                else:
                    reject(conn, r["version"], event="auto_rolled_back", reason=d.reason, figures=figures, actor=actor)
            except RegistryError as exc:  # e.g. not fully backfilled any more: left to a person, said in the log
                log.warning("model_auto_decision_skipped", version=r["version"], action=d.action, error=str(exc))
                continue
            done.append({"version": r["version"], "action": d.action, "reason": d.reason, **figures})
        at = datetime.now(UTC).isoformat(timespec="seconds")
        for r, d in seen:
            look = {**d.figures(), "active": r["active"], "decision": d.action, "reason": d.reason, "looked_at": at,
                    "actor": actor}
            conn.execute(q("record_ab_look", "learning.sql"), {"version": r["version"], "figures": Jsonb(look)})
    for item in done:
        event = "model_auto_promoted" if item["action"] == "promote" else "model_auto_rolled_back"
        log.info(event, **{k: v for k, v in item.items() if k != "action"}, actor=actor)
    return done
