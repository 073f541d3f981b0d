"""The ``pgsynapse`` command: a thin layer over the library functions (its arguments: cli_args.py)."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import anyio
import psycopg

from pgsynapse.app import ask, ensure_schema, run_worker
from pgsynapse.cli_args import bench_name, benchmarks, parse_args
from pgsynapse.client import format_result
from pgsynapse.config import load_settings, unknown_environment
from pgsynapse.config_file import early_log_format
from pgsynapse.db import SCHEMA_ERRORS, Database, describe_db_error
from pgsynapse.demo import run_demo
from pgsynapse.errors import (ConfigError, DatabaseError, DatabaseSetupError, ModelError, PgsynapseError,
                              SchemaMissing, Terminated)
from pgsynapse.exiting import end, work_done
from pgsynapse.export import run_export
from pgsynapse.guardrail_cli import run_guardrail_command
from pgsynapse.images.cli import run_image_model_command, run_image_search
from pgsynapse.ingest import follow, ingest
from pgsynapse.jsonout import dumps as json_dumps
from pgsynapse.learning.canary import canary_command
from pgsynapse.learning.cli import run_learning_command, run_model_command
from pgsynapse.logs import configure_logging, get_logger, notice
from pgsynapse.migrate import migrate, schema_state
from pgsynapse.models import ModelCache
from pgsynapse.queries import q
from pgsynapse.ranking.cli import run_ranker_command
from pgsynapse.ranking.rescore import rescores
from pgsynapse.ranking.scorer import RankerCache, ranker_row
from pgsynapse.replica import replica_for
from pgsynapse.results import AnswerTimeout, Result, terminal_safe
from pgsynapse.retry import retry_failed
from pgsynapse.search import check_search_text, search, search_order, unsearched, version_row
from pgsynapse.status import render, render_embedded, status_snapshot
from pgsynapse.textsql.cli import run_reader_login, run_sql_ask, run_sql_correct, run_sql_model_command

log = get_logger(__name__)

EX_UNAVAILABLE = 69  # the database could not be used
EX_BROKEN_PIPE = 141  # what a shell reports of a command killed by SIGPIPE (128 + 13)
EX_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EX_TERMINATED = 143  # SIGTERM stopped `ask` or `sql-ask` (128 + SIGTERM): their question left pending at once
EX_CONFIG = 78  # bad configuration, model or database setup: restarting will not help (RestartPreventExitStatus)
EX_REFUSED = 1  # a command refused or failed what it was asked (README, exit codes)
# what the database refuses in the data itself (a CHECK, a unique index, a value out of range, a trigger's RAISE):
# the same data is refused again, so not the "retry later" of exit 69
DATA_REFUSED = (psycopg.errors.IntegrityError, psycopg.errors.DataError, psycopg.errors.RaiseException)
# the server errors that a later try may not meet (exit 69): SQLSTATE classes 08 connection, 40 transaction rollback
# (serialization failure, deadlock), 53 insufficient resources (disk full, too many connections), 57 operator
# intervention (shutdown, statement timeout), 58 system error (I/O); and a lock or an object in use (55P03, 55006).
# Any other (54 program_limit_exceeded: a text past a limit of PostgreSQL, too many columns...) fails again: exit 1
RETRY_CLASSES = frozenset({"08", "40", "53", "57", "58"})
RETRY_STATES = frozenset({"55P03", "55006"})


def _retry_later(exc: psycopg.Error) -> bool:
    """Whether a database error may pass if the command is run again later (no SQLSTATE: the server was not reached,
    or the connection was lost)."""
    state = exc.sqlstate
    return state is None or state[:2] in RETRY_CLASSES or state in RETRY_STATES


# commands that print their result: their info events (the embedded server starting and stopping, the worker they
# start for an answer) would bury it at a prompt. They log warnings and errors unless log_level is set (flag, env,
# file). The others (run, migrate, ingest, demo, bench, and the actions that export, add or train a model) report
# their progress as info events.
QUIET_COMMANDS = frozenset({"ask", "search", "feedback", "status", "sql-ask", "sql-correct", "ab-report", "canary",
                            "queue-notify", "retry-failed", "retrain", "promote", "rollback", "retire", "traffic",
                            "guardrail", "reader-login"})
# the quiet actions of the registries' commands (model, image-model, sql-model, ranker); `sql-model retrain` only
# queues a job
QUIET_ACTIONS = frozenset({"list", "promote", "rollback", "retire", "traffic", "retrain"})
ACTION_OF = {"model": "model_command", "image-model": "image_command", "sql-model": "sql_model_command",
             "ranker": "ranker_command"}


def _quiet(args: argparse.Namespace) -> bool:
    """Whether a command prints its result (and logs only warnings and errors by default)."""
    if args.command in ACTION_OF:
        return getattr(args, ACTION_OF[args.command], None) in QUIET_ACTIONS
    return args.command in QUIET_COMMANDS


def _settings(args: argparse.Namespace):
    overrides = {
        "database_url": args.database_url,
        "data_dir": args.data_dir,
        "log_format": args.log_format,
        "log_level": args.log_level,
    }
    if getattr(args, "kinds", None):
        overrides["kinds"] = args.kinds
    settings = load_settings(args.config, **overrides)
    if _quiet(args) and "log_level" not in settings.model_fields_set:
        settings = settings.model_copy(update={"log_level": "warning"})
    return settings


def _schema_behind(settings, exc: psycopg.Error) -> DatabaseError | None:
    """Why a command met a missing table or column, when the migrations say why: the schema is missing or behind.
    Asked only then, so that every other command pays nothing for it."""
    if settings is None or not isinstance(exc, SCHEMA_ERRORS):
        return None
    try:
        with Database(settings) as db:
            ensure_schema(db, apply=False)
    except DatabaseError as why:
        return why
    except psycopg.Error:
        return None
    return None


def _schema_code(args: argparse.Namespace, why: DatabaseError) -> int:
    """A schema missing or behind: `run` (--no-migrate) exits 69, restarted until the owner's `migrate` has run; a
    one-shot command on a database with no pgsynapse schema at all exits 78: retrying it will not make one."""
    return EX_CONFIG if isinstance(why, SchemaMissing) and args.command != "run" else EX_UNAVAILABLE


def _fail(args: argparse.Namespace, settings, message: str, code: int) -> int:
    """A command's last word when it fails: ``pgsynapse: error: ...`` on stderr, or with JSON logs a ``fatal_error``
    event (every line of a JSON log is JSON: journalctl -o cat | jq). Settings that did not load give the format of
    the flag, PGSYNAPSE_LOG_FORMAT (the systemd unit's) or the config file's log_format, when it parses."""
    if _log_format(args, settings) != "json":
        print(f"pgsynapse: error: {message}", file=sys.stderr)
        return code
    if settings is None:
        configure_logging("json", "error")
    get_logger("pgsynapse").error("fatal_error", error=message, exit_code=code)
    return code


def _log_format(args: argparse.Namespace, settings) -> str | None:
    return settings.log_format if settings is not None else (args.log_format or early_log_format(args.config))


def _crash(args: argparse.Namespace, settings, exc: Exception) -> int:
    """An error no command expects (a bug): with JSON logs one ``fatal_error`` event that holds the traceback (its
    ``exception``), exit 1 as Python's own; with console logs, Python's traceback (raised again by the caller)."""
    if settings is None:
        configure_logging("json", "error")
    get_logger("pgsynapse").exception("fatal_error", error=" ".join(f"{type(exc).__name__}: {exc}".split()),
                                      exit_code=EX_REFUSED)
    return EX_REFUSED


def program() -> NoReturn:
    """The ``pgsynapse`` program (its console script, ``python -m pgsynapse``): :func:`main`, then the process
    ends, at once when a worker has stopped (exiting.py)."""
    end(main())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = None
    try:
        settings = _settings(args)
        configure_logging(settings.log_format, settings.log_level)
        code = _dispatch_migrating(args, settings)
        sys.stdout.flush()  # here, where a reader gone is caught, not at exit
        return code
    except BrokenPipeError:  # the reader went away (`pgsynapse status --json | head -1`): no traceback
        # Python flushes stdout again at exit: /dev/null takes what is left (docs.python.org, "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_BROKEN_PIPE
    except (ConfigError, ModelError, DatabaseSetupError) as exc:
        return _fail(args, settings, str(exc), EX_CONFIG)
    except DatabaseError as exc:
        return _fail(args, settings, str(exc), _schema_code(args, exc))
    except psycopg.Error as exc:
        if behind := _schema_behind(settings, exc):
            return _fail(args, settings, str(behind), _schema_code(args, behind))
        if isinstance(exc, DATA_REFUSED):
            return _fail(args, settings, f"the database refused the data: {describe_db_error(exc)}: change the data, "
                         "or the constraint or trigger that refuses it", EX_REFUSED)
        # the boundary: a server error no library function wrapped (a missing privilege...) is one line, not a traceback
        # a missing privilege stays missing until someone grants it: not worth a restart loop
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            return _fail(args, settings, f"database error: {describe_db_error(exc)}", EX_CONFIG)
        if isinstance(exc, psycopg.errors.ProgramLimitExceeded):
            return _fail(args, settings, f"the database refused the statement: {describe_db_error(exc)}: it exceeds "
                         "a limit of PostgreSQL: retrying will not help; make the input smaller", EX_REFUSED)
        if not _retry_later(exc):
            return _fail(args, settings, f"database error: {describe_db_error(exc)}: retrying will not help",
                         EX_REFUSED)
        return _fail(args, settings, f"database error: {describe_db_error(exc)}", EX_UNAVAILABLE)
    except AnswerTimeout as exc:  # no answer came: PostgreSQL out of reach is a "retry later"
        return _fail(args, settings, str(exc), EX_UNAVAILABLE if exc.unreachable else EX_REFUSED)
    except PgsynapseError as exc:
        return _fail(args, settings, str(exc), EX_REFUSED)
    except KeyboardInterrupt as exc:  # Ctrl-C; SIGTERM of a one-shot ask (Terminated), as a shell reports them
        return EX_TERMINATED if isinstance(exc, Terminated) else EX_INTERRUPTED
    except Exception as exc:
        if _log_format(args, settings) != "json":
            raise
        return _crash(args, settings, exc)  # every line of a JSON log is JSON, a traceback included


# commands that do not migrate a fresh embedded database: `status` reports its schema, `run` migrates unless told not to
NO_AUTO_MIGRATE = frozenset({"status", "migrate", "run"})


def _dispatch_migrating(args: argparse.Namespace, settings) -> int:
    """The command; on the embedded database (pgsynapse's own: no one else migrates it) one that met no pgsynapse
    schema at all (a fresh data dir) is run again once the migrations are applied, as `ask` applies them. Nothing
    was written: no pgsynapse table existed."""
    try:
        return _dispatch(args, settings)
    except (SchemaMissing, *SCHEMA_ERRORS):
        if not settings.embedded or args.command in NO_AUTO_MIGRATE:
            raise
        with Database(settings) as db:
            with db.connect() as conn:
                if schema_state(conn)["applied"] is not None:  # a schema behind: `pgsynapse migrate` says what
                    raise
            done = ensure_schema(db)
        log.warning("schema_migrated_embedded", command=args.command, applied=done)
    return _dispatch(args, settings)


def _dispatch(args: argparse.Namespace, settings) -> int:
    for var, meant in unknown_environment():  # a typo in a variable is otherwise ignored without a word
        log.warning("unknown_setting_in_environment", variable=var, did_you_mean=meant, ignored=True)
    if args.command == "run":
        run_worker(settings, apply_migrations=not args.no_migrate, reload=lambda: _settings(args))
        work_done()  # drained, stopped, its embedded server released: the process may end at once (exiting.py)
        return 0
    if args.command == "migrate":
        with Database(settings) as db:
            done = migrate(db.listen_url)  # the direct URL if any; a transaction pooler is safe too (xact locks)
        print("applied: " + ", ".join(done) if done else "database schema is up to date")
        return 0
    if args.command == "status":
        with Database(settings) as db, db.connect() as conn:
            # how psql or an application reaches it (a URL of DATABASE_URL is not echoed); printed also when the
            # status fails, as on a database never migrated: psql reaches it all the same
            embedded = {"data_dir": str(settings.data_dir), "url": db.url} if settings.embedded else None
            try:
                snap = status_snapshot(conn, read_url=settings.read_url, settings=settings)
            except psycopg.Error:
                if embedded:
                    print(json_dumps({"embedded": embedded}, indent=2) if args.json else render_embedded(embedded))
                raise
            if embedded:
                snap["embedded"] = embedded
        print(json_dumps(snap, indent=2) if args.json else render(snap))
        return 0
    if args.command == "queue-notify":
        with Database(settings) as db, db.connect(autocommit=True) as conn:
            if args.state == "show":
                on = conn.execute(q("enqueue_notify")).fetchone()["notify_on_enqueue"]
            else:
                on = conn.execute(q("set_enqueue_notify"), {"on": args.state == "on"}).fetchone()["notify_on_enqueue"]
        print("enqueue NOTIFY: on (workers wake on each commit that queues jobs)" if on else
              f"enqueue NOTIFY: off (idle workers poll every quiet_poll_interval, {settings.quiet_poll_interval:g} s here)")
        return 0
    if args.command == "retry-failed":
        with Database(settings) as db, db.connect() as conn:
            retried = retry_failed(conn, args.kind, skip_input_errors=args.skip_input_errors)
        such = f"such as: {textwrap.shorten(retried.input_error or '', 300, placeholder=' ...')}"
        if retried.requeued:
            print("requeued " + ", ".join(f"{k}: {n}" for k, n in sorted(retried.requeued.items())))
            if retried.input_errors and not retried.skipped_input_errors:
                print(f"{sum(retried.input_errors.values())} of them failed on their input, {such}: they fail the "
                      "same way again unless their row, or what the error names (a limit, a table), changed since "
                      "(--skip-input-errors leaves them failed)")
        elif not retried.superseded and not retried.gone and not retried.input_errors:
            print("no failed jobs" + (f" of kind {args.kind}" if args.kind else ""))
        if retried.input_errors and retried.skipped_input_errors:
            print(f"left {sum(retried.input_errors.values())} failed job(s) that failed on their input ("
                  + ", ".join(f"{k}: {n}" for k, n in sorted(retried.input_errors.items())) + f"), {such}")
        if retried.superseded:
            print(f"closed {retried.superseded} failed job(s) as superseded: their row has a newer job, or changed "
                  "and was processed since")
        if retried.gone:
            print(f"closed {retried.gone} failed job(s) whose row was deleted: nothing is left for them to do")
        return 0
    if args.command == "search" and args.k is None:  # as many as an answer is given
        args.k = settings.answer_top_k
    if args.command == "search" and (args.text or "").strip():  # before any model is loaded (a ranker, an encoder)
        check_search_text(args.text, settings.max_question_chars)
    if args.command == "search" and (args.images or args.like_image or args.image_model is not None):
        return run_image_search(args, settings)
    if args.command == "image-model":
        return run_image_model_command(args, settings)
    if args.command == "guardrail":
        return run_guardrail_command(args, settings)
    if args.command == "sql-ask":
        return run_sql_ask(args, settings)
    if args.command == "sql-correct":
        return run_sql_correct(args, settings)
    if args.command == "sql-model":
        return run_sql_model_command(args, settings)
    if args.command == "reader-login":
        return run_reader_login(args, settings)
    if args.command == "ranker":
        return run_ranker_command(args, settings)
    if args.command == "search":
        async def go(db: Database):
            replica = replica_for(settings.read_url, settings.read_max_lag_ms, application_name="pgsynapse-search",
                                  settings=settings)
            try:
                async with db.aconnect(autocommit=True) as conn:
                    row = await ranker_row(conn, args.ranker)
                    version = await version_row(conn, args.model_version)  # read once: search() takes it
                    if row is not None and not rescores(row, version["id"]):
                        row = None  # a teacher that is the version searched leaves its order (ranking/rescore.py)
                    ranker = (row if row is None or row["runtime"] == "version"
                              else RankerCache(settings.onnx_threads or settings.torch_threads,
                                               data_dir=settings.data_dir).get(row))
                    models = ModelCache(model_path=settings.model_path, device=settings.device,
                                        threads=settings.torch_threads, onnx_threads=settings.onnx_threads,
                                        data_dir=settings.data_dir)  # as a worker loads it (listener/worker.py)
                    hits = await search(conn, models, args.text, k=args.k,
                                        version=version, replica=replica, ranker=ranker,
                                        candidates=settings.rank_candidates, hybrid=settings.hybrid,
                                        text_weight=settings.hybrid_text_weight,
                                        text_max_rows=settings.hybrid_text_max_rows,
                                        max_chars=settings.max_question_chars)
                    waiting = (await (await conn.execute(q("documents_waiting", "ops.sql"))).fetchone())["n"]
                    return hits, search_order(settings.hybrid, ranker is not None), waiting
            finally:
                if replica is not None:
                    await replica.aclose()

        with Database(settings) as db:
            hits, order, waiting = anyio.run(go, db)
            if waiting:
                with db.connect(autocommit=True) as conn:
                    note = unsearched(conn, waiting)
        if not hits:
            print(f"no results: {note}" if waiting else
                  "no results: no document is embedded (add some: `pgsynapse ingest PATH`, or INSERT them)")
        else:
            print(f"{len(hits)} hits in {order} order; the score is the cosine similarity to the text")
        for i, h in enumerate(hits, 1):
            where = h.source or f"document {h.document_id}"
            place = f"chunk id {h.chunk_id} (#{h.ord} in the document)"  # as `ask` names a cited chunk
            print(terminal_safe(f"{i}. {h.score:.3f}  {h.title}  [{where}, {place}]"))
            print(textwrap.indent(terminal_safe(textwrap.shorten(" ".join(h.text.split()), 300)), "   "))
        if hits and waiting:
            print(note)
        return 0
    if args.command == "ask":
        streamed: list[str] = []

        def show(piece: str) -> None:  # a generator's answer, printed as it is written
            if not streamed:
                piece = piece.lstrip()
            streamed.append(piece)
            print(terminal_safe(piece), end="", flush=True)

        def done(result: Result) -> None:  # printed as soon as it comes: the in-process worker's stop comes after
            if args.json:
                print(json_dumps(asdict(result), indent=2), flush=True)
            elif streamed:
                text, final = "".join(streamed).rstrip(), (result.answer or "").strip()
                # the final answer continues what streamed, or replaces it (refused, or asked again meanwhile)
                rest = final[len(text):] if final.startswith(text) else f"\n--- final answer ---\n{final}"
                print(terminal_safe(rest))
                print(terminal_safe(format_result(result, answer=False)), flush=True)
            else:
                print(terminal_safe(format_result(result)), flush=True)

        result = ask(settings, args.text, session_id=args.session, timeout=args.timeout,
                     on_delta=None if args.json else show, on_result=done,
                     migrate=args.migrate)
        return 0 if result.status == "answered" else 1
    if args.command in ("feedback", "retrain", "ab-report", "promote", "rollback", "retire", "traffic"):
        with Database(settings) as db, db.connect(autocommit=True) as conn:
            return run_learning_command(args, conn)
    if args.command == "canary":
        size = settings.retrain_canary_size if args.size is None else args.size
        with Database(settings) as db, db.connect(autocommit=True) as conn:
            print(canary_command(conn, args.action, size))
        return 0
    if args.command == "ingest":
        progress = False if args.no_progress else None
        with Database(settings) as db:
            ensure_schema(db, apply=False)
            with db.connect(autocommit=True) as conn:
                report = ingest(conn, args.paths, max_chars=settings.max_document_chars,
                                max_file_bytes=settings.max_document_file_bytes,
                                max_image_bytes=settings.max_image_bytes, progress=progress, replace=args.replace,
                                encoding=args.encoding)
                print(report.summary())
                if args.follow:
                    follow(conn, report, progress=progress, timeout=args.follow_timeout or None,
                           note=lambda why: notice("ingest_follow_waiting", why))
                    print(f"embedded: {report.embedded}, embedding failed: {report.embed_failed}")
                    if report.images_embedded is not None:
                        print(f"images embedded: {report.images_embedded}, failed: {report.images_failed}")
                    elif report.image_ids:
                        print("images wait for an image model: pgsynapse image-model add PATH")
        return 1 if report.failed or report.embed_failed or report.images_failed else 0
    if args.command == "model" and args.model_command in ("add", "list", "distill"):
        with Database(settings) as db, db.connect(autocommit=True) as conn:
            return run_model_command(args, conn, settings, db.url)
    if args.command == "model":
        # imported here like every command's library: parsing the command line loads no numpy, torch or onnx
        report = run_export(
            settings,
            args.runtime,
            version=args.model_version,
            threshold=args.threshold,
            corpus=Path(args.corpus) if args.corpus else None,
            questions=[Path(x) for x in args.questions or []],
            n_chunks=args.sample or settings.export_sample_chunks,
            switch=args.switch,
            scheme=args.scheme,
            waiting=lambda: notice("model_export_waiting", "a worker (or another `model export --switch`) is exporting "
                                   "a model version to its runtime (minutes on a small host): waiting for it to "
                                   "finish, then exporting"),
        )
        print(json_dumps(report.as_dict()))
        a = report.agreement
        figures = f"top-10 overlap {a.overlap_at_10:.3f}, cosine mean {a.cosine_mean:.4f} (min {a.cosine_min:.4f})"
        if not report.accepted:
            notice("export_refused", f"{args.runtime} agreement below {report.threshold}: {figures}", level="error",
                   heading="refused", runtime=args.runtime)
            return 1
        what = "switched" if args.switch else "registered as candidate"
        print(f"{args.runtime}: {what} model version {report.version_id}: {figures}, artifact {report.artifact_path}")
        return 0
    if args.command == "bench":
        sys.path.insert(0, os.getcwd())  # bench/ lives in the source tree, beside src/
        if args.name is None:
            listed = benchmarks()
            width = max(map(len, listed))
            print("\n".join(f"{name.ljust(width)}  {textwrap.shorten(what, 96 - width, placeholder=' ...')}"
                            for name, what in listed.items()))
            print("\n`pgsynapse bench NAME --help`: its options (`python -m bench.NAME` runs the same)")
            return 0
        module = f"bench.{bench_name(args.name)}"
        if args.database_url:  # given to pgsynapse (before or after `bench`): the benchmarks read DATABASE_URL
            os.environ["DATABASE_URL"] = args.database_url
        sys.argv = [module, *args.bench_args]
        runpy.run_module(module, run_name="__main__")
        return 0
    if args.command == "demo":
        return run_demo(settings, limit=args.limit)
    raise AssertionError(args.command)
