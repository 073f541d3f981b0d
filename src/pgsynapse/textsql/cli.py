"""The data-question commands behind the CLI: ``sql-ask``, ``sql-correct``, ``sql-model
list|add|promote|rollback|traffic|retire|retrain`` and ``reader-login``."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import sys
import unicodedata
from dataclasses import asdict
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgsynapse.app import ask_data
from pgsynapse.client import DataResult
from pgsynapse.config import Settings
from pgsynapse.db import Database, connect
from pgsynapse.errors import InputError
from pgsynapse.jsonout import dumps as json_dumps
from pgsynapse.learning.cli import queue_and_wait, refuse_retrain
from pgsynapse.learning.routing import served_shares
from pgsynapse.logs import notice
from pgsynapse.queries import q
from pgsynapse.results import terminal_safe
from pgsynapse.textsql import reader, registry
from pgsynapse.textsql.execute import Limits, QueryFailed, run_readonly
from pgsynapse.textsql.names import scope_parameters
from pgsynapse.textsql.safety import CheckedSQL, UnsafeSQL, check_sql

READER_PASSWORD = "PGSYNAPSE_SQL_READER_PASSWORD"  # `reader-login`'s password, and the worker's (sql_reader_password)
MAX_CELL = 40
NULL_CELL = "(null)"  # a SQL NULL in a table cell (psql's `\pset null '(null)'`): apart from the text 'NULL' and ''
# a failed statement's stored error ("the statement failed: division by zero ..."), printed after "failed: "
STATEMENT_FAILED = "the statement failed: "


def _columns(ch: str) -> int:
    """The terminal columns a character takes: 2 for a wide one (CJK, fullwidth), 0 for a combining mark."""
    return 0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def _width(text: str) -> int:
    return sum(map(_columns, text))


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))


def _cell(value: Any) -> str:
    """A value as a table cell: one line, at most :data:`MAX_CELL` terminal columns."""
    text = NULL_CELL if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    text = " ".join(text.split())
    if _width(text) <= MAX_CELL:
        return text
    kept, used = [], 0
    for ch in text:
        if used + _columns(ch) > MAX_CELL - 1:
            break
        kept.append(ch)
        used += _columns(ch)
    return "".join(kept) + "…"


def format_table(columns: list[dict[str, str]], rows: list[list[Any]], *, max_rows: int = 50) -> str:
    """A plain-text table, psql-like: a header, a rule, at most ``max_rows`` rows. A result without columns
    (``SELECT FROM t``) has nothing to draw: one line says so."""
    if not columns:
        return "(no columns: the statement selects none)"
    head = [_cell(c["name"]) for c in columns]  # a name's line break would split the header
    body = [[_cell(v) for v in row] for row in rows[:max_rows]]
    widths = [max([_width(h)] + [_width(r[i]) for r in body]) for i, h in enumerate(head)]
    lines = [" | ".join(_pad(h, w) for h, w in zip(head, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(_pad(v, w) for v, w in zip(r, widths)) for r in body]
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more rows")
    return "\n".join(lines)


def format_data_result(r: DataResult) -> str:
    lines = [f"SQL: {r.sql}" if r.sql else "SQL: (none)"]
    if r.status == "answered":
        lines.append(format_table(r.columns, r.rows))
        lines.append(f"({r.row_count} row{'s' if r.row_count != 1 else ''}{_cut(r) if r.truncated else ''})")
    else:
        # a refusal's reason is stored as "refused: ..." (the safety check's own words), a failed statement's as
        # "the statement failed: ...": say it once
        error = r.error or ""
        if r.status == "failed" and error.startswith(STATEMENT_FAILED):
            error = error.removeprefix(STATEMENT_FAILED)
        lines.append(error if error.startswith(f"{r.status}: ") else f"{r.status}: {error}")
    if r.guardrail:
        g = r.guardrail
        lines.append(f"guardrail: {g['action']} by rule {g['rule_id']} ({g['stage']}, similarity {g['similarity']})")
    if r.latency_ms is not None:
        by = (f" by SQL model {r.sql_model_id}" if r.sql_model_id is not None else " by the configured SQL model"
              ) if r.sql else ""
        lines.append(f"  {r.status} in {r.latency_ms:.0f} ms{by} (data question {r.id})")
    return "\n".join(lines)


def _cut(r: DataResult) -> str:
    """Which limit cut a truncated result, and the setting to raise for more rows."""
    by = r.truncated_by or {}
    if by.get("setting") == "sql_max_rows":
        return f"; more were cut at sql_max_rows = {by['limit']:,}: raise it to keep more"
    if by.get("setting") == "sql_max_result_bytes":
        return (f"; more were cut at sql_max_result_bytes = {by['limit']:,} bytes of the result as JSON: raise it to "
                "keep more")
    return "; more were cut by sql_max_rows or sql_max_result_bytes"  # answered before the limit was recorded


def run_sql_ask(args: argparse.Namespace, settings: Settings) -> int:
    def done(result: DataResult) -> None:  # printed as soon as it comes: the in-process worker's stop comes after
        print(json_dumps(asdict(result), indent=2) if args.json else terminal_safe(format_data_result(result)),
              flush=True)

    result = ask_data(settings, args.text, session_id=args.session, schema=args.schema, tables=args.tables,
                      timeout=args.timeout, on_result=done, migrate=args.migrate)
    return 0 if result.status == "answered" else 1


def correct(conn: psycopg.Connection, question: int, sql: str | None, approve: bool,
            role: str = "pgsynapse_reader", limits: Limits | None = None,
            runner: psycopg.Connection | None = None) -> tuple[int, str | None]:
    """Record a correction (the right statement) or an approval of the generated one; returns its id, and a note
    when the corrected statement could not be run as the retrain runs it. What could never train is refused: an
    approval of a statement that did not run, an empty statement, one the retrain's check refuses (the model's
    check: one SELECT over the question's tables that ``role`` may read) or one that fails in PostgreSQL (run as the
    worker runs the model's statements: read-only, as ``role``, within ``limits``, rolled back, on ``runner``: the
    reader's own login where there is one, :func:`record_correction`; default ``conn``)."""
    note = None
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(q("question_to_correct", "textsql.sql"), {"question": question}).fetchone()
        if row is None:
            raise InputError(f"no data question {question}")
        if row["status"] == "blocked":
            rule = f"guardrail rule {row['rule']}" if row["rule"] else "a guardrail rule"
            raise InputError(f"data question {question} was blocked by {rule}, so no statement was generated: a "
                             "correction would teach the model to answer what the rule blocks; if the rule is wrong, "
                             "change it (`pgsynapse guardrail set` or `disable`) and ask the question again")
        if approve and row["status"] != "answered":
            raise InputError(f"data question {question} cannot be approved: {_not_run(row)}, and an approval keeps a "
                             "statement that ran as the right answer to train on: give the right statement with --sql")
        if not approve:
            checked = _check_correction(cur, question, sql or "", row, role)
            note = _run_correction(runner or conn, question, checked, row["target_schema"], role,
                                   limits or Limits())
        cid = cur.execute(q("insert_correction", "textsql.sql"),
                          {"question": question, "sql": sql, "approved": approve}).fetchone()["id"]
    return cid, note


