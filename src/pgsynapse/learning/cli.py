"""The learning commands behind the CLI: retrain, ab-report, promote, rollback, retire, traffic."""

from __future__ import annotations

import argparse
import json

import psycopg
from psycopg.types.json import Jsonb

from pgsynapse.learning.abreport import ab_report, render
from pgsynapse.learning.registry import promote, retire, rollback, set_traffic


def queue_retrain(conn: psycopg.Connection, kind: str = "retrain", *, force: bool = True) -> int | None:
    """Queue a retrain (``retrain``, or ``sql_retrain``; deduplicated: never two pending). Returns the job id, or
    None if one was pending."""
    row = conn.execute(
        "WITH j AS (INSERT INTO pgsynapse.jobs (kind, ref_id, payload) VALUES (%s, 0, %s)"
        " ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING RETURNING id)"
        " SELECT id, pg_notify('pgsynapse_jobs', json_build_object('kind', %s::text, 'n', 1)::text) FROM j",
        (kind, Jsonb({"force": force}), kind)).fetchone()
    return (row["id"] if isinstance(row, dict) else row[0]) if row else None


def run_learning_command(args: argparse.Namespace, conn: psycopg.Connection) -> int:
    if args.command == "retrain":
        job = queue_retrain(conn)
        print(f"retrain queued (job {job})" if job else "a retrain is already pending")
        if args.wait and job:
            conn.execute("LISTEN pgsynapse_jobs")
            while True:
                row = conn.execute("SELECT status, last_error FROM pgsynapse.jobs WHERE id = %s", (job,)).fetchone()
                if row["status"] in ("done", "failed"):
                    break
                for _ in conn.notifies(timeout=5, stop_after=1):
                    pass
            if row["status"] == "failed":
                print(f"retrain failed: {row['last_error']}")
                return 1
            v = conn.execute("SELECT id, status, metrics FROM pgsynapse.model_versions ORDER BY id DESC LIMIT 1").fetchone()
            print(f"model version {v['id']}: {v['status']}  {json.dumps(v['metrics'].get('gate'))}")
        return 0
    if args.command == "ab-report":
        report = ab_report(conn)
        print(json.dumps(report, default=str, indent=2) if args.json else render(report))
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
        print(f"model version {args.model_version} gets {args.percent:g}% of sessions")
        return 0
    raise AssertionError(args.command)
