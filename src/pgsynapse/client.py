"""Asking from Python: insert a question, wait for its answer's NOTIFY (never polling), read the row.

    async with Client(url) as client:
        result = await client.ask("how do I create an index?", session_id="alice")
        print(result.answer, result.sources)

A generative answerer streams: ``ask(..., on_delta=print_piece)`` calls ``on_delta`` with each new piece of the
answer as the worker writes it (``streaming`` NOTIFYs, docs/sql.md), or iterate:

        async for item in client.stream("how do I create an index?"):
            if isinstance(item, str):
                print(item, end="", flush=True)  # a piece of the answer, as it is generated
            else:
                result = item  # the final Result, last
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from pgsynapse import results
from pgsynapse.config import Settings, conninfo_problem
from pgsynapse.db import (NO_PREPARE, SCHEMA_ERRORS, connection_broken, connection_error, connection_lost,
                          describe_db_error, tcp_params, tcp_settings_from_env, workers_take)
from pgsynapse.errors import ConfigError, DatabaseConfigError, DatabaseError, InputError, PgsynapseError
from pgsynapse.feedback import Feedback, feedback_params
from pgsynapse.logs import get_logger
from pgsynapse.pooler import say_if_client_listen_pooled
from pgsynapse.queries import q
from pgsynapse.results import (AnswerTimeout, ClientTimeout, DataResult, OutcomeUnknown, QuestionDeleted, Result,
                               UnknownQuestion, format_result, require_session, require_text)

FILE = "client.sql"
ANSWERS_CHANNEL = "pgsynapse_answers"
DATA_ANSWERS_CHANNEL = "pgsynapse_data_answers"
CHANNELS = (ANSWERS_CHANNEL, DATA_ANSWERS_CHANNEL)
TABLES = {"question": "questions", "data question": "data_questions", "feedback": "feedback"}  # what an INSERT writes
# a question whose answer is still to come: the columns of its row (in TABLES) the answer is written to when it
# comes, and the Client's method that waits for it again; the Client's and the CLI's AnswerTimeout say them
LATER = {"question": ("status, answer", "result"), "data question": ("status, sql, error", "data_result")}
APPLICATION_NAME = "pgsynapse-client"  # unless the URL names the application
# the margin past its deadline of the client's own bound on an INSERT: PostgreSQL's statement_timeout ends it first
WRITE_GRACE = 5.0
BACKOFF = (0.1, 0.2, 0.5, 1.0, 2.0)  # seconds before each new attempt to connect again, the last one repeated
WORKER_CHECK_SECONDS = 1.0  # a timeout's look for a running worker that takes the question (ops.sql's)

log = get_logger(__name__)

# what applications import from here (defined in pgsynapse.results)
__all__ = ["AnswerTimeout", "Client", "ClientTimeout", "DataResult", "OutcomeUnknown", "QuestionDeleted", "Result",
           "UnknownQuestion", "format_result", "require_text"]


def _deadline(timeout: float | None) -> float:
    """When a call with ``timeout`` (seconds, None: no limit) must end."""
    if timeout is None:
        return math.inf
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InputError(f"timeout={timeout!r}: give a number of seconds above 0, or None to wait for ever")
    return anyio.current_time() + timeout


def _left(deadline: float) -> float:
    return max(0.0, deadline - anyio.current_time())


class Client:
    """Two connections: one for statements (inserts and reads), one that LISTENs. Several tasks may ``ask`` on one
    client at once: their statements take turns on the first (never waiting for a task that waits for an answer),
    and whichever task reads an answer's NOTIFY on the second hands it to the task that asked.

    ``listen_url``: a direct (or session-pooled) URL for the LISTEN when ``url`` goes through PgBouncer in
    transaction mode; the questions are then inserted and read on ``url`` and only the LISTEN uses it.

    Timeouts (``timeout``, seconds; None: no limit) bound the whole call, the INSERT included: a statement still
    running when it runs out is cancelled. A question asked whose answer did not come in time raises
    :class:`AnswerTimeout` with its ``question_id``: :meth:`result` gets the answer later.

    ``settings``: where its connections' TCP keepalives and ``tcp_user_timeout`` come from
    (:func:`pgsynapse.db.tcp_params`, the worker's); None: the ``PGSYNAPSE_KEEPALIVES_*`` and
    ``PGSYNAPSE_TCP_USER_TIMEOUT_MS`` variables, as a worker reads them (:func:`pgsynapse.db.tcp_settings_from_env`;
    a bad value raises :class:`ConfigError` here), else their defaults. A value in the URL wins over both.

    Lost connections (a PostgreSQL restart, a terminated backend, a network cut noticed by those TCP options): the
    next call connects again, and a call waiting for an answer connects again with a short backoff within its
    timeout, LISTENs again and re-reads the rows it waits for (NOTIFYs sent while none listened are lost); a timeout
    that runs out meanwhile says why it could not connect. A read is run again on the new connection; an INSERT is
    not (it may have committed): it raises :class:`OutcomeUnknown`."""

    def __init__(self, url: str, *, listen_url: str | None = None, settings: Settings | None = None) -> None:
        for name, value in (("url", url), ("listen_url", listen_url)):
            if value and (why := conninfo_problem(value)):
                raise ConfigError(f"Client {name}: {why}")
        self.url = url
        self.listen_url = listen_url or url
        self._listen_url_given = listen_url is not None  # else its LISTEN is checked for a pooler (pooler.py)
        self._tcp_settings = settings if settings is not None else tcp_settings_from_env()
        self._open = False
        self._conn: psycopg.AsyncConnection | None = None  # inserts and reads, under _statement_lock
        self._listen: psycopg.AsyncConnection | None = None  # LISTEN, read by one waiting task at a time
        self._statement_lock = anyio.Lock()
        self._listen_lock = anyio.Lock()
        # (channel, id) of the questions asked on this client and not answered yet: questions and data questions
        # have their own ids and channels
        self._waiting: set[tuple[str, int]] = set()
        # of those, the announcements (NOTIFY payloads) read on their channel and not yet collected by their asker
        self._arrived: dict[tuple[str, int], list[dict[str, Any]]] = {}
        # the connections being made again ("statements", "listen"): why the last try failed, for a timeout's message
        self._unreachable: dict[str, str] = {}
        self.recheck_seconds = 5.0  # safety net only: a re-read of the row when no NOTIFY came in this long
        # the id of the last question (or data question) this client inserted; ``asked``, when given, is set as each
        # INSERT ends, written or not (`pgsynapse ask`'s own worker, failed to start, waits for it: app.py)
        self.asked_id: int | None = None
        self.asked: anyio.Event | None = None

    async def __aenter__(self) -> Client:
        if self._open:
            raise PgsynapseError("this Client is already open: enter `async with client` once at a time")
        self._open = True
        try:
            self._conn = await self._connect(self.url, row_factory=dict_row)
            # LISTEN is up before any question is inserted: its NOTIFY cannot be missed
            self._listen = await self._connect_listen()
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        conns, self._conn, self._listen = (self._conn, self._listen), None, None
        self._open = False
        self._waiting.clear()
        self._arrived.clear()
        for conn in conns:
            if conn is not None:
                await conn.close()

    def _require_open(self) -> None:
        if not self._open:
            raise PgsynapseError("this Client is not open: use `async with Client(url) as client`")

    async def _connect(self, url: str, **kw: Any) -> psycopg.AsyncConnection:
        # no prepared statements: ``url`` may be a transaction pooler (db.NO_PREPARE); the worker's TCP options
        extra: dict[str, object] = {**NO_PREPARE, **tcp_params(url, self._tcp_settings)}
        if "application_name" not in conninfo_to_dict(url):
            extra["application_name"] = APPLICATION_NAME
        try:
            return await psycopg.AsyncConnection.connect(url, autocommit=True, **extra, **kw)
        except psycopg.OperationalError as exc:
            raise connection_error(exc, url) from exc

    async def _connect_listen(self) -> psycopg.AsyncConnection:
        conn = await self._connect(self.listen_url)
        try:
            for channel in CHANNELS:  # both from the start: a LISTEN later would wait for the task reading it
                await conn.execute(f"LISTEN {channel}")
            if not self._listen_url_given:
                await say_if_client_listen_pooled(conn, self.listen_url, self.recheck_seconds)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _reconnect(self, which: str, connect: Callable[[], Awaitable[psycopg.AsyncConnection]], *,
                         deadline: float = math.inf, wait: bool = True) -> psycopg.AsyncConnection:
        """``connect()`` until it succeeds, after a short backoff each time, until ``deadline`` (then TimeoutError);
        ``wait=False``: once, its failure raised. Why the last try failed stays in ``_unreachable`` until one
        succeeds, for a timeout's message. A login refused (:class:`DatabaseConfigError`) is raised: waiting will not
        fix it; so is a Client closed meanwhile (the new connection closed)."""
        self._unreachable.setdefault(which, "connecting to PostgreSQL again (the connection was lost)")
        for attempt in itertools.count(1):
            try:
                conn = await connect()
            except DatabaseConfigError:
                raise
            except (DatabaseError, psycopg.OperationalError) as exc:
                self._unreachable[which] = str(exc)
                log.warning("client_reconnect_failed", connection=which, attempt=attempt, error=str(exc)[:200])
                if not wait:
                    raise
                if _left(deadline) <= 0:
                    raise TimeoutError from exc
                await anyio.sleep(min(BACKOFF[min(attempt, len(BACKOFF)) - 1], _left(deadline)))
            else:
                self._unreachable.pop(which, None)
                if not self._open:  # closed meanwhile
                    await conn.close()
                    self._require_open()
                log.info("client_reconnected", connection=which, attempts=attempt)
                return conn
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetch(self, name: str, params: dict[str, Any], *, file: str = FILE, writes: str | None = None,
                     deadline: float = math.inf, wait: bool = True) -> dict[str, Any] | None:
        """Run one statement on the statement connection, connected again first when it was lost (until ``deadline``,
        then TimeoutError; ``wait=False``: one try, its error raised); its row. A read whose connection is lost while
        it runs is run again on a new one. A write (``writes``: what it writes) is not: it may have committed, and it
        raises :class:`OutcomeUnknown`; PostgreSQL cancels a write still running at ``deadline`` (its
        ``statement_timeout``, in the write's transaction: a cancel from here could come after the commit), and it
        raises TimeoutError: nothing was written. The caller bounds the rest."""
        async with self._statement_lock:
            while True:
                self._require_open()
                if self._conn is None or connection_lost(self._conn):
                    if self._conn is not None:
                        await self._conn.close()
                    self._conn = None
                    self._conn = await self._reconnect("statements",
                                                       lambda: self._connect(self.url, row_factory=dict_row),
                                                       deadline=deadline, wait=wait)
                conn = self._conn
                try:
                    if writes is None or deadline == math.inf:
                        return await (await conn.execute(q(name, file), params)).fetchone()
                    if (ms := math.ceil(_left(deadline) * 1000)) <= 0:
                        raise TimeoutError
                    async with conn.transaction():
                        await conn.execute(q("local_statement_timeout", FILE), {"timeout": f"{ms}ms"})
                        return await (await conn.execute(q(name, file), params)).fetchone()
                except SCHEMA_ERRORS as exc:
                    raise DatabaseError(f"the database has no pgsynapse schema, or an older one than this release "
                                        f"({describe_db_error(exc)}): run `pgsynapse migrate` on it") from exc
                except psycopg.errors.QueryCanceled:
                    if writes is None or deadline == math.inf:
                        raise
                    raise TimeoutError from None
                except psycopg.OperationalError as exc:
                    if not connection_broken(conn):
                        raise
                    if writes is not None:
                        raise OutcomeUnknown(
                            f"the connection to PostgreSQL was lost while the {writes} was inserted: it may or may not "
                            f"have been saved, and it is not sent again; look for it (pgsynapse.{TABLES[writes]}, "
                            "the newest rows) before sending it again, or send it again if a duplicate does no harm"
                        ) from exc
                    log.warning("client_connection_lost", connection="statements", error=str(exc)[:200])

    async def ask(self, text: str, *, session_id: str | None = None, timeout: float | None = 120.0,
                  on_delta: Callable[[str], None | Awaitable[None]] | None = None) -> Result:
        """Ask and wait for the final answer; ``on_delta(piece)`` (or an async function: awaited) gets the answer's
        pieces as they are generated (generative answerers with ``stream_answers``; the extractive answer arrives
        whole, in the Result). ``timeout``: seconds for the whole call (None: no limit), else :class:`AnswerTimeout`."""
        async for item in self.stream(text, session_id=session_id, timeout=timeout):
            if isinstance(item, Result):
                return item
            if on_delta is not None and inspect.isawaitable(done := on_delta(item)):
                await done
        raise AssertionError("stream() ends with its Result")  # pragma: no cover

    async def stream(self, text: str, *, session_id: str | None = None,
                     timeout: float | None = 120.0) -> AsyncIterator[str | Result]:
        """Ask; yield the answer's pieces (str) as the worker streams them, then the final :class:`Result`.

        The pieces concatenate to the streamed text, read from the row at each ``streaming`` NOTIFY (a payload's
        ``delta`` is not taken: any role that may connect can send one). When a stream starts again (a retry after a
        worker crash, an edit of the question), text that does not continue what was yielded is not yielded, nor is
        a final answer that replaces the stream (blocked, failed, refused): the final Result's answer is the answer."""
        self._require_open()
        require_text(text)
        require_session(session_id)
        deadline = _deadline(timeout)
        # LISTEN is already up: the NOTIFY cannot be missed, it is sent on the worker's commit
        row = await self._ask_row("ask", {"session": session_id, "text": text}, "question", deadline, timeout)
        async for item in self._follow(row["id"], deadline, timeout):
            yield item

    async def _ask_row(self, name: str, params: dict[str, Any], what: str, deadline: float,
                       timeout: float | None) -> dict[str, Any]:
        """INSERT a question (``what``: "question", "data question") within ``deadline``; its row."""
        allowed = _left(deadline)
        try:
            with anyio.fail_after(allowed + WRITE_GRACE):
                row = await self._fetch(name, params, writes=what, deadline=deadline)
            assert row is not None  # INSERT ... RETURNING
            self.asked_id = row["id"]
        except TimeoutError:
            why = results.not_written(self._unreachable.get("statements"),
                                      results.insert_cancelled(TABLES[what], allowed))
            raise AnswerTimeout(f"the {what} was not asked within {timeout:g}s: {why}") from None
        finally:
            if self.asked is not None:
                self.asked.set()
        return row

    async def result(self, question_id: int, *, timeout: float | None = 120.0) -> Result:
        """The :class:`Result` of question ``question_id`` (an :class:`AnswerTimeout`'s ``question_id``, a row an
        application inserted itself), waiting while it is pending: up to ``timeout`` seconds (None: no limit),
        else :class:`AnswerTimeout`; ``timeout=0``: no waiting, the row as it is (status pending included), for a
        connection either (PostgreSQL out of reach raises its :class:`DatabaseError`)."""
        self._require_open()
        results.require_id(question_id)
        if timeout == 0:  # no waiting, for a connection either
            return await self._read(question_id, asked=False, wait=False)
        async for item in self._follow(question_id, _deadline(timeout), timeout, asked=False):
            if isinstance(item, Result):
                return item
        raise AssertionError("_follow() ends with its Result")  # pragma: no cover

    async def _follow(self, qid: int, deadline: float, timeout: float | None, *,
                      asked: bool = True) -> AsyncIterator[str | Result]:
        """The pieces of question ``qid``'s answer, then its final Result (:meth:`stream`). ``asked``: this Client
        inserted it (a row missing is then a row deleted)."""
        key = (ANSWERS_CHANNEL, qid)
        self._waiting.add(key)
        received = ""
        announced = False  # a `streaming` NOTIFY came: the answer is streamed, even when first read once final
        # no cancel scope is held across a yield (the consumer runs between pieces): each wait gets what is left
        try:
            check = True
            while True:
                # a NOTIFY is only a wake-up, its delta never a piece: NOTIFY needs no privilege, so any role that may
                # connect can send a `streaming` payload; the row, which only the worker's roles write, has the text
                arrived = self._arrived.pop(key, None)
                if arrived:
                    check = True
                    announced = announced or any(p.get("status") == "streaming" for p in arrived)
                if check:
                    with anyio.fail_after(_left(deadline)):
                        result = await self._read(qid, asked=asked)
                    asked = True  # read once: gone later, it was deleted
                    now = result.answer or ""
                    # the text written since the last read (all of it for a streamed answer first read final); one
                    # never streamed (extractive) arrives in the Result only; one that does not continue what was
                    # yielded (a retry after a crash, an edit) yields nothing, nor one that replaces it (blocked,
                    # refused, ...), even first read final: the final Result's answer is the answer
                    streamed = bool(received) or result.status == "pending" or announced
                    generated = result.status == "pending" or not results.replaces_stream(result)
                    if streamed and generated and len(now) > len(received) and now.startswith(received):
                        piece, received = now[len(received):], now
                        yield piece
                    if result.status != "pending":
                        yield result
                        return
                with anyio.fail_after(_left(deadline)):
                    check = await self._wait_one(key)
        except TimeoutError:
            raise await self._no_answer("question", qid, timeout) from None
        finally:
            self._waiting.discard(key)
            self._arrived.pop(key, None)

    async def ask_data(self, text: str, *, session_id: str | None = None, schema: str = "public",
                       tables: list[str] | tuple[str, ...] | None = None, timeout: float | None = 120.0) -> DataResult:
        """Ask a question about the data (``pgsynapse.data_questions``) and wait for its statement and result.

        ``schema``: where its tables are; ``tables``: the ones it may read (a list or tuple of names; None: every
        table of ``schema`` the reader role may read). The answer's NOTIFY comes on ``pgsynapse_data_answers``.
        ``timeout`` as in :meth:`ask`."""
        self._require_open()
        require_text(text)
        require_session(session_id)
        tables = results.require_target(schema, tables)
        deadline = _deadline(timeout)
        row = await self._ask_row("ask_data", {"session": session_id, "text": text, "schema": schema,
                                               "tables": tables}, "data question", deadline, timeout)
        return await self._data_result(row["id"], deadline, timeout)

    async def data_result(self, question_id: int, *, timeout: float | None = 120.0) -> DataResult:
        """:meth:`result` for a question about the data."""
        self._require_open()
        results.require_id(question_id)
        if timeout == 0:  # no waiting, for a connection either
            return results.data_result(await self._fetch_row("data_answer", question_id, "data question", asked=False,
                                                             wait=False))
        return await self._data_result(question_id, _deadline(timeout), timeout, asked=False)

    async def _data_result(self, qid: int, deadline: float, timeout: float | None, *,
                           asked: bool = True) -> DataResult:
        key = (DATA_ANSWERS_CHANNEL, qid)
        self._waiting.add(key)
        try:
            with anyio.fail_after(_left(deadline)):
                while True:
                    self._arrived.pop(key, None)
                    r = await self._fetch_row("data_answer", qid, "data question", asked=asked)
                    asked = True
                    if r["status"] != "pending":
                        return results.data_result(r)
                    await self._wait_one(key)
        except TimeoutError:
            raise await self._no_answer("data question", qid, timeout) from None
        finally:
            self._waiting.discard(key)
            self._arrived.pop(key, None)

    async def feedback(self, question_id: int, *, helpful: bool | None = None, rating: int | None = None,
                       source: int | None = None, comment: str | None = None,
                       timeout: float | None = 120.0) -> Feedback:
        """Say whether an answer helped (``helpful``) or rate it (``rating``, 1 to 5; both must agree: 4 and 5
        are helpful), and which of its cited passages answered it (``source``: the rank [n] it was cited with).
        The row is the one an application would INSERT (docs/sql.md); the retrain learns from it
        (docs/learning.md). ``timeout``: seconds for the whole call (None: no limit), else :class:`ClientTimeout`
        (the INSERT cancelled)."""
        self._require_open()
        results.require_id(question_id)
        deadline = _deadline(timeout)
        allowed = _left(deadline)
        try:
            with anyio.fail_after(allowed + WRITE_GRACE):
                row = await self._fetch("question_for_feedback", {"question": question_id}, file="answers.sql",
                                        deadline=deadline)
                params = feedback_params(question_id, row, helpful=helpful, rating=rating, source=source,
                                         comment=comment)
                written = await self._fetch("insert_feedback", params, file="answers.sql", writes="feedback",
                                            deadline=deadline)
        except TimeoutError:
            why = results.not_written(self._unreachable.get("statements"),
                                      results.insert_cancelled(TABLES["feedback"], allowed))
            raise ClientTimeout(f"the feedback on question {question_id} was not written within {timeout:g}s: "
                                f"{why}") from None
        assert written is not None  # INSERT ... RETURNING
        return Feedback(written["id"], question_id, helpful, rating, params["chunk"])

    async def _wait_one(self, key: tuple[str, int]) -> bool:
        """Wait for the next NOTIFYs and keep each for the asker of its question (asks on this client share one
        LISTEN connection: whoever reads an announcement keeps it for its asker). True when none came within
        ``recheck_seconds`` (the caller then re-reads its row: a safety net, not the way answers arrive). A lost
        LISTEN connection is connected again and every asker re-reads its row."""
        async with self._listen_lock:
            self._require_open()
            if key in self._arrived:
                return False
            conn = self._listen
            if conn is None or connection_broken(conn):
                await self._listen_again()
                return True
            try:
                # every notification of the packet: psycopg reads them together and yields them all before it stops
                # after one; leaving the generator at the first dropped the others (another asker's answer)
                received = [n async for n in conn.notifies(timeout=self.recheck_seconds, stop_after=1)]
            except psycopg.OperationalError as exc:
                if not connection_broken(conn):
                    raise
                log.warning("client_connection_lost", connection="listen", error=str(exc)[:200])
                await self._listen_again()
                return True
            recheck = not received
            for n in received:
                try:
                    payload = json.loads(n.payload)
                    announced = int(payload["id"])
                except (ValueError, KeyError, TypeError):
                    recheck = True  # not ours to read: the caller re-reads its row
                    continue
                if (n.channel, announced) in self._waiting:
                    self._arrived.setdefault((n.channel, announced), []).append(payload)
            return recheck

    async def _listen_again(self) -> None:
        """A new LISTEN connection (under ``_listen_lock``), then every asker re-reads its row: its answer may have
        been written meanwhile, and the NOTIFYs sent while none listened are lost."""
        if self._listen is not None:
            await self._listen.close()
        self._listen = None
        self._listen = await self._reconnect("listen", self._connect_listen)
        for waiting in self._waiting:
            self._arrived.setdefault(waiting, []).append({"status": "reconnected"})

    async def _fetch_row(self, name: str, qid: int, what: str, *, asked: bool = True,
                         wait: bool = True) -> dict[str, Any]:
        """Row ``qid`` (``what``: "question", "data question"); ``asked``: known to have been there (an id given by
        the application may never have been); ``wait``: as :meth:`_fetch`'s."""
        r = await self._fetch(name, {"id": qid}, wait=wait)
        if r is None and not asked:
            raise UnknownQuestion(f"there is no {what} {qid} (never asked, or deleted before this call)", qid)
        if r is None:
            raise QuestionDeleted(f"{what} {qid} was deleted while waiting for its answer", qid)
        return r

    async def _read(self, qid: int, *, asked: bool = True, wait: bool = True) -> Result:
        return results.result(await self._fetch_row("answer", qid, "question", asked=asked, wait=wait))

    async def _no_answer(self, what: str, qid: int, timeout: float | None) -> AnswerTimeout:
        """The AnswerTimeout (:func:`results.no_answer`): PostgreSQL out of reach, or no worker taking it."""
        kind, taken = ("answer" if what == "question" else "sql_answer"), True
        if unreachable := self._unreachable.get("statements") or self._unreachable.get("listen"):
            why = {"unreachable": unreachable}
        else:
            with anyio.move_on_after(WORKER_CHECK_SECONDS), contextlib.suppress(PgsynapseError, psycopg.Error):
                taken = workers_take(**await self._fetch("workers_answering", {"kind": kind}, file="ops.sql",
                                                         wait=False))
            why = {"no_worker": None if taken else kind}
        return AnswerTimeout(results.no_answer(what, qid, timeout, LATER[what][1], **why), qid, **why)