def _not_run(row: dict[str, Any]) -> str:
    """Why a data question that was not answered has no statement to approve (its status and statement)."""
    if row["status"] == "pending":
        return "it is not answered yet (pending)"
    if row["status"] == "refused":
        return "its statement was refused by the safety check and never ran (status refused, its error says why)"
    if row["sql"]:
        return "its statement failed when it ran (status failed, its error says why)"
    return "no statement could be made for it (status failed, its error says why)"


def _check_correction(cur: psycopg.Cursor, question: int, sql: str, row: dict[str, Any], role: str) -> CheckedSQL:
    """Refuse a corrected statement the retrain would drop at its check (InputError, with the check's reason)."""
    if not sql.strip():
        raise InputError(f"data question {question}: the corrected statement is empty: give the SELECT that answers "
                         "it (or --approve the generated one)")
    names = list(row["allowed_tables"]) if row["allowed_tables"] is not None else None
    found = cur.execute(q("readable_tables", "textsql.sql"),
                        scope_parameters(row["target_schema"], names, role)).fetchall()
    try:
        return check_sql(sql, allowed=[(t["schema"], t["name"]) for t in found if t["readable"]],
                         search_path=(row["target_schema"],))
    except UnsafeSQL as exc:
        raise InputError(f"data question {question}: the corrected statement is {exc}: the retrain checks a "
                         "correction as it checks the model's statements, and would drop it") from None


