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

import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg
from psycopg.rows import dict_row

from pgsynapse.config import conninfo_problem
from pgsynapse.db import NO_PREPARE
from pgsynapse.errors import ConfigError, InputError, PgsynapseError
from pgsynapse.feedback import Feedback, feedback_params
from pgsynapse.queries import q

FILE = "client.sql"
ANSWERS_CHANNEL = "pgsynapse_answers"
DATA_ANSWERS_CHANNEL = "pgsynapse_data_answers"


class AnswerTimeout(PgsynapseError):
    """No answer arrived in time: is a worker running (`pgsynapse run`)?"""


def require_text(text: str) -> None:
    """A question must say something: an empty or blank one is refused here, before its row (written by SQL, the
    questions table's ``questions_text_not_empty`` refuses an empty one, and the handlers fail a blank one)."""
    if not text or not text.strip():
        raise InputError("the question is empty: ask something")


@dataclass(frozen=True)
class Result:
    id: int
    status: str
    answer: str | None
    sources: list[dict[str, Any]]
    model_version_id: int | None
    latency_ms: float | None
    error: str | None
    guardrail: dict[str, Any] | None
    session_id: str | None
    flags: list[str] = field(default_factory=list)  # what the answer's checks found (questions.flags)
    cached_from: int | None = None  # answered from the semantic answer cache: the original question's id


@dataclass(frozen=True)
class DataResult:
    """A question about the data, answered: ``status`` answered (columns and rows), refused (the statement was
    not run) or failed; ``sql`` the statement generated; ``error`` why it was refused or failed."""

    id: int
    status: str
    sql: str | None
    columns: list[dict[str, str]]
    rows: list[list[Any]]
    row_count: int | None
    truncated: bool
    error: str | None
    sql_model_id: int | None
    latency_ms: float | None
    session_id: str | None


