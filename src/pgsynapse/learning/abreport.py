"""``pgsynapse ab-report``: per version questions, helpful rate with a 95% interval, latency, significance."""

from __future__ import annotations

from typing import Any

import psycopg

from pgsynapse.learning.metrics import two_proportion_z, wilson
from pgsynapse.queries import q


def ab_report(conn: psycopg.Connection) -> dict[str, Any]:
    rows = [dict(r) for r in conn.execute(q("ab_report", "learning.sql"))]
    for r in rows:
        lo, hi = wilson(r["helpful"], r["rated"])
        r["helpful_rate"] = r["helpful"] / r["rated"] if r["rated"] else None
        r["helpful_ci95"] = [round(lo, 4), round(hi, 4)]
        for k in ("p50_ms", "p95_ms"):
            r[k] = None if r[k] is None else round(float(r[k]), 1)
    active = next((r for r in rows if r["status"] == "active"), None)
    comparisons = []
    for r in rows:
        if active is None or r is active or not r["rated"] or not active["rated"]:
            continue
        z = two_proportion_z(r["helpful"], r["rated"], active["helpful"], active["rated"])
        comparisons.append({"version": r["version"], "against": active["version"], "z": round(z, 3),
                            "significant": abs(z) >= 1.96,
                            "better": bool(abs(z) >= 1.96 and z > 0)})
    return {"versions": rows, "comparisons": comparisons, "events": recent_events(conn)}


def recent_events(conn: psycopg.Connection, limit: int = 10) -> list[dict[str, Any]]:
    """The registry's latest changes (``model_events``), newest first: who promoted, rolled back, switched what."""
    return [{**dict(r), "at": r["at"].isoformat(timespec="seconds")}
            for r in conn.execute(q("recent_model_events", "learning.sql"), {"limit": limit})]


def render_events(events: list[dict[str, Any]]) -> list[str]:
    return [f"  {e['at']}  v{e['version']:<4} {e['event']:<24} by {e['actor'] or '-'}: {e['reason']}" for e in events]


def render(report: dict[str, Any]) -> str:
    head = f"{'version':<8}{'status':<11}{'traffic':>8}{'questions':>10}{'rated':>7}{'helpful':>9}  {'95% CI':<16}{'p50 ms':>8}{'p95 ms':>8}"
    lines = [head, "-" * len(head)]
    for r in report["versions"]:
        rate = "-" if r["helpful_rate"] is None else f"{100 * r['helpful_rate']:.1f}%"
        ci = "-" if not r["rated"] else f"{100 * r['helpful_ci95'][0]:.1f}-{100 * r['helpful_ci95'][1]:.1f}%"
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.0f}"
        p95 = "-" if r["p95_ms"] is None else f"{r['p95_ms']:.0f}"
        lines.append(f"v{r['version']:<7}{r['status']:<11}{r['traffic_percent']:>7.1f}%{r['questions']:>10}"
                     f"{r['rated']:>7}{rate:>9}  {ci:<16}{p50:>8}{p95:>8}")
    for c in report["comparisons"]:
        verdict = ("significantly better" if c["better"] else "significantly worse") if c["significant"] \
            else "no significant difference"
        lines.append(f"v{c['version']} vs active v{c['against']}: z = {c['z']:+.2f}, {verdict} (two-proportion z-test, 95%)")
    if report.get("events"):
        lines += ["", "recent model events (newest first):", *render_events(report["events"])]
    return "\n".join(lines)
