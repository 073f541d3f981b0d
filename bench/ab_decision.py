"""How often the worker's A/B decision (pgsynapse.learning.autopromote.decide) rolls back a candidate that is as good
as the active version, and how often it catches a worse one, against a rule that peeks: "roll back as soon as a
look is significantly worse, promote at the minimum otherwise". Monte Carlo over simulated feedback streams; the
ceiling is the nominal level alpha, in the same run.

    python -m bench.ab_decision            # 20,000 streams per scenario (about a minute)
    python -m bench.ab_decision --quick    # 2,000
    python -m bench.ab_decision --sql      # also: the cost of one look on 1,000,000 questions, 300,000 rated

The ``--sql`` part times the look's query (``ab_decisions`` in sql/learning.sql) on a database holding many
questions and feedback rows, against a ceiling measured in the same run: one scan of the same feedback rows
joined to their questions (what any per-question count must read).

Each stream: the candidate gets ``--share`` of the sessions; each look comes after 10 more rated questions on the
candidate's side (the worker looks every auto_promote_interval, whatever arrived meanwhile); the active rate is
``--rate``; the candidate's is lower by the scenario's drop.
"""

from __future__ import annotations

import time

import numpy as np
import psycopg

from bench.common import database, emit, machine, median, parser, run_benchmark, table
from pgsynapse.learning.autopromote import decide, detectable_drop
from pgsynapse.queries import q


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


def look_cost(url: str, questions: int, rated: int) -> dict[str, float]:
    """Median ms of the ``ab_decisions`` query and of the ceiling scan, over 7 runs each, on ``questions`` questions
    (a tenth of them routed to a candidate in an A/B test) with ``rated`` feedback rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgsynapse.model_versions (id, name, dim, status, traffic_percent, backfilled_at)"
                     " VALUES (2, 'candidate', 384, 'candidate', 10, now())")
        conn.execute("INSERT INTO pgsynapse.questions (session_id, text, status, answer, model_version_id, answered_at,"
                     " created_at) SELECT 's' || g, 'question ' || g, 'answered', 'answer', CASE WHEN g %% 10 = 0 THEN"
                     " 2 ELSE 1 END, now(), now() - make_interval(secs => %s - g) FROM generate_series(1, %s) g",
                     (questions, questions))
        conn.execute("ALTER TABLE pgsynapse.feedback DISABLE TRIGGER feedback_to_examples")  # training data is not measured
        conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) SELECT id, id %% 3 <> 0"
                     " FROM pgsynapse.questions ORDER BY random() LIMIT %s", (rated,))
        conn.execute("ALTER TABLE pgsynapse.feedback ENABLE TRIGGER feedback_to_examples")
        conn.execute("VACUUM ANALYZE pgsynapse.questions")
        conn.execute("VACUUM ANALYZE pgsynapse.feedback")

        def timed(sql: str) -> float:
            runs = []
            for _ in range(7):
                t = time.perf_counter()
                conn.execute(sql).fetchall()
                runs.append((time.perf_counter() - t) * 1000)
            return median(runs)

        look = timed(q("ab_decisions", "learning.sql"))
        ceiling = timed("SELECT qq.model_version_id, count(*) FROM pgsynapse.feedback fb"
                        " JOIN pgsynapse.questions qq ON qq.id = fb.question_id GROUP BY 1")
    return {"look_ms": round(look, 1), "ceiling_scan_ms": round(ceiling, 1), "ratio": round(look / ceiling, 2)}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=0, help="simulated streams per row (default 20,000, --quick 2,000)")
    p.add_argument("--rate", type=float, default=0.6)
    p.add_argument("--share", type=float, default=0.1, help="the candidate's share of sessions (rollout_traffic_percent)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--sql", action="store_true", help="also time one look's query on a large database")
    args = p.parse_args()
    runs = args.runs or (2_000 if args.quick else 20_000)
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
    if args.sql:
        questions, rated = (100_000, 30_000) if args.quick else (1_000_000, 300_000)
        with database(args.database_url) as url:
            cost = emit("ab_decision", "look_cost", questions=questions, rated=rated, **look_cost(url, questions, rated))
        table([cost])


if __name__ == "__main__":
    run_benchmark(main)