class Client:
    """One LISTENing connection. Several tasks may ``ask`` on one client at once: they share the connection,
    and whichever task reads an answer's NOTIFY hands it to the task that asked.

    ``listen_url``: a direct (or session-pooled) URL for the LISTEN when ``url`` goes through PgBouncer in
    transaction mode; the questions are then inserted and read on ``url`` and only the LISTEN uses it."""

    def __init__(self, url: str, *, listen_url: str | None = None) -> None:
        for name, value in (("url", url), ("listen_url", listen_url)):
            if value and (why := conninfo_problem(value)):
                raise ConfigError(f"Client {name}: {why}")
        self.url = url
        self.listen_url = listen_url or url
        self._conn: psycopg.AsyncConnection | None = None  # inserts and reads
        self._listen: psycopg.AsyncConnection | None = None  # LISTEN (the same connection without a listen_url)
        self._lock = anyio.Lock()
        # (channel, id) of the questions asked on this client and not answered yet: questions and data questions
        # have their own ids and channels
        self._waiting: set[tuple[str, int]] = set()
        # of those, the announcements (NOTIFY payloads) read on their channel and not yet collected by their asker
        self._arrived: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self._listening_data = False
        self.recheck_seconds = 5.0  # safety net only: a re-read of the row when no NOTIFY came in this long

    async def __aenter__(self) -> Client:
        # no prepared statements: ``url`` may be a transaction pooler (db.NO_PREPARE)
        self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, row_factory=dict_row,
                                                           **NO_PREPARE)
        if self.listen_url == self.url:
            self._listen = self._conn
        else:
            self._listen = await psycopg.AsyncConnection.connect(self.listen_url, autocommit=True, **NO_PREPARE)
        # LISTEN is up before any question is inserted: its NOTIFY cannot be missed
        await self._listen.execute(f"LISTEN {ANSWERS_CHANNEL}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._listen is not None and self._listen is not self._conn:
            await self._listen.close()
        if self._conn is not None:
            await self._conn.close()

    async def ask(self, text: str, *, session_id: str | None = None, timeout: float = 120.0,
                  on_delta: Callable[[str], None] | None = None) -> Result:
        """Ask and wait for the final answer; ``on_delta(piece)`` gets the answer's pieces as they are generated
        (generative answerers with ``stream_answers``; the extractive answer arrives whole, in the Result)."""
        async for item in self.stream(text, session_id=session_id, timeout=timeout):
            if isinstance(item, Result):
                return item
            if on_delta is not None:
                on_delta(item)
        raise AssertionError("stream() ends with its Result")  # pragma: no cover

    async def stream(self, text: str, *, session_id: str | None = None,
                     timeout: float = 120.0) -> AsyncIterator[str | Result]:
        """Ask; yield the answer's pieces (str) as the worker streams them, then the final :class:`Result`.

        The pieces concatenate to the streamed text. A piece missed or too big for its NOTIFY is read from the
        row. When a stream starts again (a retry after a worker crash, an edit of the question), pieces that do
        not continue what was yielded are not yielded: the final Result's answer is the answer."""
        assert self._conn is not None, "use `async with Client(url) as client`"
        require_text(text)
        async with self._lock:
            # LISTEN is already up: the NOTIFY cannot be missed, it is sent on the worker's commit
            row = await (await self._conn.execute(q("ask", FILE), {"session": session_id, "text": text})).fetchone()
        qid = row["id"]
        key = (ANSWERS_CHANNEL, qid)
        self._waiting.add(key)
        received, restarted = "", False
        # no cancel scope is held across a yield (the consumer runs between pieces): each wait gets what is left
        deadline = anyio.current_time() + timeout if timeout else math.inf
        try:
            check = True
            while True:
                for p in self._arrived.pop(key, []):
                    if p.get("status") != "streaming":
                        check = True
                        continue
                    restarted = restarted or (p.get("seq") == 1 and bool(received))
                    if restarted:
                        continue  # a new attempt: only the final Result counts now
                    if p.get("offset") == len(received) and isinstance(p.get("delta"), str):
                        received += p["delta"]
                        yield p["delta"]
                    elif p.get("offset", 0) >= len(received):
                        check = True  # a piece missed, or too big for a NOTIFY: the row has it
                if check:
                    with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                        result = await self._read(qid)
                    now = result.answer or ""
                    # what was written after the last piece's NOTIFY (throttled, or the final write itself); an answer
                    # that was never streamed (extractive, stream_answers off) arrives whole, in the Result only
                    streamed = bool(received) or result.status == "pending"
                    if streamed and not restarted and len(now) > len(received) and now.startswith(received):
                        piece, received = now[len(received):], now
                        yield piece
                    if result.status != "pending":
                        yield result
                        return
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    check = await self._wait_one(key)
        except TimeoutError:
            raise AnswerTimeout(f"no answer to question {qid} within {timeout:g}s: is `pgsynapse run` running?") from None
        finally:
            self._waiting.discard(key)
            self._arrived.pop(key, None)

    async def ask_data(self, text: str, *, session_id: str | None = None, schema: str = "public",
                       tables: list[str] | None = None, timeout: float = 120.0) -> DataResult:
        """Ask a question about the data (``pgsynapse.data_questions``) and wait for its statement and result.

        ``schema``: where its tables are; ``tables``: the ones it may read (None: every table of ``schema`` the
        reader role may read). The answer's NOTIFY comes on ``pgsynapse_data_answers``."""
        assert self._conn is not None, "use `async with Client(url) as client`"
        require_text(text)
        async with self._lock:
            if not self._listening_data:
                await self._listen.execute(f"LISTEN {DATA_ANSWERS_CHANNEL}")
                self._listening_data = True
            row = await (await self._conn.execute(q("ask_data", FILE), {"session": session_id, "text": text,
                                                                        "schema": schema, "tables": tables})).fetchone()
        key = (DATA_ANSWERS_CHANNEL, row["id"])
        self._waiting.add(key)
        try:
            with anyio.fail_after(timeout):
                while True:
                    self._arrived.pop(key, None)
                    async with self._lock:
                        r = await (await self._conn.execute(q("data_answer", FILE), {"id": key[1]})).fetchone()
                    if r["status"] != "pending":
                        res = r["result"] or {}
                        return DataResult(r["id"], r["status"], r["sql"], res.get("columns", []), res.get("rows", []),
                                          r["row_count"], bool(r["truncated"]), r["error"], r["sql_model_id"],
                                          r["latency_ms"], r["session_id"])
                    await self._wait_one(key)
        except TimeoutError:
            raise AnswerTimeout(f"no answer to data question {key[1]} within {timeout:g}s: is `pgsynapse run` "
                                "running?") from None
        finally:
            self._waiting.discard(key)
            self._arrived.pop(key, None)

    async def feedback(self, question_id: int, *, helpful: bool | None = None, rating: int | None = None,
                       source: int | None = None, comment: str | None = None) -> Feedback:
        """Say whether an answer helped (``helpful``) or rate it (``rating``, 1 to 5), and which of its cited
        passages answered it (``source``: the rank [n] it was cited with). The row is the one an application
        would INSERT (docs/sql.md); the retrain learns from it (docs/learning.md)."""
        assert self._conn is not None, "use `async with Client(url) as client`"
        async with self._lock:
            row = await (await self._conn.execute(q("question_for_feedback", "answers.sql"),
                                                  {"question": question_id})).fetchone()
            params = feedback_params(question_id, row, helpful=helpful, rating=rating, source=source, comment=comment)
            written = await (await self._conn.execute(q("insert_feedback", "answers.sql"), params)).fetchone()
        return Feedback(written["id"], question_id, helpful, rating, params["chunk"])

    async def _wait_one(self, key: tuple[str, int]) -> bool:
        """Wait for the next NOTIFYs and keep each for the asker of its question (asks on this client share one
        connection: whoever reads an announcement keeps it for its asker). True when none came within
        ``recheck_seconds`` (the caller then re-reads its row: a safety net, not the way answers arrive)."""
        assert self._listen is not None
        async with self._lock:
            if key in self._arrived:
                return False
            # every notification of the packet: psycopg reads them together and yields them all before it stops
            # after one; leaving the generator at the first dropped the others (another asker's answer)
            received = [n async for n in self._listen.notifies(timeout=self.recheck_seconds, stop_after=1)]
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

    async def _read(self, qid: int) -> Result:
        assert self._conn is not None
        async with self._lock:
            r = await (await self._conn.execute(q("answer", FILE), {"id": qid})).fetchone()
        return Result(r["id"], r["status"], r["answer"], r["sources"] or [], r["model_version_id"], r["latency_ms"],
                      r["error"], r["guardrail"], r["session_id"], list(r["flags"] or []), r["cached_from"])


def format_result(result: Result, *, answer: bool = True) -> str:
    """The answer (unless ``answer=False``: already printed as it streamed), flags, guardrail, sources, latency."""
    lines = [result.answer or f"({result.status}: {result.error or 'no answer'})"] if answer else []
    if result.flags:
        lines.append(f"flags: {'; '.join(result.flags)}")
    if result.guardrail:
        g = result.guardrail
        lines.append(f"guardrail: {g['action']} by rule {g['rule_id']} ({g['stage']}, similarity {g['similarity']})")
    for s in result.sources:
        where = s.get("source") or f"document {s['document_id']}"
        lines.append(f"  [{s['rank']}] {s['score']:.3f}  {s.get('title') or ''}  ({where}, chunk {s['chunk_id']})")
        for im in s.get("images") or []:  # images linked to the cited document
            lines.append(f"       image {im['image_id']}: {im.get('caption') or im.get('source') or ''}"
                         f" ({im.get('width')}x{im.get('height')} {im.get('mime_type') or ''})")
    if result.latency_ms is not None and result.status != "answered":  # refused by no model, or failed
        lines.append(f"  {result.status} in {result.latency_ms:.0f} ms (question {result.id})")
    elif result.latency_ms is not None:
        by = (f"from the answer cache (question {result.cached_from})" if result.cached_from is not None
              else f"by model version {result.model_version_id}")
        lines.append(f"  answered in {result.latency_ms:.0f} ms {by} (question {result.id})")
    return "\n".join(lines)
