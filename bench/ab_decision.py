"""How often the worker's A/B decision (pgsynapse.learning.autopromote.decide) rolls back a candidate that is as good
as the active version, and how often it catches a worse one, against a rule that peeks: "roll back as soon as a
look is significantly worse, promote at the minimum otherwise". Monte Carlo over simulated feedback streams; the
ceiling is the nominal level alpha, in the same run.

    python -m bench.ab_decision            # 20,000 streams per scenario (about a minute)
    python -m bench.ab_decision --quick    # 2,000

Each stream: the candidate gets ``--share`` of the sessions; each look comes after 10 more rated questions on the
candidate's side (the worker looks every auto_promote_interval, whatever arrived meanwhile); the active rate is
``--rate``; the candidate's is lower by the scenario's drop.
"""

from __future__ import annotations

import numpy as np

from bench.common import emit, machine, parser, table
from pgsynapse.learning.autopromote import decide, detectable_drop


def simulate(rng: np.random.Generator, runs: int, rate: float, drop: float, share: float, min_rated: int,
             alpha: float, step: int = 10) -> dict[str, float]:
    looks = int(np.ceil(min_rated / step)) + 1
    cand_n = np.arange(1, looks + 1) * step  # candidate rated at each look
    act_n = np.ceil(cand_n * (1 - share) / share).astype(int)
    product = peeking = 0
    for _ in range(runs):
        c = np.cumsum(rng.random(cand_n[-1]) < rate - drop)
        a = np.cumsum(rng.random(act_n[-1]) < rate)
        first = next(i for i in range(looks) if min(cand_n[i], act_n[i]) >= min_rated)
        # the product: one test, at the first look past the minimum
        d = decide(int(c[cand_n[first] - 1]), int(cand_n[first]), int(a[act_n[first] - 1]), int(act_n[first]),
                   min_rated=min_rated, alpha=alpha)
        product += d.action == "rollback"
        # peeking: a one-sided test at every look with 30 or more rated on each side, up to the same point
        for i in range(first + 1):
            if min(cand_n[i], act_n[i]) < 30:
                continue
            p = decide(int(c[cand_n[i] - 1]), int(cand_n[i]), int(a[act_n[i] - 1]), int(act_n[i]),
                       min_rated=30, alpha=alpha)
            if p.action == "rollback":
                peeking += 1
                break
    return {"rollback_rate": product / runs, "peeking_rollback_rate": peeking / runs, "looks": first + 1}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20_000)
    p.add_argument("--rate", type=float, default=0.6)
    p.add_argument("--share", type=float, default=0.1, help="the candidate's share of sessions (rollout_traffic_percent)")
    p.add_argument("--alpha", type=float, default=0.05)
    args = p.parse_args()
    runs = 2_000 if args.quick else args.runs
    rng = np.random.default_rng(23)
    emit("ab_decision", "machine", **machine())
    rows = []
    for min_rated in (200, 1000):
        for drop in (0.0, 0.05, 0.1):
            r = simulate(rng, runs, args.rate, drop, args.share, min_rated, args.alpha)
            rows.append(emit("ab_decision", f"min_rated={min_rated} drop={drop:.2f}", min_rated=min_rated, drop=drop,
                             runs=runs, rollback_rate=round(r["rollback_rate"], 4),
                             peeking_rollback_rate=round(r["peeking_rollback_rate"], 4), looks=r["looks"],
                             ceiling_alpha=args.alpha,
                             detectable_drop_80pct=round(detectable_drop(args.rate, min_rated, args.alpha), 4)))
    table(rows)


if __name__ == "__main__":
    main()