def _run_correction(conn: psycopg.Connection, question: int, checked: CheckedSQL, schema: str, role: str,
                    limits: Limits) -> str | None:
    """Run a checked correction as the retrain will (:func:`run_readonly`): refuse one that fails (InputError, with
    PostgreSQL's error). A user that may not SET ROLE to ``role`` runs it as itself instead; when that user may not
    read the tables either, nothing can be checked: returns a note that says what would let it."""
    with conn.cursor(row_factory=dict_row) as cur:
        runner = cur.execute(q("correction_runner", "textsql.sql"), {"role": role}).fetchone()
    user, member = runner["user"], runner["member"]
    try:
        run_readonly(conn, checked, limits, role=role if member else user, search_path=(schema,))
    except UnsafeSQL as exc:
        raise InputError(f"data question {question}: the corrected statement is {exc}: the retrain checks a "
                         "correction as it checks the model's statements, and would drop it") from None
    except QueryFailed as exc:
        if not member and exc.sqlstate == "42501":
            return (f"the corrected statement was recorded without being run: {user} is not a member of the reader "
                    f"role {role}, as which the retrain runs it, and may not read its tables (GRANT {role} TO {user} "
                    "lets sql-correct run it first and refuse one that fails)")
        said = str(exc).removeprefix(STATEMENT_FAILED)
        raise InputError(f"data question {question}: the corrected statement failed in PostgreSQL: {said}: the "
                         f"retrain runs a correction as the model's statements run (read-only, as {role}), and would "
                         "drop it") from None
    return None


def record_correction(url: str, settings: Settings, question: int, sql: str | None,
                      approve: bool) -> tuple[int, str | None]:
    """:func:`correct` on the database at ``url``: a corrected statement runs where the worker runs generated ones,
    the reader role's own login where there is one (textsql/reader.py), where none can set its role back to the
    connection's user."""
    with contextlib.ExitStack() as stack:
        conn = stack.enter_context(connect(url, autocommit=True, settings=settings))
        runner = None if approve else stack.enter_context(reader.for_command(url, settings))
        return correct(conn, question, sql, approve, settings.sql_reader_role, Limits.of(settings), runner)


def run_sql_correct(args: argparse.Namespace, settings: Settings) -> int:
    with Database(settings) as db:
        cid, note = record_correction(db.url, settings, args.question, args.sql, args.approve)
    if note:
        notice("sql_correct_not_run", note, heading="note", correction=cid)
    print(f"correction {cid} recorded for data question {args.question}")
    return 0


def run_sql_model_command(args: argparse.Namespace, settings: Settings) -> int:
    with Database(settings) as db, db.connect(autocommit=True) as conn:
        action = args.sql_model_command
        if action == "list":
            # the active one's share: what the candidates routed leave it (its row says 100 whatever they take)
            rows = served_shares(registry.list_models(conn), registry.routable_sql_models(conn))
            if args.json:
                print(json_dumps(rows, indent=2))
            elif not rows:
                print(f"no SQL models registered: the worker uses sql_model_path = {settings.sql_model_path} "
                      f"({settings.sql_runtime})")
            for r in [] if args.json else rows:
                acc = (r.get("metrics") or {}).get("candidate_accuracy")
                print(f"{r['id']:>3}  {r['status']:<9} {float(r['traffic_percent']):>6.2f}%  {r['runtime']:<12} "
                      f"{r['name']}  ({r['path']})" + (f"  held-out accuracy {acc:.3f}" if acc is not None else ""))
        elif action == "add":
            runtime, why = (args.runtime, None) if args.runtime else registry.choose_runtime(args.path)
            if not args.no_runtime_check:
                registry.check_runtime_here(runtime, args.path)
            path = registry.registered_path(args.path, runtime)
            registry.refuse_duplicate(conn, path, runtime)
            r = registry.add_model(conn, args.name or args.path, path, runtime,
                                   status="active" if args.activate else "candidate")
            print(f"SQL model {r['id']} ({r['runtime']}): {r['status']}")
            if why:
                print(f"  runtime {runtime}: {why}")
        elif action == "retrain":
            return retrain(conn, args)
        else:
            print(registry.REGISTRY.command(conn, action, getattr(args, "model", None), getattr(args, "percent", None)))
    return 0


