"""Library entry points behind the CLI: run the worker, migrate, status, search, demo."""

from __future__ import annotations

import contextlib
import copy
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import psycopg
from anyio.abc import TaskStatus

from pgsynapse.client import LATER, TABLES, AnswerTimeout, Client, require_text
from pgsynapse.config import Settings
from pgsynapse.daemon import serve, warn_file_overridden
from pgsynapse.db import (EXPORT_COMMAND, Database, a_worker_starts, exported_version, starting_export, worker_starting,
                          worker_takes)
from pgsynapse.errors import DatabaseError, DatabaseSetupError, PgsynapseError, SchemaMissing, Terminated
from pgsynapse.listener.worker import Worker
from pgsynapse.logs import get_logger, libraries_at_debug
from pgsynapse.migrate import migrate, schema_state, warn_if_newer
from pgsynapse.model_checks import check_models, warn_unavailable
from pgsynapse.queries import q
from pgsynapse.results import no_answer, not_started
from pgsynapse.sdnotify import StartPings
from pgsynapse.startup import StartingHttp, bind_metrics
from pgsynapse.wording import listed

log = get_logger(__name__)


def ensure_schema(db: Database, *, apply: bool = True) -> list[str]:
    """Apply the pending migrations (returns their names), or with ``apply`` False refuse a schema that is behind."""
    if apply:
        return migrate(db.listen_url)  # the direct URL if any; a transaction pooler is safe too (xact locks)
    with db.connect() as conn:
        state = schema_state(conn)
        name = conn.info.dbname
    warn_if_newer(state["newer"])
    missing = state["pending"]
    if missing and state["applied"] is None:  # named: a database_url of the wrong database is the usual cause
        raise SchemaMissing(f'database "{name}" has no pgsynapse schema: run `pgsynapse migrate` on it (it applies '
                            f"all {len(missing)} migrations, {missing[0]} to {missing[-1]}), or point database_url "
                            "at the database that has it")
    if missing:
        raise DatabaseError(f"database schema is not up to date ({len(missing)} migration(s) to apply: "
                            f"{listed(missing)}): run `pgsynapse migrate`")
    return []


def run_worker(
    settings: Settings, *, apply_migrations: bool = True, reload: Callable[[], Settings] | None = None
) -> None:
    """The service: its models checked, migrations, then the worker with systemd notify/watchdog, SIGHUP
    ``reload`` and metrics."""
    if threading.current_thread() is threading.main_thread():
        # SIGHUP reloads once started (daemon.Service); until then its default action would kill the process
        signal.signal(signal.SIGHUP, _reload_while_starting)
    # under systemd, every step until READY=1 may take minutes: the start timeout is extended while it lasts, and
    # the metrics port answers /healthz "starting" (with the step) from the first moment (startup.py)
    warn_file_overridden(settings)
    with StartingHttp(bind_metrics(settings)) as early, StartPings() as starting:
        unavailable = check_models(settings)  # before a database is started or migrated for a worker that cannot serve
        early.phase = "database"
        with Database(settings) as db:
            early.phase = "migrations"
            ensure_schema(db, apply=apply_migrations)
            # after embedded_postgres_started (the start's lines in the start's order) and the migrations: an active
            # registered SQL model, which serves in the default's place, makes it a note (info), not a warning
            warn_unavailable(unavailable, settings, db.url)
            early.phase = "worker_start"
            worker = Worker(settings, db.url)
            anyio.run(lambda: serve(worker, reload=reload, starting=starting, early=early))


def _reload_while_starting(signum: int, frame: object) -> None:
    log.warning("config_reload_ignored", note="the worker is still starting: send SIGHUP again once started "
                "(systemctl reload pgsynapse, after service_ready)")


