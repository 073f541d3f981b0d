"""How a data question's table names are read (``data_questions.allowed_tables``, ``sql-ask --tables``).

A name is ``table`` (of the question's schema) or ``schema.table``, each part taken as written, case and spaces
included (``Big Orders``), or, in double quotes, as SQL reads a quoted identifier (``"Big Orders"``,
``"Shop Data"."Big Orders"``, ``"a.b"`` for a table with a dot in its name, ``""`` for a quote in it). Unquoted parts
are not folded to lower case as SQL folds them: names were matched as written before quotes were read, and still are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

QUOTE = '"'


INSIDE = "has a double quote inside a name (a quoted name is a whole part between dots)"


class NotAName(ValueError):
    """``name`` is not a table name: ``why`` (its text says both)."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name} {why}")
        self.name = name
        self.why = why


def split_list(text: str) -> list[str]:
    """``--tables``: names separated by commas outside double quotes, each stripped, the empty ones dropped; the
    quotes are kept (the worker reads them, as it reads the column written by SQL). NotAName for an unclosed
    quote."""
    names, part, quoted = [], [], False
    for ch in text:
        if ch == QUOTE:
            quoted = not quoted  # a doubled quote inside quotes closes and reopens: the same characters kept
        if ch == "," and not quoted:
            names.append("".join(part))
            part = []
        else:
            part.append(ch)
    if quoted:
        raise NotAName(text.strip(), "has a double quote that is not closed")
    names.append("".join(part))
    return [n.strip() for n in names if n.strip()]


def _parts(name: str) -> list[str]:
    """The dot-separated parts of ``name``: quoted ones unquoted (``""`` is one quote), the others as written."""
    parts: list[str] = []
    i, n = 0, len(name)
    while True:
        if i < n and name[i] == QUOTE:
            out, i = [], i + 1
            while True:
                j = name.find(QUOTE, i)
                if j < 0:
                    raise NotAName(name, "has a double quote that is not closed")
                out.append(name[i:j])
                if name.startswith(QUOTE * 2, j):
                    out.append(QUOTE)
                    i = j + 2
                    continue
                i = j + 1
                break
            part = "".join(out)
            if i < n and name[i] != ".":
                raise NotAName(name, INSIDE)
        else:
            j = name.find(".", i)
            part = name[i:] if j < 0 else name[i:j]
            i = n if j < 0 else j
            if QUOTE in part:
                raise NotAName(name, INSIDE)
        if not part:
            raise NotAName(name, "has an empty name")
        parts.append(part)
        if i >= n:
            return parts
        i += 1  # the dot
        if i >= n:
            raise NotAName(name, "has an empty name")


def table_name(name: str, schema: str) -> tuple[str, str]:
    """``(schema, table)`` that ``name`` names (the question's ``schema`` when it names none); NotAName saying
    why a name is not one."""
    parts = _parts(name)
    if len(parts) > 2:
        raise NotAName(name, 'has more than a schema and a table (schema.table; a dot in a name goes in double '
                       'quotes: "a.b")')
    return (schema, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def malformed(names: Sequence[str]) -> list[NotAName]:
    """The names of ``names`` that are not one, each with why (for the question's error)."""
    bad = []
    for n in names:
        try:
            table_name(n, "")
        except NotAName as exc:
            bad.append(exc)
    return bad


def scope_parameters(schema: str, names: Sequence[str] | None, role: str) -> dict[str, Any]:
    """The parameters of ``readable_tables`` (textsql.sql) for a question's scope: each name with the schema and
    table it names (NULL for one that is not a name: it names no table)."""
    read = []
    for n in names if names is not None else ():
        try:
            read.append(table_name(n, schema))
        except NotAName:
            read.append((None, None))
    return {"schema": schema, "role": role, "names": list(names) if names is not None else None,
            "schemas": [s for s, _ in read], "relnames": [r for _, r in read]}
