"""``pgsynapse ranker list|add|train|promote|rollback|traffic|retire``: the second-stage rankers."""

from __future__ import annotations

import argparse
from pathlib import Path

from pgsynapse.config import Settings
from pgsynapse.db import Database
from pgsynapse.errors import RegistryError
from pgsynapse.jsonout import dumps as json_dumps
from pgsynapse.learning.routing import served_shares
from pgsynapse.ranking.learn import train_ranker
from pgsynapse.ranking.registry import REGISTRY
from pgsynapse.ranking.rescore import PREFIX, check_not_first_stage, check_teacher
from pgsynapse.ranking.scorer import probe_ranker


def _line(r: dict) -> str:
    m = r.get("metrics") or {}
    cand, act = m.get("candidate") or {}, m.get("active") or {}
    held = (f"  held-out MRR@10 {cand['mrr@10']:.3f} vs {act.get('mrr@10', 0):.3f} ({m.get('baseline', '')})"
            if "mrr@10" in cand else "")
    return (f"{r['id']:>3}  {r['status']:<9} {float(r['traffic_percent']):>6.2f}%  {r['runtime']:<9} {r['name']}"
            f"  ({r['path']}){held}")


def render_trained(r: dict) -> str:
    """What ``ranker train`` registered (a row of :func:`train_ranker`): its line, the gate's reasons, and the share
    it did not get when the other candidates held more than it left them."""
    lines = [_line(r), *(f"  gate: {reason}" for reason in r["gate"]["reasons"])]
    if float(r["traffic_percent"]) < r["traffic_asked"]:
        lines.append(f"  traffic: {float(r['traffic_percent']):g}% of sessions, not {r['traffic_asked']:g}%: the other "
                     f"candidates hold the rest (`pgsynapse ranker traffic {r['id']} PERCENT` once they have less)")
    return "\n".join(lines)


def run_ranker_command(args: argparse.Namespace, settings: Settings) -> int:
    action = args.ranker_command
    if action == "train":
        with Database(settings) as db:  # the embedded server when no URL is set
            r = train_ranker(settings, url=db.url, force=args.force)
        print(render_trained(r))
        return 0 if r["status"] == "candidate" else 1
    with Database(settings) as db, db.connect(autocommit=True) as conn:
        if action == "list":
            # the active one's share: what the candidates routed leave it (its row says 100 whatever they take)
            rows = served_shares(REGISTRY.list_models(conn), REGISTRY.routable_models(conn))
            if args.json:
                print(json_dumps(rows, indent=2))
            elif not rows:
                print("no rankers registered: answers and search use the vector order (pgsynapse ranker train)")
            for r in [] if args.json else rows:
                print(_line(r))
        elif action == "add":
            # version:N: a teacher model version rescores the candidates with its stored vectors (ranking/rescore.py)
            runtime = "version" if args.path.startswith(PREFIX) else args.runtime
            path = args.path
            if runtime == "version":
                check_teacher(conn, args.path)
                check_not_first_stage(conn, args.path)
            else:  # a directory: made absolute (the worker does not run where this shell does), loaded first
                path = str(Path(args.path).expanduser().resolve())
                probe_ranker(Path(path), runtime)
            same = REGISTRY.model_at_path(conn, path)
            if same is not None:
                raise RegistryError(f"{path} is already ranker {same['id']} ({same['status']}): retire it first to "
                                    "add it again")
            r = REGISTRY.add_model(conn, args.name or args.path, path, runtime,
                                   status="active" if args.activate else "candidate")
            print(f"ranker {r['id']} ({r['runtime']}): {r['status']}")
        else:
            _check_teacher_serves(conn, action, getattr(args, "model", None), getattr(args, "percent", None))
            print(REGISTRY.command(conn, action, getattr(args, "model", None), getattr(args, "percent", None)))
    return 0


def _check_teacher_serves(conn, action: str, model: int | None, percent: float | None) -> None:
    """Before a ``version:N`` ranker gets sessions (promote, traffic, or a rollback back to it): its version must
    still have its vectors (not retired, rejected or backfilling), or every search and answer of it fails."""
    if action == "rollback":
        active = REGISTRY.active_model(conn)
        model = active["replaced_id"] if active else None
    elif action not in ("promote", "traffic") or (action == "traffic" and not percent):
        return
    if model is None:
        return
    row = REGISTRY.get_model(conn, model)
    if row["runtime"] == "version":
        check_teacher(conn, row["path"])
        if action != "rollback":  # back to it, it serves as the vector order (ranking/rescore.py): not a dead end
            check_not_first_stage(conn, row["path"])
