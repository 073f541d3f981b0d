"""The learning commands behind the CLI: retrain, ab-report, promote, rollback, retire, traffic, model add/list."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import psycopg
from psycopg.types.json import Jsonb
from tqdm import tqdm

from pgsynapse.artifacts import models_root
from pgsynapse.config import Settings
from pgsynapse.db import worker_takes
from pgsynapse.errors import InputError
from pgsynapse.feedback import Feedback, feedback_params
from pgsynapse.jsonout import dumps as json_dumps
from pgsynapse.learning import NOTHING_TO_LEARN
from pgsynapse.learning.abreport import ab_report, render
from pgsynapse.learning.distill import distill
from pgsynapse.learning.registry import add_model, promote, retire, rollback, set_traffic, version_at
from pgsynapse.learning.routing import served_shares
from pgsynapse.logs import notice, say
from pgsynapse.presets import embedding_model_path
from pgsynapse.queries import q
from pgsynapse.status import backfill_state


def queue_retrain(conn: psycopg.Connection, kind: str = "retrain", *, force: bool = True,
                  now: bool = False) -> int | None:
    """Queue a retrain (``retrain``, or ``sql_retrain``): one at a time, none while one is pending or running.
    ``now``: run whatever the threshold (a command asked). Returns the job id, or None if one was pending or
    running."""
    payload = {"force": force, "now": True} if now else {"force": force}
    row = conn.execute(q("queue_retrain", "learning.sql"), {"kind": kind, "payload": Jsonb(payload)}).fetchone()
    return (row["id"] if isinstance(row, dict) else row[0]) if row else None


def queue_and_wait(conn: psycopg.Connection, kind: str, *, wait: bool, force: bool = True, now: bool = False,
                   hint: str = "", out: TextIO | None = None,
                   force_command: str | None = None) -> tuple[int, dict[str, Any]]:
    """Queue a ``kind`` job (or find the one pending or running: one at a time) and say which on ``out`` (stdout;
    stderr under ``--json``, whose stdout is the caller's one JSON document). A pending one (the threshold's) takes
    ``force`` and ``now`` if it lacks them; ``force_command``: the command line whose ``--force`` asked for ``force``,
    named when the job found cannot take it (it runs already) and said when a pending one took it. With ``wait``,
    wait until it ends and
    say so if it failed or was skipped. Returns the exit code, and the job's outcome: ``job`` (None when the one
    pending or running ended before it was named) and ``outcome``, one of ``queued``, ``already_pending`` or
    ``already_running`` (not waited for: nothing was queued for the last two), ``done`` (the caller says what it
    registered), ``skipped`` (with ``skip_reason``) or ``failed`` (with ``error``)."""
    out = out or sys.stdout
    job = queue_retrain(conn, kind, force=force, now=now)
    outcome = "queued"
    if job:
        say(out, "retrain_queued", f"{kind} queued (job {job}){hint}", kind=kind, job=job)
    else:  # queued earlier (by a threshold, or a command), or running: --wait waits for that one
        row = conn.execute(q("unfinished_retrain", "learning.sql"), {"kind": kind}).fetchone()
        flags = {k: True for k, asked in (("force", force), ("now", now)) if asked}
        took = bool(flags) and conn.execute(q("upgrade_pending_retrain", "learning.sql"),
                                            {"kind": kind, "flags": Jsonb(flags)}).fetchone() is not None
        if row is None:  # it ended between the two statements
            say(out, "retrain_already_unfinished", f"a {kind} was already pending or running: nothing was queued",
                kind=kind)
            outcome = "already_pending"
        else:
            job, state = row["id"], row["status"]
            if state == "pending" and force and not row["forced"] and not took:
                state = "running"  # it started between the two statements, as it was
            outcome = f"already_{state}"
            when = "there was when it started" if state == "running" else "there is when it starts"
            unforced = bool(force_command and not row["forced"] and state == "running")  # it cannot take --force
            took_force = "; it now runs with --force" if force_command and not row["forced"] and took else ""
            if unforced:
                said = (f"{'waiting for it' if wait else 'nothing was queued'} (one at a time: it trains on what "
                        f"{when}, and registers its model only if it passes its gate; run `{force_command}` again "
                        f"once it ends{'' if wait else '; --wait waits for it'})")
            elif wait:
                said = f"waiting for it{took_force}"
            else:
                said = (f"nothing was queued{took_force} ({'one at a time: ' if state == 'running' else ''}it trains "
                        f"on what {when}; --wait waits for it)")
            say(out, "retrain_already_unfinished",
                f"a {kind} is already {state} (job {job}){' without --force' if unforced else ''}: {said}",
                kind=kind, job=job, state=state)
    if not (wait and job):
        return 0, {"job": job, "outcome": outcome}
    if not worker_takes(conn, kind):  # else it waits without a word until one starts
        notice("retrain_waiting", f"no running worker takes {kind} jobs: it runs once `pgsynapse run` does (waiting; "
               f"Ctrl-C stops waiting, the {kind} stays queued)", kind=kind, job=job)
    conn.execute("LISTEN pgsynapse_jobs")
    while True:
        row = conn.execute(q("job_state", "learning.sql"), {"job": job}).fetchone()
        if row["status"] in ("done", "failed"):
            break
        for _ in conn.notifies(timeout=5, stop_after=1):
            pass
    if row["status"] == "failed":
        say(out, "retrain_failed", f"{kind} failed: {row['last_error']}", level="error", kind=kind, job=job)
        return 1, {"job": job, "outcome": "failed", "error": row["last_error"]}
    if row["skip_reason"]:
        say(out, "retrain_skipped", f"{kind} skipped: {row['skip_reason']}", kind=kind, job=job)
        return 0, {"job": job, "outcome": "skipped", "skip_reason": row["skip_reason"]}
    return 0, {"job": job, "outcome": "done"}


def refuse_retrain(args: argparse.Namespace, reason: str, **absent: None) -> InputError:
    """The error a retrain command raises when it queues nothing (exit 1, the reason on stderr); under ``--json``
    it first prints its one JSON document: ``outcome`` ``refused``, the ``reason``, and the ``absent`` fields of a
    verdict as null."""
    if args.json:
        print(json.dumps({"job": None, "outcome": "refused", "reason": reason, **absent}, indent=2))
    return InputError(reason)


def run_learning_command(args: argparse.Namespace, conn: psycopg.Connection) -> int:
    if args.command == "feedback":
        row = conn.execute(q("question_for_feedback", "answers.sql"), {"question": args.question}).fetchone()
        params = feedback_params(args.question, row, helpful=args.helpful, rating=args.rating, source=args.source,
                                 comment=args.comment)
        written = conn.execute(q("insert_feedback", "answers.sql"), params).fetchone()
        # the retrain's progress reads training_examples, which an application role may not: it is left out then
        readable = conn.execute(q("feedback_progress_readable", "learning.sql")).fetchone()["readable"]
        progress = conn.execute(q("feedback_progress", "learning.sql")).fetchone() if readable else None
        print(render_feedback(Feedback(written["id"], args.question, args.helpful, args.rating, params["chunk"]),
                              args.source, progress))
        return 0
    if args.command == "retrain":
        if not conn.execute(q("feedback_progress", "learning.sql")).fetchone()["examples"]:
            raise refuse_retrain(args, f"{NOTHING_TO_LEARN}; nothing was queued", version=None, status=None,
                                 gate=None)
        code, waited = queue_and_wait(conn, "retrain", wait=args.wait, out=sys.stderr if args.json else sys.stdout)
        v = None
        if waited["outcome"] == "done":
            # the version this retrain's job registered (another retrain may have registered one meanwhile)
            v = conn.execute(q("retrain_version", "learning.sql"), {"job": waited["job"]}).fetchone()
            if v and v["status"] == "rejected":
                code = 1  # the gate refused what was asked for (README's exit codes)
            if not args.json:
                print(render_gate(v["id"], v["status"], v["metrics"]["gate"]) if v else
                      "the retrain registered no model version")
        if args.json:
            print(json.dumps({**waited, "version": v and v["id"], "status": v and v["status"],
                              "gate": v and v["metrics"].get("gate")}, indent=2))
        return code
    if args.command == "ab-report":
        report = ab_report(conn)
        print(json_dumps(report, indent=2) if args.json else render(report))
        return 0
    if args.command == "promote":
        r = promote(conn, args.model_version)
        print(f"model version {r['active']} is active (was {r['previous']})")
        return 0
    if args.command == "rollback":
        r = rollback(conn)
        print(f"rolled back: model version {r['active']} is active (was {r['previous']})")
        return 0
    if args.command == "retire":
        n = retire(conn, args.model_version)
        print(f"model version {args.model_version} retired, {n} embeddings deleted")
        return 0
    if args.command == "traffic":
        set_traffic(conn, args.model_version, args.percent)
        v = conn.execute(q("version_by_id", "learning.sql"), {"version": args.model_version}).fetchone()
        # routed only once backfilled and on its serving runtime (routable_versions)
        when = ("" if not args.percent else " once its backfill is done" if v["backfilled_at"] is None
                else " once a worker has exported it to its runtime" if v["runtime_pending"] else "")
        print(f"model version {args.model_version} gets {args.percent:g}% of sessions{when}"
              + (" (pgsynapse status shows it)" if when else ""))
        return 0
    raise AssertionError(args.command)


def render_feedback(fb: Feedback, source: int | None, progress: dict | None) -> str:
    """What ``pgsynapse feedback`` recorded, and how near the next automatic retrain is (``progress``: None for a role
    that may not read it)."""
    said = [w for w in ("helpful" if fb.helpful else None if fb.helpful is None else "not helpful",
                        None if fb.rating is None else f"rated {fb.rating}") if w]
    line = f"feedback {fb.id} on question {fb.question_id}: {', '.join(said)}"
    if fb.chunk_id is not None:
        line += f"; passage [{source}] (chunk id {fb.chunk_id}) answered it"
    if progress is None:
        return line
    return (f"{line}\n{progress['untrained']} of {progress['retrain_min_feedback']} new examples for the next retrain "
            "(one per question; `pgsynapse retrain` starts one now)")


def run_model_command(args: argparse.Namespace, conn: psycopg.Connection, settings: Settings, url: str) -> int:
    """``pgsynapse model add``, ``model distill`` and ``model list`` on the database at ``url``."""
    if args.model_command == "list":
        print(render_versions(conn))
        return 0
    if args.model_command == "distill":
        done = distill(conn, settings, url, teacher=args.teacher, student=args.student, layers=args.student_layers,
                       name=args.name, epochs=args.epochs, traffic=args.traffic, force=args.force,
                       projection=args.projection)
        for reason in done.gate["reasons"]:
            print(f"gate: {reason}")
        if done.row is None:
            # what was trained is kept: registering it is `model add`, not --force (which trains another)
            notice("distill_not_registered", f"the student was not registered: its gate refused it (reasons "
                   f"above); it is in {done.out_dir}: `pgsynapse model add {done.out_dir}` registers it as it is "
                   "(--force trains another)", level="error", reasons=done.gate["reasons"])
            return 1
        row = done.row
    else:
        # a directory, or a preset's name: its packages' pieces joined, verified and unpacked the first time
        path = embedding_model_path(args.path, models_root(settings.data_dir))
        same = version_at(conn, path, configured=settings.model_path) if args.follow else None
        if same is not None:  # added before without --follow (or the following stopped): follow that one
            print(f"{path} is already model version {same['id']} ({same['status']}): following its backfill")
            return _follow(conn, same["id"], args)
        row = add_model(conn, path, name=args.name, traffic=args.traffic, serving_runtime=settings.runtime,
                        chunk_tokens=settings.chunk_tokens, threads=settings.torch_threads,
                        configured=settings.model_path)
    v = row["id"]
    print(f"model version {v} added as a candidate: {row['name']} ({row['runtime']}, dim {row['dim']}); "
          "a running worker embeds every chunk for it (pgsynapse status shows the progress)")
    for warning in row["warnings"]:
        notice("model_add_warning", warning, heading="warning", version=v)
    return _follow(conn, v, args) if args.follow else 0


def render_gate(version: int, status: str, gate: dict[str, Any]) -> str:
    """A retrain's verdict for people: what became of the version, the gate's two sets (its score, hit@k + 0.5 x
    reciprocal rank, candidate minus active, with the interval) and its reasons."""
    if status == "rejected":
        head = f"model version {version}: rejected by its gate; the active version keeps serving"
    else:
        forced = " (forced past it)" if gate.get("forced") else ""
        head = (f"model version {version}: {status}, passed its gate{forced}; a running worker backfills it, then it "
                "serves its A/B share of sessions (pgsynapse status shows the progress)")
    lines = [head]
    for name in ("heldout", "canary"):
        part = gate.get(name)
        if part:
            sc = part["score"]
            label = "hold-out" if name == "heldout" else "canary"
            lines.append(f"  {label + ':':<10}{part['n']} questions in {part['groups']} groups, score gain "
                         f"{sc['gain']:+.3f} [{sc['low']:+.3f}, {sc['high']:+.3f}]")
    lines += [f"  check: {reason}" for reason in gate.get("reasons", [])]  # each check, passed or not
    return "\n".join(lines)


def _follow(conn: psycopg.Connection, v: int, args: argparse.Namespace) -> int:
    """``--follow``: wait until version ``v`` is backfilled, then say what comes next: its export to the serving
    runtime while it waits for one, the share it serves as the backfill left it (the ``--traffic`` of the command
    that added it), else how to give it one."""
    waits = conn.execute(q("version_by_id", "learning.sql"), {"version": v}).fetchone()["backfilled_at"] is None
    if waits and (note := backfill_worker_note(conn)):
        notice("model_follow_waiting", note, version=v)
    error = follow_backfill(conn, v, progress=False if args.no_progress else None)
    if error:
        notice("model_backfill_failed", f"backfill of model version {v} failed: {error}", level="error", version=v)
        return 1
    row = conn.execute(q("version_by_id", "learning.sql"), {"version": v}).fetchone()
    traffic = float(row["traffic_percent"])
    share = f"it serves {traffic:g}% of sessions" if traffic else f"pgsynapse traffic {v} PERCENT"
    # a torch version the workers serve on another runtime gets no session, and no promotion, until exported
    export = (" and waits for its export to the serving runtime (a running worker that embeds or answers does it; "
              "pgsynapse model list shows when it is done): then " if row["runtime_pending"] else ": ")
    print(f"model version {v} is backfilled{export}{share}, then pgsynapse promote {v}")
    if args.traffic and args.traffic != traffic:
        notice("model_traffic_not_applied", f"--traffic applies when a model is added; pgsynapse traffic {v} "
               f"{args.traffic:g} sets it now", heading="warning", version=v)
    return 0


def backfill_worker_note(conn: psycopg.Connection) -> str | None:
    """What to tell someone about to wait for a backfill when no running worker takes backfill jobs (none
    listening, or those seen lately run other kinds), else None."""
    if worker_takes(conn, "backfill"):
        return None
    return ("no running worker takes backfill jobs: it starts once `pgsynapse run` does (waiting; Ctrl-C stops "
            "waiting, the version stays registered)")


def follow_backfill(conn: psycopg.Connection, version: int, *, progress: bool | None = None) -> str | None:
    """Wait until ``version`` is backfilled (a ``pgsynapse_models`` NOTIFY; the count is re-read every second for
    the bar, as backfill steps send none). Returns None when done, else why it stopped: a failed backfill job,
    or the version rejected or retired meanwhile."""
    conn.execute("LISTEN pgsynapse_models")
    with tqdm(unit="chunk", desc=f"backfill v{version}", disable=None if progress is None else not progress) as bar:
        while True:
            p = next((r for r in conn.execute(q("backfill_progress", "learning.sql")) if r["id"] == version), None)
            if p is None:
                return f"model version {version} is no longer a candidate or active"
            bar.total = p["chunks"]
            bar.n = p["embedded"]
            bar.refresh()
            if p["backfilled_at"] is not None:
                return None
            failed = conn.execute(q("failed_backfill", "learning.sql"), {"version": version}).fetchone()
            if failed is not None:
                return failed["last_error"]
            for _ in conn.notifies(timeout=1, stop_after=1):
                pass


def render_versions(conn: psycopg.Connection) -> str:
    """The embedding model versions, one line each, with the backfill of those still being filled."""
    progress = {r["id"]: r for r in conn.execute(q("backfill_progress", "learning.sql"))}
    lines = ["  id  status     runtime    dim   traffic  backfill            name"]
    for v in served_shares(conn.execute(q("list_versions", "learning.sql")).fetchall(),
                           conn.execute(q("routable_versions", "answers.sql")).fetchall()):
        p = progress.get(v["id"])
        fill = "-" if p is None else "done" if p["backfilled_at"] else backfill_state(p)
        waits = v["runtime_pending"] and v["status"] == "candidate"  # a rejected one never gets an export
        pending = " (waiting for its runtime export)" if waits else ""
        lines.append(f"{v['id']:>4}  {v['status']:<10} {v['runtime']:<10} {v['dim']:<5} "
                     f"{float(v['traffic_percent']):>6g}%  {fill:<19} {v['name']}{pending}")
    return "\n".join(lines)

