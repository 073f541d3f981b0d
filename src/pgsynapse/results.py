"""What a :class:`pgsynapse.client.Client` call returns and raises, and how the CLI prints an answer.

Kept apart from the client's connection handling; ``pgsynapse.client`` re-exports every name, which is where
applications import them from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pgsynapse.errors import DatabaseError, InputError, PgsynapseError


class ClientTimeout(PgsynapseError, TimeoutError):
    """A :class:`Client` call ran out of its ``timeout``; a statement still running then was cancelled."""


class AnswerTimeout(ClientTimeout):
    """No final answer within the timeout. ``question_id``: the question's row, whose answer may still come (the
    worker slower than the timeout): :meth:`Client.result` fetches it later; None when the question's INSERT did not
    finish in time (it was cancelled: the question was not asked). Why no answer came, when the Client can tell:
    ``unreachable``, why it could not connect to PostgreSQL again; ``no_worker``, the kind of job no running worker
    takes (:func:`no_answer`)."""

    def __init__(self, message: str, question_id: int | None = None, *, unreachable: str | None = None,
                 no_worker: str | None = None) -> None:
        super().__init__(message)
        self.question_id = question_id
        self.unreachable = unreachable
        self.no_worker = no_worker


class OutcomeUnknown(DatabaseError):
    """The connection was lost while an INSERT ran: it may or may not have committed. The Client never sends it again
    (a second row, a second answer); the message says what to look for."""


class UnknownQuestion(InputError):
    """No question (or data question) has this id: never asked, or deleted before the call."""

    def __init__(self, message: str, question_id: int) -> None:
        super().__init__(message)
        self.question_id = question_id


class QuestionDeleted(PgsynapseError):
    """The question's row was deleted while its asker waited for its answer."""

    def __init__(self, message: str, question_id: int) -> None:
        super().__init__(message)
        self.question_id = question_id


def require_text(text: str) -> None:
    """A question must be text that PostgreSQL can store and that says something: refused here, before its row
    (written by SQL, the tables refuse one of white space, ``questions_text_not_empty`` and
    ``data_questions_text_not_empty``, and the handlers fail what gets past them). A bytes question was stored as its
    hex text and answered."""
    if not isinstance(text, str):
        hint = ": decode it first" if isinstance(text, (bytes, bytearray, memoryview)) else ""
        raise InputError(f"the question must be text (str), not {type(text).__name__}{hint}")
    if not text.strip():
        raise InputError("the question is empty: ask something")
    require_storable(text, "the question")


# a session id is indexed (questions_session, data_questions_session, the conversations key): PostgreSQL refuses an
# index entry over 2,704 bytes, which an id that does not compress reaches from about 2,680
MAX_SESSION_BYTES = 1000


def require_session(session_id: str | None) -> None:
    """A session id is None (no session) or text PostgreSQL can store: an int was stored as its digits, bytes as
    their hex text (a session no other turn of the conversation would name)."""
    if session_id is None:
        return
    if not isinstance(session_id, str):
        raise InputError(f"session_id must be text (str) or None, not {type(session_id).__name__}")
    require_storable(session_id, "session_id")
    size = len(session_id.encode("utf-8"))
    if size > MAX_SESSION_BYTES:  # the server's own error named a btree limit and exited as if it were unreachable
        raise InputError(f"session_id is {size:,} bytes long (UTF-8): at most {MAX_SESSION_BYTES:,}; a session id names a "
                         "conversation (a user or chat id), and PostgreSQL indexes it: use a shorter id, or a hash of "
                         "this one")


