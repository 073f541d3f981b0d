"""Run a checked statement as the read-only role, and compare results (execution accuracy, self-consistency).

A generated statement runs only after ``safety.check_sql`` accepted it, and then only inside its own transaction:
``READ ONLY``, ``SET LOCAL ROLE`` to the reader role (which reads only what an operator granted it), a
``statement_timeout`` and a ``search_path`` of the question's schema, rows read through a server-side cursor in
batches sized by the limits left, so at most ``max_rows`` + 1 rows, and not many more bytes than the byte limit on
the result as JSON, ever leave the server: the server sends a row's values only while the rows so far, measured by
it as JSON, fit that limit. The transaction is always rolled back. The database is the last line: the parser check refuses writes, the
transaction could not do them.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import itertools
import json
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import psycopg
from psycopg import sql as pgsql
from psycopg.rows import tuple_row
from psycopg.types.string import TextLoader

from pgsynapse.db import TRANSACTION_TIMEOUT_VERSION, bounds_for
from pgsynapse.errors import InputError
from pgsynapse.queries import q
from pgsynapse.textsql.safety import UnsafeSQL, qualified_name

FILE = "textsql.sql"
# columns of a result whose permutations are tried when comparing (a right answer with its columns in another order)
_MAX_PERMUTED_COLUMNS = 5


# SQLSTATE classes a rewrite of the statement can fix, so a fix turn (sql_fix_attempts) may show the model the error:
# 42 syntax error or undefined / ambiguous column, table, function, grouping and type errors (not 42501, a missing
# privilege), 21 cardinality (a scalar subquery returning several rows), 22 data exceptions (a bad cast, / 0).
# Timeouts (57014) and resource limits are not: a rewrite would cost another run and rarely be faster.
FIXABLE_SQLSTATE_CLASSES = ("42", "21", "22")
_FIX_ERROR_CHARS = 300
_FIRST_FETCH = 16  # rows of a result's first FETCH; the later ones are sized by the byte budget left
CLIENT_CHECK_VERSION = 140000  # client_connection_check_interval came with PostgreSQL 14
CLIENT_CHECK_MS = 1000  # how often the server looks, while the statement runs, whether its client is still there


class QueryFailed(InputError):
    """The statement failed or ran over its time limit: the database's reason, for the row's error.

    ``sqlstate`` and ``server_message`` (the server's primary message and hint, nothing else) are set for errors
    the server raised while running the statement; :attr:`fixable_error` is what a fix turn may show the model."""

    def __init__(self, message: str, *, sqlstate: str | None = None, server_message: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.server_message = server_message

    def __reduce__(self):
        return _query_failed, (str(self), self.sqlstate, self.server_message)

    @property
    def fixable_error(self) -> str | None:
        """The error for the model's fix turn, or None when no rewrite can fix it. Only the server's primary
        message and hint: they name the statement's own columns, tables and types, and a data exception quotes at
        most a value of a table the reader role may read (what the statement itself could have returned);
        DETAIL and CONTEXT are left out."""
        code = self.sqlstate or ""
        if not self.server_message or code == "42501" or code[:2] not in FIXABLE_SQLSTATE_CLASSES:
            return None
        return self.server_message[:_FIX_ERROR_CHARS]


def _query_failed(message: str, sqlstate: str | None, server_message: str | None) -> QueryFailed:
    return QueryFailed(message, sqlstate=sqlstate, server_message=server_message)


class Checked(Protocol):
    sql: str


@dataclass(frozen=True)
class Limits:
    statement_timeout_ms: int = 5000
    max_rows: int = 1000
    max_bytes: int = 1_000_000

    @classmethod
    def of(cls, settings: Any) -> Limits:
        return cls(settings.sql_statement_timeout_ms, settings.sql_max_rows, settings.sql_max_result_bytes)


@dataclass
class Result:
    columns: list[dict[str, str]]
    rows: list[list[Any]] = field(default_factory=list)
    row_count: int = 0
    truncated: bool = False
    # the limit that cut the rows when truncated: its setting and value (sql_max_rows or sql_max_result_bytes)
    truncated_by: tuple[str, int] | None = None

    def as_json(self) -> dict[str, Any]:
        return {"columns": self.columns, "rows": self.rows}

    def cut(self, setting: str, limit: int) -> None:
        self.truncated, self.truncated_by = True, (setting, limit)


def _non_finite(value: float) -> str:
    """NaN and the infinities, which JSON cannot hold, as PostgreSQL writes them (Python's str says nan, inf)."""
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


def plain(value: Any) -> Any:
    """A value as JSON can hold it: numbers stay numbers (a whole Decimal becomes an int), times become ISO text,
    NaN and the infinities become text as PostgreSQL writes them (``NaN``, ``Infinity``, ``-Infinity``)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _non_finite(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return str(value)  # NaN, Infinity, -Infinity: as PostgreSQL writes them
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


def _type_names(conn: psycopg.Connection, oids: list[int]) -> dict[int, str]:
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(q("type_names", FILE), {"oids": oids}).fetchall()
    return {int(oid): name for oid, name in rows}


def _message(exc: psycopg.Error) -> str:
    """The server's own message, without describe_db_error's advice on the worker's roles."""
    diag = getattr(exc, "diag", None)
    return (getattr(diag, "message_primary", None) or str(exc)).strip() + (
        f" (SQLSTATE {exc.sqlstate})" if exc.sqlstate else "")


def run_readonly(conn: psycopg.Connection, checked: Checked, limits: Limits, *, role: str = "pgsynapse_reader",
                 search_path: Sequence[str] = ("public",)) -> Result:
    """Run ``checked.sql`` (already through ``safety.check_sql``) read-only as ``role``; raise :class:`QueryFailed`.

    ``conn`` is an autocommit connection (this opens and always rolls back its own transaction) that holds no
    session advisory lock of its own: each run releases every one after it (one the statement took outlives the
    rollback). Generated statements run on the reader's own login where there is one (textsql/reader.py).
    """
    if not conn.autocommit or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RuntimeError("run_readonly needs an idle autocommit connection: READ ONLY must start its transaction")
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(q("readonly_transaction", FILE))
            conn.execute(pgsql.SQL(q("readonly_role", FILE)).format(pgsql.Identifier(role)))
            # the server ends a transaction whose client went silent (as db.bounded_transaction does for the
            # worker's writes), and on PostgreSQL 17+ one cut off inside a statement's message too
            limits_query = ("readonly_limits_total" if conn.info.server_version >= TRANSACTION_TIMEOUT_VERSION
                            else "readonly_limits")
            conn.execute(q(limits_query, FILE),
                         {"statement_ms": str(int(limits.statement_timeout_ms)),
                          "search_path": ", ".join(pgsql.Identifier(s).as_string(conn) for s in search_path),
                          **bounds_for(limits.statement_timeout_ms / 1000).parameters()})
            _end_with_client(conn)
            _refuse_schema_functions(conn, getattr(checked, "attributes", ()), getattr(checked, "functions", ()))
            started = time.monotonic()
            with conn.cursor(name="pgsynapse_data_question", row_factory=tuple_row) as cur:
                # an interval as PostgreSQL writes it: a timedelta has no months ("1 mon" would be 30 days)
                cur.adapters.register_loader("interval", TextLoader)
                # each row's size first (the server sends no row over the byte limit), then the statement's columns
                cur.execute(pgsql.SQL(q("readonly_measured_rows", FILE)).format(
                    statement=pgsql.SQL(checked.sql), max_bytes=pgsql.Literal(int(limits.max_bytes))))
                described = list(cur.description or [])[1:]
                names = _type_names(conn, sorted({d.type_code for d in described}))
                columns = [{"name": d.name, "type": names.get(d.type_code, str(d.type_code))} for d in described]
                result = Result(columns)
                _fetch(conn, cur, limits, result, started)
    except psycopg.errors.QueryCanceled:
        raise _over_time(limits) from None
    except psycopg.errors.InsufficientPrivilege as exc:
        raise QueryFailed(f"the read-only role {role} may not do this: {_message(exc)}"
                          + _grant_hint(conn, getattr(checked, "tables", ()), role), sqlstate=exc.sqlstate) from None
    except psycopg.Error as exc:
        diag = getattr(exc, "diag", None)
        primary = (getattr(diag, "message_primary", None) or "").strip()
        hint = (getattr(diag, "message_hint", None) or "").strip()
        raise QueryFailed(f"the statement failed: {_message(exc)}", sqlstate=exc.sqlstate,
                          server_message=(f"{primary} {hint}" if hint else primary) or None) from None
    finally:
        if not conn.broken and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            conn.execute(q("readonly_release_locks", FILE))
    result.row_count = len(result.rows)
    return result


def _end_with_client(conn: psycopg.Connection) -> None:
    """Have the server end the statement once its client has gone (a worker SIGKILLed, OOM-killed): it ran on until
    its ``statement_timeout`` (up to an hour), holding its locks and a connection, for nobody. PostgreSQL 14+, on
    the platforms where the server can tell a closed socket (Linux among them); elsewhere it refuses the setting
    and the statement's timeout alone bounds it. In a savepoint, so that a refusal leaves the transaction usable."""
    if conn.info.server_version < CLIENT_CHECK_VERSION:
        return
    try:
        with conn.transaction():
            conn.execute(q("readonly_client_check", FILE), {"ms": str(CLIENT_CHECK_MS)})
    except psycopg.errors.InvalidParameterValue:  # "must be set to 0 on this platform"
        pass


def _grant_hint(conn: psycopg.Connection, tables: Any, role: str) -> str:
    """The GRANT hint of a privilege error, only when one of the statement's tables is one the role may not read:
    a refusal of something else (a statement setting the role, refused on the reader's own login) is no missing
    grant, and a GRANT would not help."""
    if conn.broken or not tables:
        return ""
    pairs = sorted(tables)
    with conn.cursor(row_factory=tuple_row) as cur:
        unreadable = [r[0] for r in cur.execute(q("readonly_unreadable_tables", FILE), {
            "schemas": [s for s, _ in pairs], "names": [t for _, t in pairs], "role": role}).fetchall()]
    if not unreadable:
        return ""
    return (f" ({role} may not read {', '.join(unreadable)}: GRANT SELECT on the tables data questions may read "
            f"TO {role}: docs/operations.md)")


def _refuse_schema_functions(conn: psycopg.Connection, attributes: Any, functions: Any) -> None:
    """Raise :class:`UnsafeSQL` when one of the statement's attribute names (``o.f``: ``f(o)`` when ``o`` has no
    column ``f``) is a function of a schema of the search path that the role may execute (the parser check refuses
    pg_catalog's by name, but cannot know the operator's or an extension's), or when an allowed function it calls
    unqualified is also one the schema's owner defined there (PostgreSQL may call that one instead)."""
    written = dict(sorted(attributes))
    shadow = found = None
    with conn.cursor(row_factory=tuple_row) as cur:
        if functions:
            shadow = cur.execute(q("shadowing_functions", FILE), {"names": sorted(functions)}).fetchone()
        if written:
            found = cur.execute(q("attribute_functions", FILE), {"names": sorted(written)}).fetchone()
    if shadow:
        schema, name = shadow
        raise UnsafeSQL("function", f"refused: function {name} is also one of the question's schema "
                                    f"({qualified_name(schema, name)}), which PostgreSQL may call instead of "
                                    f"pg_catalog's: write pg_catalog.{name}")
    if found:
        schema, name = found
        raise UnsafeSQL("function", f"refused: {written[name]} would call function "
                                    f"{qualified_name(schema, name)}, which is not allowed "
                                    "(a function of the question's schema)")


def _over_time(limits: Limits) -> QueryFailed:
    return QueryFailed(f"the statement ran over the statement timeout of {limits.statement_timeout_ms} ms "
                       "(sql_statement_timeout_ms) and was cancelled")


def json_bytes(value: Any) -> int:
    """The bytes of ``value`` as JSON the way a stored result (jsonb) writes it: UTF-8, ", " and ": " between items,
    and each float as a jsonb number, without an exponent (1e+300 is 301 digits, 1.5e-07 is 0.00000015)."""
    return len(json.dumps(value, ensure_ascii=False, default=str).encode()) + _float_excess(value)


def _float_excess(value: Any) -> int:
    """How many more bytes jsonb writes the floats in ``value`` with than JSON (Python's repr) does."""
    if isinstance(value, float):  # only a repr with an exponent is written otherwise (7.5 and 0.1 are the same)
        written = repr(value)
        return len(format(decimal.Decimal(written), "f")) - len(written) if "e" in written else 0
    if isinstance(value, list):
        return sum(_float_excess(v) for v in value)
    if isinstance(value, dict):
        return sum(_float_excess(v) for v in value.values())
    return 0


def _fetch(conn: psycopg.Connection, cur: psycopg.ServerCursor, limits: Limits, result: Result,
           started: float) -> None:
    """Fill ``result.rows`` (JSON values) while the result as JSON (:meth:`Result.as_json`, as stored) is at most
    ``max_bytes`` and up to ``max_rows``, ``truncated`` when more were left (``truncated_by`` the limit that cut it).

    Each row comes with the bytes of the rows so far as the server measured them as JSON (``readonly_measured_rows``),
    and without its values once those are over ``max_bytes``: no FETCH brings much more than the limit. The server
    measures values as PostgreSQL writes them in JSON, the result holds them as :func:`plain` makes them: the same
    bytes for text (any characters), integers, JSON, intervals and dates, fewer on the server for arrays (no space
    after a comma) and times with fractions of a second; more for a number with zeros at the end of its fraction
    (1.50, kept as 1.5) and a row or composite value (an object with its field names, kept as text). What is kept is
    decided here, on the result's own bytes. The rows come in FETCHes sized by the byte budget left (after a first
    one of :data:`_FIRST_FETCH` rows), so the server does not compute many rows past the limits. Each FETCH is a
    statement of its own: every one after the first runs under the time the statement has left of
    ``statement_timeout_ms`` since it was declared."""
    size = json_bytes(result.as_json())
    largest = 0
    want = min(_FIRST_FETCH, limits.max_rows + 1)
    while True:
        batch = cur.fetchmany(want)
        for measured, *row in batch:
            if len(result.rows) == limits.max_rows:
                result.cut("sql_max_rows", limits.max_rows)
                return
            if measured > limits.max_bytes:  # withheld by the server
                result.cut("sql_max_result_bytes", limits.max_bytes)
                return
            values = [plain(v) for v in row]
            n = json_bytes(values) + (2 if result.rows else 0)  # ", " before every row but the first
            if size + n > limits.max_bytes:
                result.cut("sql_max_result_bytes", limits.max_bytes)
                return
            size += n
            largest = max(largest, n)
            result.rows.append(values)
        if len(batch) < want:
            return
        left_ms = int(limits.statement_timeout_ms - (time.monotonic() - started) * 1000)
        if left_ms < 1:
            raise _over_time(limits)
        conn.execute(q("readonly_time_left", FILE), {"statement_ms": str(left_ms)})
        want = max(1, min(limits.max_rows + 1 - len(result.rows), (limits.max_bytes - size) // largest + 1))


def _norm(value: Any) -> Any:
    """A value as result comparison sees it: numbers as floats to 6 significant digits (1 == 1.0 == 1.000000001)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(f"{float(value):.6g}")
    if isinstance(value, list):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _rows(r: Result) -> list[tuple[Any, ...]]:
    return [tuple(_norm(v) for v in row) for row in r.rows]


def _key(row: tuple[Any, ...]) -> str:
    return repr(row)


def same_result(gold: Result, got: Result, *, ordered: bool) -> bool:
    """Execution accuracy's test: the same rows (as a multiset, or in order when the gold statement orders them),
    with the columns in any order; numbers equal to 6 significant digits; column names are not compared."""
    if len(gold.columns) != len(got.columns) or len(gold.rows) != len(got.rows):
        return False
    want = _rows(gold)
    have = _rows(got)
    width = len(gold.columns)
    orders = (itertools.permutations(range(width)) if width <= _MAX_PERMUTED_COLUMNS
              else iter([tuple(range(width))]))
    want_bag = None if ordered else Counter(map(_key, want))
    for order in orders:
        moved = [tuple(row[i] for i in order) for row in have]
        if ordered:
            if moved == want:
                return True
        elif Counter(map(_key, moved)) == want_bag:
            return True
    return False


def result_signature(r: Result) -> str:
    """Equal for results that ``same_result(ordered=False)`` finds equal with the columns in the same order: the
    vote of self-consistency."""
    rows = sorted(map(_key, _rows(r)))
    return hashlib.sha256(json.dumps([len(r.columns), rows]).encode()).hexdigest()