def retrain(conn: psycopg.Connection, args: argparse.Namespace) -> int:
    """``pgsynapse sql-model retrain``: queue one now (whatever ``sql_retrain_min_corrections``), and with ``--wait``
    print what it registered."""
    if not conn.execute(q("sql_corrections_count", "textsql_models.sql")).fetchone()["n"]:
        raise refuse_retrain(args, "no corrections to learn from (`pgsynapse sql-correct ID --sql ...` records one); "
                             "nothing was queued", sql_model=None, status=None, traffic_percent=None, gate=None)
    code, waited = queue_and_wait(conn, "sql_retrain", wait=args.wait, force=args.force, now=True,
                                  hint="" if args.wait else ": a worker with the sql_retrain kind runs it",
                                  out=sys.stderr if args.json else sys.stdout,
                                  force_command="pgsynapse sql-model retrain --force" if args.force else None)
    model = None
    if waited["outcome"] == "done":
        # the model this job registered (another sql_retrain may have registered one meanwhile)
        model = conn.execute(q("sql_model_of_job", "textsql_models.sql"), {"job": waited["job"]}).fetchone()
        if model and model["status"] == "rejected":
            code = 1  # the gate refused what was asked for (README's exit codes)
        if not args.json:
            print(render_sql_gate(model) if model else "the sql_retrain registered no SQL model")
    if args.json:
        print(json.dumps({**waited, "sql_model": model and model["id"], "status": model and model["status"],
                          "traffic_percent": model and float(model["traffic_percent"]),
                          "gate": model and model["metrics"].get("gate")}, indent=2))
    return code


def render_sql_gate(model: dict[str, Any]) -> str:
    """A SQL retrain's verdict for people: what became of the model, its held-out execution accuracy against the
    active model's, and the gate's reasons."""
    gate = model["metrics"]["gate"]
    if model["status"] == "rejected":
        head = f"SQL model {model['id']}: rejected by its gate; the active model keeps serving"
    elif not gate["passed"]:
        head = (f"SQL model {model['id']}: {model['status']}, registered past its gate (--force) with no traffic "
                f"(`pgsynapse sql-model traffic {model['id']} PERCENT` gives it some)")
    else:
        head = (f"SQL model {model['id']}: {model['status']}, passed its gate; it answers "
                f"{float(model['traffic_percent']):g}% of sessions (`pgsynapse sql-model promote {model['id']}` makes "
                "it the active model)")
    lines = [head]
    if gate["delta"] is not None:
        lines.append(f"  held-out execution accuracy {gate['candidate']:.3f} against the active model's "
                     f"{gate['active']:.3f} ({gate['heldout']} pairs: {gate['wins']} won, {gate['losses']} lost)")
    lines += [f"  gate: {reason}" for reason in gate["reasons"]]
    return "\n".join(lines)


def reader_password(role: str, from_stdin: bool, configured: str | None = None) -> str:
    """The password ``reader-login`` gives ``role``: the first line of stdin with ``--password-stdin``, else
    ``configured`` (the sql_reader_password setting: PGSYNAPSE_SQL_READER_PASSWORD when it holds a value, else the
    config file's, by the settings' rule, so the worker logs in with the same one), else asked twice on a terminal;
    never an argument (``ps`` shows those)."""
    if from_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    elif configured is not None:  # never empty: the settings refuse an empty one, naming it
        password = configured
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {role}: ")
        if password and getpass.getpass("again: ") != password:
            raise InputError(f"the two passwords for {role} differ: nothing was changed")
    else:
        raise InputError(f"no password for {role}: set {READER_PASSWORD} (an empty one is unset) or the config "
                         "file's sql_reader_password, or give it on stdin with --password-stdin (never on the command "
                         "line, where ps shows it); nothing was changed")
    if not password:
        raise InputError(f"the password for {role} is empty: give one (on stdin with --password-stdin, or in "
                         f"{READER_PASSWORD}); nothing was changed")
    return password


def run_reader_login(args: argparse.Namespace, settings: Settings) -> int:
    """``pgsynapse reader-login``: let the reader role log in with a password on a server of yours, sent as its
    SCRAM-SHA-256 verifier (:func:`reader.set_password`); the worker's ``sql_reader_url`` then logs in with it."""
    role = settings.sql_reader_role
    if settings.embedded:
        raise InputError(f"the embedded server needs no password for {role}: its worker lets {role} log in on the "
                         "server's private socket (docs/text-to-sql.md, \"The reader's own login\"); reader-login is "
                         "for a server of yours: give --database-url (or DATABASE_URL)")
    password = reader_password(role, args.password_stdin, settings.sql_reader_password)
    with Database(settings) as db, db.connect(autocommit=True) as conn:
        reader.set_password(conn, role, password)
    print(f"{role} may log in with the password given (only its SCRAM-SHA-256 verifier was sent): set sql_reader_url "
          f"to that login and sql_reader_password to the password, e.g. PGSYNAPSE_SQL_READER_URL=postgresql://{role}"
          f"@HOST/DATABASE and {READER_PASSWORD} as here")
    return 0
