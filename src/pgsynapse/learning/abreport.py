"""``pgsynapse ab-report``: per version questions, helpful rate with a 95% interval, latency, significance."""

from __future__ import annotations

from typing import Any

import psycopg

from pgsynapse.learning.metrics import two_proportion_z, wilson
from pgsynapse.learning.routing import served_shares
from pgsynapse.queries import q
from pgsynapse.ranking.registry import REGISTRY as RANKERS


def _rates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's helpful rate with its Wilson 95 % interval, latencies rounded."""
    for r in rows:
        lo, hi = wilson(r["helpful"], r["rated"])
        r["helpful_rate"] = r["helpful"] / r["rated"] if r["rated"] else None
        r["helpful_ci95"] = [round(lo, 4), round(hi, 4)]
        for k in ("p50_ms", "p95_ms"):
            r[k] = None if r[k] is None else round(float(r[k]), 1)
    return rows


def _compare(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Each row with rated answers against the active one: a two-proportion z-test of the helpful rates."""
    active = next((r for r in rows if r["status"] == "active"), None)
    out = []
    for r in rows:
        if active is None or r is active or not r["rated"] or not active["rated"]:
            continue
        z = two_proportion_z(r["helpful"], r["rated"], active["helpful"], active["rated"])
        out.append({key: r[key], "against": active[key], "z": round(z, 3), "significant": abs(z) >= 1.96,
                    "better": bool(abs(z) >= 1.96 and z > 0)})
    return out


def ab_report(conn: psycopg.Connection) -> dict[str, Any]:
    """Per model version and per ranker (when any is registered): questions, helpful rate, latency, and the
    comparison of each with the active one."""
    # the active version's and ranker's (or the vector order's) shares: what the candidates routed leave them (their
    # rows say 100 whatever the candidates take)
    rows = served_shares(_rates([dict(r) for r in conn.execute(q("ab_report", "learning.sql"))]),
                         conn.execute(q("routable_versions", "answers.sql")).fetchall())
    rankers = served_shares(_rates([dict(r) for r in conn.execute(q("ab_report_rankers", "rankers.sql"))]),
                            RANKERS.routable_models(conn))
    if all(r["ranker"] is None for r in rankers):
        rankers = []  # no ranker registered: the vector order serves everything, nothing to compare
    return {"versions": rows, "comparisons": _compare(rows, "version"), "rankers": rankers,
            "ranker_comparisons": _compare(rankers, "ranker"), "events": recent_events(conn)}


def recent_events(conn: psycopg.Connection, limit: int = 10) -> list[dict[str, Any]]:
    """The registry's latest changes (``model_events``), newest first: who promoted, rolled back, switched what."""
    return [{**dict(r), "at": r["at"].isoformat(timespec="seconds")}
            for r in conn.execute(q("recent_model_events", "learning.sql"), {"limit": limit})]


def render_events(events: list[dict[str, Any]]) -> list[str]:
    return [f"  {e['at']}  v{e['version']:<4} {e['event']:<24} by {e['actor'] or '-'}: {e['reason']}" for e in events]


def _row(label: str, r: dict[str, Any]) -> str:
    rate = "-" if r["helpful_rate"] is None else f"{100 * r['helpful_rate']:.1f}%"
    ci = "-" if not r["rated"] else f"{100 * r['helpful_ci95'][0]:.1f}-{100 * r['helpful_ci95'][1]:.1f}%"
    p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.0f}"
    p95 = "-" if r["p95_ms"] is None else f"{r['p95_ms']:.0f}"
    return (f"{label:<8}{r['status']:<11}{r['traffic_percent']:>7.1f}%{r['questions']:>10}"
            f"{r['rated']:>7}{rate:>9}  {ci:<16}{p50:>8}{p95:>8}")


def _verdicts(comparisons: list[dict[str, Any]], key: str, label: Any) -> list[str]:
    lines = []
    for c in comparisons:
        verdict = ("significantly better" if c["better"] else "significantly worse") if c["significant"] \
            else "no significant difference"
        lines.append(f"{label(c[key])} vs active {label(c['against'])}: z = {c['z']:+.2f}, {verdict} "
                     "(two-proportion z-test, 95%)")
    return lines


def render(report: dict[str, Any]) -> str:
    head = f"{'version':<8}{'status':<11}{'traffic':>8}{'questions':>10}{'rated':>7}{'helpful':>9}  {'95% CI':<16}{'p50 ms':>8}{'p95 ms':>8}"
    lines = [head, "-" * len(head)]
    lines += [_row(f"v{r['version']}", r) for r in report["versions"]]
    lines += _verdicts(report["comparisons"], "version", lambda v: f"v{v}")
    if report.get("rankers"):
        ranker = lambda r: "vector order" if r is None else f"ranker {r}"  # noqa: E731
        lines += ["", "rankers (the vector order: sessions no ranker takes)", head.replace("version", "ranker "),
                  "-" * len(head)]
        lines += [_row("vector" if r["ranker"] is None else f"r{r['ranker']}", r) for r in report["rankers"]]
        lines += _verdicts(report["ranker_comparisons"], "ranker", ranker)
    if report.get("events"):
        lines += ["", "recent model events (newest first):", *render_events(report["events"])]
    return "\n".join(lines)