def require_target(schema: str, tables: list[str] | tuple[str, ...] | None) -> list[str] | None:
    """A data question's schema and tables (None: every table of the schema) are names: refused here, before its
    row (a str or a tuple of tables raised psycopg's "malformed array literal", a None schema its NotNullViolation);
    the tables as the list the row stores."""
    if not isinstance(schema, str):
        raise InputError(f"schema must be a schema name (str), not {type(schema).__name__}")
    if not schema.strip():
        raise InputError("schema is empty: name the schema of the tables (default: public)")
    require_storable(schema, "schema")
    if tables is None:
        return None
    if not isinstance(tables, (list, tuple)):
        example = f": tables=[{tables!r}]" if isinstance(tables, str) else ""
        raise InputError(f"tables must be a list of table names, not {type(tables).__name__}{example}")
    for i, name in enumerate(tables):
        if not isinstance(name, str):
            raise InputError(f"tables[{i}] must be a table name (str), not {type(name).__name__}")
        if not name.strip():
            raise InputError(f"tables[{i}] is empty: name a table")
        require_storable(name, f"tables[{i}]")
    return list(tables)


def require_id(question_id: int) -> None:
    """A question id is an int (a str raised psycopg's "invalid input syntax for type bigint")."""
    if isinstance(question_id, bool) or not isinstance(question_id, int):
        raise InputError(f"question_id must be an int, not {type(question_id).__name__}")


