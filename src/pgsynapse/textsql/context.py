"""The schema a data question's prompt carries: the allowed tables' DDL read from the catalog (columns, types,
keys, comments), a few sample values per column when ``sql_sample_values`` allows, narrowed to the
``sql_max_tables`` tables most like the question (by the embedding model) when more are allowed.

Only what the reader role may SELECT is described or allowed: a table the operator did not grant it does not
exist for data questions, whatever the question or a comment says.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql as pgsql
from psycopg.rows import dict_row

from pgsynapse.errors import InputError
from pgsynapse.queries import q
from pgsynapse.textsql.execute import Limits, QueryFailed, run_readonly
from pgsynapse.textsql.names import malformed, scope_parameters
from pgsynapse.textsql.safety import is_system_schema
from pgsynapse.wording import listed

_PLAIN = re.compile(r"^[a-z_][a-z0-9_]*$")
_SAMPLE_ROWS = 50
_SAMPLE_CHARS = 40
_COMMENT_CHARS = 200

Encode = Callable[[list[str]], np.ndarray]  # texts -> L2-normalised vectors


class NoReadableTables(InputError):
    """The question's scope has no table the reader role may read."""


@dataclass
class Table:
    oid: int
    schema: str
    name: str
    comment: str | None
    columns: list[dict[str, Any]] = field(default_factory=list)
    keys: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[str, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        """A short text of the table for similarity with a question: its name, comment and columns."""
        cols = ", ".join(c["name"] for c in self.columns)
        return f"{self.name.replace('_', ' ')}: {self.comment or ''} ({cols})"


@dataclass(frozen=True)
class SchemaContext:
    text: str  # the DDL-like text the model is given
    allowed: tuple[tuple[str, str], ...]  # (schema, table) the statement may read: every readable one in scope
    described: tuple[tuple[str, str], ...]  # those the text describes (narrowed)


def ident(name: str) -> str:
    """An identifier as SQL needs it written: plain lower-case names bare, others double-quoted."""
    return name if _PLAIN.match(name) else '"' + name.replace('"', '""') + '"'


def _one_line(text: str | None, limit: int = _COMMENT_CHARS) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _sample(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    text = " ".join(str(value).split())
    return repr(text if len(text) <= _SAMPLE_CHARS else text[: _SAMPLE_CHARS - 1] + "…")


def ddl(table: Table, default_schema: str) -> str:
    """``CREATE TABLE`` text of one table, comments and samples as SQL comments."""
    name = ident(table.name) if table.schema == default_schema else f"{ident(table.schema)}.{ident(table.name)}"
    pk = next((k["columns"] for k in table.keys if k["kind"] == "p"), [])
    lines = []
    for c in table.columns:
        line = f"  {ident(c['name'])} {c['type']}"
        if pk == [c["name"]]:
            line += " PRIMARY KEY"
        elif c["not_null"]:
            line += " NOT NULL"
        notes = [_one_line(c["comment"])] if c["comment"] else []
        if table.samples.get(c["name"]):
            notes.append("e.g. " + ", ".join(table.samples[c["name"]]))
        lines.append((line, "; ".join(notes)))
    if len(pk) > 1:
        lines.append((f"  PRIMARY KEY ({', '.join(map(ident, pk))})", ""))
    for k in table.keys:
        if k["kind"] == "f":
            ref = ident(k["ref_table"]) if k["ref_schema"] == default_schema else \
                f"{ident(k['ref_schema'])}.{ident(k['ref_table'])}"
            lines.append((f"  FOREIGN KEY ({', '.join(map(ident, k['columns']))}) REFERENCES {ref} "
                          f"({', '.join(map(ident, k['ref_columns']))})", ""))
    head = f"CREATE TABLE {name} (" + (f"  -- {_one_line(table.comment)}" if table.comment else "")
    body = [line + ("," if i < len(lines) - 1 else "") + (f"  -- {note}" if note else "")
            for i, (line, note) in enumerate(lines)]
    return "\n".join([head, *body, ");"])


_NAME_BYTES = 63  # NAMEDATALEN - 1: PostgreSQL's longest name
_LISTED = 10  # names a message lists before "and N more"


def _listed(names: Sequence[str]) -> str:
    """Names for a message: each cut to a PostgreSQL name's length, at most :data:`_LISTED` of them (a row's writer
    chooses them: one of 10,000 characters went whole into the job's error and the worker's log)."""
    return listed([n if len(n) <= _NAME_BYTES * 2 + 1 else f"{n[:_NAME_BYTES]}..." for n in names], _LISTED)


def _tables(conn: psycopg.Connection, schema: str, names: Sequence[str] | None, role: str) -> list[Table]:
    if not schema.strip():
        raise InputError("target_schema is empty: name the schema whose tables the question is about (public by "
                         "default)")
    if (size := len(schema.encode())) > _NAME_BYTES:
        raise InputError(f"target_schema {schema[:_NAME_BYTES]}... is {size:,} bytes long: a PostgreSQL name is at "
                         f"most {_NAME_BYTES} bytes (the schema of the question's tables)")
    if is_system_schema(schema):
        raise InputError(f"target_schema {schema} is a system schema (pgsynapse's or PostgreSQL's): data questions "
                         "never read its tables")
    if names is not None and not any(n.strip() for n in names):
        raise InputError("allowed_tables is empty: name the tables the question may read, or leave it NULL for every "
                         "table of its schema the reader role may read")
    if names is not None and (bad := malformed(names)):
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise InputError(f"allowed_tables has a name that is not one: {_listed([bad[0].name])} {bad[0].why}{more}")
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q("readable_tables", "textsql.sql"), scope_parameters(schema, names, role)).fetchall()
        unknown = [r["asked"] for r in rows if r["oid"] is None]
        if unknown:
            raise InputError(f"allowed_tables names tables that do not exist: {_listed(unknown)} (a name is matched "
                             "as written, case included; write one with a dot or a comma in it in double quotes, as "
                             'in SQL: "a.b")')
        system = [f"{r['schema']}.{r['name']}" for r in rows if is_system_schema(r["schema"])]
        if system:
            raise InputError(f"allowed_tables names tables of a system schema ({_listed(system)}: pgsynapse's or "
                             "PostgreSQL's): data questions never read them")
        tables = [Table(r["oid"], r["schema"], r["name"], r["comment"]) for r in rows if r["readable"]]
        if not tables and names is None and not cur.execute(q("schema_exists", "textsql.sql"),
                                                            {"schema": schema}).fetchone()["found"]:
            raise InputError(f"schema {schema} does not exist: target_schema names the schema of the question's "
                             "tables")
        if not tables:
            scope = _listed(names) if names is not None else f"schema {schema}"
            grant = (_listed([f"{r['schema']}.{r['name']}" for r in rows]) if names is not None
                     else f"{schema}.<table>")
            raise NoReadableTables(
                f"no table of {scope} may be read by the role {role}: grant it the tables data questions may "
                f"read (GRANT SELECT ON {grant} TO {role}; docs/operations.md)")
        by_oid = {t.oid: t for t in tables}
        for c in cur.execute(q("table_columns", "textsql.sql"), {"oids": list(by_oid)}).fetchall():
            by_oid[c["oid"]].columns.append(c)
        for k in cur.execute(q("table_keys", "textsql.sql"), {"oids": list(by_oid)}).fetchall():
            by_oid[k["oid"]].keys.append(k)
    return tables


def _add_samples(conn: psycopg.Connection, table: Table, per_column: int, role: str) -> None:
    """Up to ``per_column`` distinct values of each column, read as the reader role from a few rows."""

    class Stmt:
        sql = pgsql.SQL(q("sample_rows", "textsql.sql")).format(
            pgsql.Identifier(table.schema), pgsql.Identifier(table.name), _SAMPLE_ROWS).as_string(conn)

    try:
        result = run_readonly(conn, Stmt(), Limits(statement_timeout_ms=2000, max_rows=_SAMPLE_ROWS), role=role)
    except QueryFailed:
        return  # samples are a help, never a reason to fail the question
    for i, col in enumerate(result.columns):
        seen: list[str] = []
        for row in result.rows:
            if row[i] is not None and not isinstance(row[i], (dict, list)):
                s = _sample(row[i])
                if s not in seen:
                    seen.append(s)
            if len(seen) >= per_column:
                break
        table.samples[col["name"]] = seen


def schema_context(conn: psycopg.Connection, schema: str, names: Sequence[str] | None, *, question: str = "",
                   encode: Encode | None = None, samples: int = 0, max_tables: int = 12,
                   role: str = "pgsynapse_reader") -> SchemaContext:
    """The prompt's schema text for a question, and the tables its statement may read.

    ``conn`` is outside any transaction (samples are read in their own read-only ones).
    """
    tables = _tables(conn, schema, names, role)
    allowed = tuple((t.schema, t.name) for t in tables)
    chosen = tables
    if len(tables) > max_tables:
        if encode is None:
            chosen = tables[:max_tables]
        else:
            vecs = encode([question] + [t.describe() for t in tables])
            scores = vecs[1:] @ vecs[0]
            # the most like the question first: a prompt over its budget loses tables from the end
            chosen = [tables[i] for i in np.argsort(-scores, kind="stable")[:max_tables].tolist()]
    if samples:
        for t in chosen:
            _add_samples(conn, t, samples, role)
    text = "\n\n".join(ddl(t, schema) for t in chosen)
    return SchemaContext(text, allowed, tuple((t.schema, t.name) for t in chosen))