def ask(settings: Settings, text: str, *, session_id: str | None = None, timeout: float = 120.0,
        on_delta: Callable[[str], None] | None = None, on_result: Callable[[Any], None] | None = None,
        migrate: bool = False):
    """Ask one question and wait for its answer; ``on_delta`` gets its pieces as a generator streams them, and
    ``on_result`` the final Result as soon as it comes, before the in-process worker and the embedded server stop
    (seconds). Without a running worker on this database, an in-process worker answers it (the embedded default's
    usual case). ``migrate``: apply pending migrations first (always on the embedded server; elsewhere a
    schema missing or behind is refused, as by every one-shot command). A SIGTERM while it asks (in the main thread,
    SIGTERM not handled by the caller) stops it as a Ctrl-C does, raising :class:`~pgsynapse.errors.Terminated`; a
    Ctrl-C or SIGTERM once ``on_result`` had the result returns the result."""
    require_text(text)  # refused before a database or a worker is started for it

    return _answered(settings, "answer", "question", timeout, lambda client, limit: client.ask(
        text, session_id=session_id, timeout=limit, on_delta=on_delta), on_result, migrate=migrate)


def ask_data(settings: Settings, text: str, *, session_id: str | None = None, schema: str = "public",
             tables: list[str] | None = None, timeout: float = 300.0, on_result: Callable[[Any], None] | None = None,
             migrate: bool = False):
    """Ask one question about the data and wait for its statement and result (an in-process worker answers it
    when none runs on this database); ``on_result`` (the DataResult as soon as it comes) and ``migrate`` as
    :func:`ask`'s."""
    require_text(text)

    return _answered(settings, "sql_answer", "data question", timeout, lambda client, limit: client.ask_data(
        text, session_id=session_id, schema=schema, tables=tables, timeout=limit), on_result, migrate=migrate)


class _Started:
    """The task status of ask's own worker (``Worker.run``'s ``task_status``): set once it has started."""

    def __init__(self) -> None:
        self.event = anyio.Event()

    def started(self, value: object = None) -> None:
        self.event.set()


class _NotStarted(Exception):
    """No answer within the timeout, and the command's own worker had not started yet (``question_id``: asked)."""

    def __init__(self, question_id: int) -> None:
        super().__init__(question_id)
        self.question_id = question_id


class _WorkerFailed(Exception):
    """The command's own worker stopped on ``cause``: before it had started, unless ``started``."""

    def __init__(self, cause: Exception, started: bool) -> None:
        super().__init__(cause)
        self.cause, self.started = cause, started


def _left_pending(failed: _WorkerFailed, what: str, qid: int) -> Exception:
    """The error of a command whose own worker failed with its question asked: the question's id, that it stays
    pending, and the worker's reason, in one line; of the cause's class, so the exit code is the cause's."""
    select = f"SELECT {LATER[what][0]} FROM pgsynapse.{TABLES[what]} WHERE id = {qid}"
    why = " ".join(str(failed.cause).split()) or type(failed.cause).__name__
    message = (f"{what} {qid} stays pending: this command's worker {'stopped' if failed.started else 'failed to start'}"
               f" ({why}); it is answered once a worker runs (`pgsynapse run`): {select}")
    if isinstance(failed.cause, psycopg.errors.InsufficientPrivilege):  # an application's role asked (pgsynapse_app)
        return DatabaseSetupError(
            f"{what} {qid} stays pending: no worker that answers {what}s runs on this database, so this command "
            f"started its own, which this database user may not run ({why}); start `pgsynapse run` with a worker's "
            f"login (GRANT pgsynapse_worker TO <user>; docs/operations.md, roles) and it is answered: {select}")
    if not isinstance(failed.cause, PgsynapseError):  # a database error, a bug: the CLI reports it as itself
        log.warning("question_left_pending", what=what, id=qid, note=message)
        return failed.cause
    said = copy.copy(failed.cause)
    said.args = (message,)
    return said