def require_storable(text: str, what: str) -> None:
    if (at := text.find("\x00")) >= 0:
        raise InputError(f"{what} holds a NUL character (\\x00, at {at}): PostgreSQL text cannot store it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by Python's surrogateescape (argv, a file)
            raise InputError(f"{what} is not valid text: byte 0x{code - 0xDC00:02x} at {exc.start} is not UTF-8 "
                             "(was it written in another encoding?)") from None
        raise InputError(f"{what} is not valid Unicode: a lone surrogate (\\u{code:04x}, at {exc.start})") from None


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
    not run), failed or blocked (a guardrail rule: no statement was generated); ``sql`` the statement generated;
    ``error`` why it was refused, failed or blocked; ``guardrail`` the rule that blocked or flagged it."""

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
    # when truncated, the limit that cut it: {"setting": "sql_max_rows" or "sql_max_result_bytes", "limit": its value}
    # (None on a row answered before pgsynapse recorded it)
    truncated_by: dict[str, Any] | None = None
    guardrail: dict[str, Any] | None = None


def data_result(r: dict[str, Any]) -> DataResult:
    """A DataResult from its row (client.sql's ``data_answer``)."""
    res = r["result"] or {}
    return DataResult(r["id"], r["status"], r["sql"], res.get("columns", []), res.get("rows", []), r["row_count"],
                      bool(r["truncated"]), r["error"], r["sql_model_id"], r["latency_ms"], r["session_id"],
                      res.get("truncated_by"), r.get("guardrail"))


def result(r: dict[str, Any]) -> Result:
    """A Result from its row (client.sql's ``answer``)."""
    return Result(r["id"], r["status"], r["answer"], r["sources"] or [], r["model_version_id"], r["latency_ms"],
                  r["error"], r["guardrail"], r["session_id"], list(r["flags"] or []), r["cached_from"])


# a final answer with one of these flags is not the generated text: it replaces what streamed (answerers/citations,
# answerers/fallback)
REPLACING_FLAGS = ("refused", "extractive_fallback")


def replaces_stream(r: Result) -> bool:
    """Whether final Result ``r``'s answer replaces what streamed rather than ends it: a question blocked or failed,
    an answer refused for its citations or replaced by the extractive one. Its answer is no piece of the stream."""
    return r.status != "answered" or any(f in REPLACING_FLAGS for f in r.flags)


# an INSERT cancelled at its deadline after waiting this long was held up (a lock, most likely); one given less time
# was given too little to run at all, and a lock is no more likely than a server busy for a moment
HELD_UP_SECONDS = 0.5


def insert_cancelled(table: str, allowed: float) -> str:
    """Why an INSERT into pgsynapse.``table`` cancelled at its deadline was not done, ``allowed`` seconds after it
    was sent: a timeout too short to insert anything, or a wait long enough to mean a lock."""
    if allowed < HELD_UP_SECONDS:
        return (f"the timeout was too short to even insert it (its INSERT had {allowed * 1000:.0f} ms): give a longer "
                "timeout")
    return f"its INSERT waited {allowed:.3g}s and was cancelled (a lock on pgsynapse.{table}?)"


def not_written(unreachable: str | None, waited: str) -> str:
    """Why a call's INSERT was not done within its timeout: PostgreSQL out of reach (``unreachable``, why the Client
    could not connect again), else what it ``waited`` for."""
    return f"{unreachable} (nothing was written)" if unreachable else waited


def no_answer(what: str, qid: int, timeout: float | None, get: str, *, unreachable: str | None = None,
              no_worker: str | None = None, later: str | None = None) -> str:
    """An :class:`AnswerTimeout`'s message, ``what``: "question", "data question", whose answer the Client's method
    ``get`` waits for again (``later``: another way to read it, the CLI's SELECT); why no answer came when the Client
    can tell: ``unreachable``, why it could not connect again; ``no_worker``, the kind of job no running worker
    takes."""
    later = later or f"`await client.{get}({qid})`"
    if unreachable:
        return (f"no answer to {what} {qid} within {timeout:g}s: {unreachable}; its answer can still come once "
                f"PostgreSQL is reachable: {later}")
    if no_worker:
        return (f"no answer to {what} {qid} within {timeout:g}s: no running worker takes {no_worker} jobs on this "
                f"database: start one (`pgsynapse run`; one started with PGSYNAPSE_KINDS takes only the kinds it "
                f"names); the {what} stays pending and is answered once one runs: {later}")
    return (f"no answer to {what} {qid} within {timeout:g}s: the worker may be slower than that (its answer can "
            f"still come: {later})")


def not_started(what: str, qid: int, kind: str, timeout: float, later: str, *, exporting: bool,
                by_command: str | None = None) -> str:
    """No answer to ``what`` ("question", "data question") ``qid`` within ``timeout`` seconds, the command's own
    worker for ``kind`` jobs still starting (``exporting``: it waits for another worker's export, a first start;
    or, ``by_command`` given, for that export by `pgsynapse model export --switch`: "`pgsynapse model export
    --switch`'s export of model version 3"); ``later``: how to read the answer once it comes."""
    why = ("it loads its models first" if not exporting else
           f"it waits for {by_command} to its runtime (minutes on a small host: `pgsynapse status`)" if by_command else
           "it waits for another worker's export of a model version to its runtime (a first start, minutes on a "
           "small host: `pgsynapse status`)")
    return (f"no answer to {what} {qid} within {timeout:g}s: no running worker takes {kind} jobs, and the one this "
            f"command started is still starting: {why}; give a longer --timeout (0: no limit), or ask once a worker "
            f"runs (`pgsynapse run`); the {what} stays pending and is answered once one that takes {kind} jobs "
            f"runs: {later}")


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
        lines.append(f"  [{s['rank']}] {s['score']:.3f}  {s.get('title') or ''}  ({where}, chunk id {s['chunk_id']})")
        for im in s.get("images") or []:  # images linked to the cited document
            lines.append(f"       image {im['image_id']}: {im.get('caption') or im.get('source') or ''}"
                         f" ({im.get('width')}x{im.get('height')} {im.get('mime_type') or ''})")
    if result.latency_ms is not None and result.status != "answered":  # refused by no model, or failed
        lines.append(f"  {result.status} in {result.latency_ms:.0f} ms (question {result.id})")
    elif result.latency_ms is not None:
        by = (f"from the answer cache (the answer of question {result.cached_from})" if result.cached_from is not None
              else f"by model version {result.model_version_id}")
        lines.append(f"  answered in {result.latency_ms:.0f} ms {by} (question {result.id})")
    return "\n".join(lines)


# what a terminal acts on instead of showing: C0 and C1 controls but the line break and the tab (ESC starts the
# sequences that set a title, clear the screen or move the cursor; a carriage return overwrites the line), and the
# bidirectional overrides that show text in another order than it is read ("Trojan Source")
_TERMINAL_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """``text`` as a terminal can show it: each control character written as its escape (``\\x1b``, ``\\u202e``),
    as ``less`` shows them. Documents, their titles and sources are written by anyone who may write documents, and
    the command line prints them (answers quote them)."""
    return _TERMINAL_UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)
