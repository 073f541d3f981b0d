"""``pgsynapse guardrail list|add|set|disable|enable|remove|check``: the guardrail rules without SQL, and a text checked
against them as the worker checks questions and answers, with each rule's similarity, to choose a threshold.

A rule matches a text when one of the text's windows (guardrails.windows: the whole text, each sentence, neighbouring
sentences, overlapping windows of a long one) has a cosine similarity at or above the rule's threshold to the rule's
text, both embedded by the model version that answers; ``check`` uses the active version.
"""

from __future__ import annotations

import argparse

import numpy as np
import psycopg

from pgsynapse.config import Settings
from pgsynapse.db import Database
from pgsynapse.errors import InputError
from pgsynapse.guardrails import Guard, strongest
from pgsynapse.models import ModelCache
from pgsynapse.queries import q

FILE = "guardrails.sql"


def run_guardrail_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.guardrail_command == "add" and not args.text.strip():
        raise InputError("guardrail add needs a text: what questions and answers the rule is about, as a question or "
                         "a sentence")
    with Database(settings) as db, db.connect(autocommit=True) as conn:
        action = args.guardrail_command
        if action == "list":
            rows = conn.execute(q("all_rules", FILE)).fetchall()
            print(render_rules(rows) if rows else "no guardrail rules (`pgsynapse guardrail add TEXT` adds one)")
        elif action == "add":
            rule = conn.execute(q("add_rule", FILE), {"text": args.text.strip(), "action": args.action,
                                                      "threshold": args.threshold}).fetchone()["id"]
            print(f"guardrail rule {rule}: {args.action} at similarity >= {args.threshold:g}; the worker applies it to "
                  "the next questions (`pgsynapse guardrail check TEXT` shows what it matches)")
        elif action == "set":
            rule = conn.execute(q("set_rule", FILE), {"id": args.rule, "action": args.action,
                                                      "threshold": args.threshold}).fetchone()
            if rule is None:
                raise InputError(f"no guardrail rule {args.rule}")
            print(f"guardrail rule {rule['id']}: {rule['action']} at similarity >= {rule['threshold']:g}")
        elif action == "remove":
            if conn.execute(q("remove_rule", FILE), {"id": args.rule}).fetchone() is None:
                raise InputError(f"no guardrail rule {args.rule}")
            print(f"guardrail rule {args.rule} removed")
        elif action in ("disable", "enable"):
            changed = conn.execute(q("set_rule_enabled", FILE), {"id": args.rule, "enabled": action == "enable"})
            if changed.fetchone() is None:
                raise InputError(f"no guardrail rule {args.rule}")
            print(f"guardrail rule {args.rule} {action}d")
        else:
            print(check(conn, settings, args.text))
    return 0


def render_rules(rows: list[dict]) -> str:
    lines = [f"{'id':>4}  {'action':<6} {'threshold':>9}  {'enabled':<7}  text"]
    for r in rows:
        enabled = "yes" if r["enabled"] else "no"
        lines.append(f"{r['id']:>4}  {r['action']:<6} {r['threshold']:>9.2f}  {enabled:<7}  {r['text']}")
    return "\n".join(lines)


def check(conn: psycopg.Connection, settings: Settings, text: str) -> str:
    """What the enabled rules do to ``text``: each rule's similarity and threshold, then the verdict."""
    if not text.strip():
        raise InputError("guardrail check needs a text")
    rules = conn.execute(q("guardrail_rules", "answers.sql")).fetchall()
    if not rules:
        return "no enabled guardrail rules: nothing is blocked or flagged"
    version = conn.execute(q("active_version")).fetchone()
    guard = Guard()
    guard.refresh(rules)
    embedder = ModelCache(model_path=settings.model_path, device=settings.device, threads=settings.torch_threads,
                          onnx_threads=settings.onnx_threads, data_dir=settings.data_dir).get(version)
    sims = guard.similarities(embedder, text)
    lines = [f"checked against {len(rules)} enabled rule(s) with model version {version['id']} ({version['name']}), "
             "as the worker checks questions and answers:"]
    for rule, sim in sims:
        hit = "MATCH" if sim >= rule["threshold"] else "-"
        lines.append(f"  rule {rule['id']:<3} {rule['action']:<5} threshold {rule['threshold']:.2f}  similarity "
                     f"{sim:.3f}  {hit:<5}  {rule['text']}")
    verdict = strongest(np.array([[s for _, s in sims]]), [r for r, _ in sims])
    lines.append(f"verdict: {'blocked' if verdict['action'] == 'block' else 'flagged'} by rule {verdict['rule_id']}"
                 if verdict else "verdict: no rule matches")
    return "\n".join(lines)