def _answered(settings: Settings, kind: str, what: str, timeout: float,
              call: Callable[[Client, float | None], Awaitable[Any]], on_result: Callable[[Any], None] | None = None, *,
              migrate: bool = False):
    """``call(client, timeout)`` asks against a worker: the one running on this database, else one started here for
    ``kind`` while it asks (``timeout`` bounds both: a first start waits for another worker's export, minutes);
    ``timeout``: None for no limit (the command line's 0); ``what`` it asks ("question", "data question":
    :data:`pgsynapse.client.LATER`), for a timeout's message; ``on_result(result)`` as soon as it comes."""
    asking: list[Client] = []
    shown: list[Any] = []  # the result, once on_result had it: a Ctrl-C or SIGTERM after it stops no work

    async def go(url: str, limit: float | None, asked: anyio.Event | None = None):
        client = Client(url, listen_url=settings.listen_url, settings=settings)
        client.asked = asked
        asking.append(client)
        async with client:
            result = await call(client, limit)
        if on_result is not None:  # before the stops of the in-process worker and of the embedded server (seconds)
            on_result(result)
        shown.append(result)
        return result

    async def with_worker(url: str, timeout: float | None):
        # no runtime export nor A/B decision: they would outlive the command (the real worker does them); a failed
        # job is no error to log: the command prints its question's reason
        worker = Worker(settings.model_copy(update={"kinds": (kind,)}), url, rollout=False, failures_are_errors=False)
        # Ctrl-C, SIGTERM: the answer (the statement) being generated is left to the next worker, not waited for
        worker.handlers[kind].stop_abandons = True  # type: ignore[attr-defined]
        started, errors, settled, answered = _Started(), [], anyio.Event(), []

        async def serving() -> None:
            try:
                await worker.run(task_status=started, handle_signals=False)
            except Exception as exc:  # noqa: BLE001 - raised as itself below, not in the ExceptionGroup
                errors.append(_WorkerFailed(exc, started.event.is_set()))
                # the question's INSERT in flight ends first (settled): it is asked or not, whatever the race of the
                # worker's start with it, and the command says which
                await settled.wait()
                tg.cancel_scope.cancel()

        with contextlib.ExitStack() as stopping:
            async with anyio.create_task_group() as tg:
                tg.start_soon(serving)
                try:
                    # asked while the worker starts, which then takes the question: the timeout counts the start too
                    answered.append(await go(url, timeout, settled))
                except AnswerTimeout as exc:
                    errors.append(exc if exc.question_id is None or started.event.is_set()
                                  else _NotStarted(exc.question_id))
                except Exception as exc:  # noqa: BLE001 - raised as itself below, not in the ExceptionGroup
                    errors.append(exc)
                finally:
                    settled.set()  # ended before its INSERT, if it never made one
                    # the stop cancels its queries in flight (maintenance's): psycopg's warnings of them ("query
                    # cancellation interrupted", "discarding closed connection") are no news to the asker
                    stopping.enter_context(libraries_at_debug("psycopg", "psycopg.pool"))
                    worker.request_stop()
        if answered:  # printed (on_result): a failure of the worker at its stop is the worker's, not the question's
            for failed in errors:
                log.warning("own_worker_stop_failed", what=what, id=asking[0].asked_id,
                            error=" ".join(str(failed.cause).split()) or type(failed.cause).__name__)
            return answered[0]
        if errors:
            raise errors[0]

    try:
        with _sigterm_interrupts() as terminable:
            return _asked_on(settings, kind, what, timeout, asking, go, with_worker, migrate, terminable)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (Terminated)
        if shown:  # after the answer was shown (the in-process worker or the embedded server stopping): it is done
            return shown[0]
        raise


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[bool]:
    """A SIGTERM raises :class:`Terminated` in the block, as a Ctrl-C raises KeyboardInterrupt (the embedded server
    stopped on the way out, not killed with the process); yields whether it does: in the main thread, where SIGTERM
    has its default action (a program that calls :func:`ask` keeps its own handler)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield False
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _asked_on(settings: Settings, kind: str, what: str, timeout: float, asking: list[Client], go, with_worker,
              migrate: bool, terminable: bool):
    """_answered's database: started (the embedded one), migrated as told, then ``go`` (a worker runs on it) or
    ``with_worker`` asks; with ``terminable``, a SIGTERM meanwhile stops the asking as a Ctrl-C does
    (:class:`Terminated`)."""
    with Database(settings) as db:
        # the embedded server is pgsynapse's own (the README's first ask migrates it); a DATABASE_URL database is
        # migrated by its owner (`pgsynapse migrate`), or when asked to (--migrate), as by every one-shot command
        if done := ensure_schema(db, apply=migrate or settings.embedded):  # said at `ask`'s level: schema changed
            log.warning("schema_migrated_before_asking", applied=done)
        with db.connect() as conn:
            running = worker_takes(conn, kind)
            if kind == "answer":
                if not conn.execute(q("documents_stored", "ops.sql")).fetchone()["stored"]:
                    log.warning("no_documents", hint="answers come from the documents: add some (`pgsynapse ingest "
                                "PATH`, or INSERT INTO pgsynapse.documents) and run `pgsynapse run` to embed them")
                elif not running:
                    # the worker started here only answers: documents waiting for their embed job stay unsearched
                    waiting = conn.execute(q("documents_waiting", "ops.sql")).fetchone()["n"]
                    if waiting:
                        # a worker starting (its first start's export) is not taken to answer: it may run other kinds
                        # (run --kinds embed); ask's own worker answers, once that export ends
                        then = ("one is starting (it exports a model version to its runtime first, minutes on a small "
                                "host: `pgsynapse status`)" if worker_starting(conn) else "start `pgsynapse run`")
                        log.warning("documents_not_embedded", n=waiting,
                                    hint=f"they are not searched until a worker embeds them: {then}")
        terminated: list[int] = []
        try:
            answered = anyio.run(_until_sigterm if terminable else _plain, go if running else with_worker, db.url,
                                 timeout or None, terminated)
            if terminable:  # the event loop's SIGTERM handler, gone with it, left SIGTERM's default action
                signal.signal(signal.SIGTERM, _raise_terminated)
            if terminated:
                raise Terminated()
            return answered
        except _WorkerFailed as failed:
            if (qid := asking[0].asked_id if asking else None) is None:  # not asked: the worker's reason alone
                raise failed.cause from None
            raise _left_pending(failed, what, qid) from failed.cause
        except _NotStarted as exc:
            (columns, _), qid = LATER[what], exc.question_id
            with db.connect() as conn:
                export = starting_export(conn)
            select = f"SELECT {columns} FROM pgsynapse.{TABLES[what]} WHERE id = {qid}"
            exporting = a_worker_starts(export)
            by_command = (f"{EXPORT_COMMAND}'s export of {exported_version(export)}"
                          if exporting and export["by"] == "command" else None)
            raise AnswerTimeout(not_started(what, qid, kind, timeout, select, exporting=exporting,
                                            by_command=by_command), qid, no_worker=kind) from None
        except AnswerTimeout as exc:
            if exc.question_id is None:  # not asked: its INSERT waited past the timeout
                raise
            (columns, get), qid = LATER[what], exc.question_id
            select = f"SELECT {columns} FROM pgsynapse.{TABLES[what]} WHERE id = {qid}"
            if exc.unreachable or exc.no_worker:  # the Client's reason, with the SQL that reads the answer later
                message = no_answer(what, qid, timeout, get, unreachable=exc.unreachable, no_worker=exc.no_worker,
                                    later=select)
            else:
                message = (f"no answer to {what} {qid} within {timeout:g}s: the worker answering {what}s may be "
                           "slower than that, busy or stuck (pgsynapse status); the answer is still written to its "
                           f"row when it comes: {select}")
            raise AnswerTimeout(message, qid, unreachable=exc.unreachable, no_worker=exc.no_worker) from None


async def _until_sigterm(run: Callable[[str, float | None], Awaitable[Any]], url: str, limit: float | None,
                         terminated: list[int]) -> Any:
    """``run(url, limit)``, cancelled by a SIGTERM (``terminated`` then holds it) as the asyncio runner cancels it at a
    Ctrl-C: the command's own worker gives its job back at once (not left to its lease), the asking ends."""
    results: list[Any] = []
    failed: list[Exception] = []  # raised as itself below, not in the task group's ExceptionGroup

    async def watch(*, task_status: TaskStatus) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                terminated.append(signum)
                tg.cancel_scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        await tg.start(watch)
        try:
            results.append(await run(url, limit))
        except Exception as exc:  # noqa: BLE001 - raised below
            failed.append(exc)
        tg.cancel_scope.cancel()
    if failed:
        raise failed[0]
    return results[0] if results else None


async def _plain(run: Callable[[str, float | None], Awaitable[Any]], url: str, limit: float | None,
                 terminated: list[int]) -> Any:
    """``run(url, limit)``: SIGTERM left as the caller has it."""
    return await run(url, limit)
