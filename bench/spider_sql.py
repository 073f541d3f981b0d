"""The SQL side of bench/spider.py: the literals the gold SQLite queries compare columns with (the synthetic rows
draw from them), and the translation of the gold SQLite SQL to PostgreSQL."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pglast import parse_sql
from pglast.ast import ColumnRef, FuncCall, Node, SelectStmt
from pglast.keywords import RESERVED_KEYWORDS, TYPE_FUNC_NAME_KEYWORDS
from pglast.stream import RawStream
from pglast.visitors import Visitor

if TYPE_CHECKING:
    from bench.spider import Column, Database

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
_AGGREGATES = {"count", "sum", "avg", "min", "max"}

def ident(name: str) -> str:
    """``name`` as PostgreSQL must see it: bare when it is a plain lower-case word, else double-quoted."""
    if _IDENT.match(name) and name not in RESERVED_KEYWORDS and name not in TYPE_FUNC_NAME_KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'



def is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False



_TOKEN = re.compile(r"""
    (?P<s>'(?:[^']|'')*')            # 'string'
  | (?P<d>"(?:[^"]|"")*")            # "string or identifier"
  | (?P<b>`[^`]*`)                   # `identifier`
  | (?P<n>\d+(?:\.\d+)?)             # number
  | (?P<w>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_*][A-Za-z0-9_]*)?)   # word or alias.column
  | (?P<o>!=|<>|>=|<=|\|\||[=<>(),;*+\-/%.])
  | (?P<sp>\s+)
""", re.X)


def _tokens(sql: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(sql):
        m = _TOKEN.match(sql, pos)
        if not m:
            raise ValueError(f"cannot tokenize at {sql[pos:pos + 20]!r}")
        pos = m.end()
        if m.lastgroup != "sp":
            out.append((m.lastgroup, m.group()))  # type: ignore[arg-type]
    return out


def _unquote(tok: tuple[str, str]) -> Any:
    kind, text = tok
    if kind == "s":
        return text[1:-1].replace("''", "'")
    if kind == "d":
        return text[1:-1].replace('""', '"')
    if kind == "n":
        return float(text) if "." in text else int(text)
    return None


def _is_identifier(db: Database, text: str) -> bool:
    low = text.lower()
    return low in db.tables or any(c.name == low for t in db.tables.values() for c in t.columns)


def _columns_named(db: Database, ref: str, aliases: dict[str, str]) -> list[Column]:
    ref = ref.lower()
    if "." in ref:
        alias, col = ref.split(".", 1)
        t = db.tables.get(aliases.get(alias, alias))
        return [c for c in t.columns if c.name == col] if t else []
    return [c for t in db.tables.values() for c in t.columns if c.name == ref]


def _aliases(toks: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for i in range(len(toks) - 2):
        if toks[i][0] == "w" and toks[i + 1][1].lower() == "as" and toks[i + 2][0] == "w":
            out[toks[i + 2][1].lower()] = toks[i][1].lower()
    return out


def collect_literals(db: Database, sql: str) -> None:
    toks = _tokens(sql)
    aliases = _aliases(toks)
    for i, (kind, text) in enumerate(toks):
        if kind not in ("w", "d", "b") or i + 2 >= len(toks):
            continue
        if kind != "w" and not _is_identifier(db, text[1:-1]):
            continue
        cols = _columns_named(db, text if kind == "w" else text[1:-1], aliases)
        if not cols:
            continue
        op = toks[i + 1][1].lower()
        j = i + 2
        if op == "not" and toks[j][1].lower() in ("like", "in", "between"):
            op, j = "not " + toks[j][1].lower(), j + 1
        values: list[Any] = []
        if op in ("=", "!=", "<>", "like", "not like", ">", "<", ">=", "<="):
            values = [_unquote(toks[j])] if j < len(toks) else []
        elif op in ("in", "not in") and toks[j][1] == "(":
            k = j + 1
            while k < len(toks) and toks[k][1] != ")":
                if toks[k][0] in ("s", "d", "n"):
                    values.append(_unquote(toks[k]))
                elif toks[k][1] != ",":
                    values = []  # a subquery
                    break
                k += 1
        elif op == "between" and j + 2 < len(toks):
            values = [_unquote(toks[j]), _unquote(toks[j + 2])]
            op = ">="
        for v in values:
            if v is None or (j < len(toks) and toks[j][0] == "d" and _is_identifier(db, toks[j][1][1:-1])):
                continue
            for c in cols:
                if op in ("like", "not like"):
                    core = str(v).strip("%")
                    c.hits.append(core.replace("%", " ").replace("_", "x") if core else "x")
                    c.hits.append(str(v).replace("%", "Zz").replace("_", "q"))
                elif op in (">", "<", ">=", "<=") and is_number(v):
                    c.bounds.append(float(v))
                else:
                    c.hits.append(v)


def translate(db: Database, sql: str) -> str:
    """The gold SQLite ``sql`` of ``db`` as PostgreSQL (see the module's docstring)."""
    toks = _tokens(sql.strip().rstrip(";"))
    aliases = _aliases(toks)
    out: list[str] = []
    for i, (kind, text) in enumerate(toks):
        if kind in ("d", "b"):
            inner = text[1:-1]
            if _is_identifier(db, inner) or (kind == "b"):
                out.append(ident(inner.lower()))
            else:
                out.append("'" + inner.replace("''", "'").replace("'", "''") + "'")
            continue
        if kind == "w":
            low = text.lower()
            if low == "like":
                out.append("ILIKE")
                continue
            if "." in low:
                a, c = low.split(".", 1)
                out.append(f"{a}.{ident(c) if c != '*' else '*'}")
                continue
            if _is_identifier(db, low) and (ident(low) != low):
                out.append(ident(low))
                continue
            out.append(text)
            continue
        if kind == "n" and i >= 2 and toks[i - 1][1] in ("=", "!=", "<>", ">", "<", ">=", "<="):
            cols = _columns_named(db, toks[i - 2][1], aliases) if toks[i - 2][0] == "w" else []
            if cols and all(c.sql_type == "text" for c in cols):
                out.append(f"'{text}'")
                continue
        out.append(text)
    return _fix_group_by(" ".join(out))


class _GroupByFixer(Visitor):
    """Adds to a GROUP BY the bare columns its SELECT list and ORDER BY use outside an aggregate (SQLite takes
    them from an arbitrary row of the group; PostgreSQL refuses them; in Spider they depend on the group key)."""

    def visit_SelectStmt(self, ancestors: Any, node: SelectStmt) -> None:
        if not node.groupClause:
            return
        grouped = {_colref_key(g) for g in node.groupClause if isinstance(g, ColumnRef)}
        extra: list[ColumnRef] = []
        for expr in [t.val for t in node.targetList or ()] + [s.node for s in node.sortClause or ()]:
            for ref in _bare_columns(expr):
                key = _colref_key(ref)
                if key not in grouped:
                    grouped.add(key)
                    extra.append(ref)
        if extra:
            node.groupClause = tuple(node.groupClause) + tuple(extra)


def _colref_key(ref: ColumnRef) -> tuple[str, ...]:
    return tuple(getattr(f, "sval", "*") for f in ref.fields)


def _bare_columns(expr: Node | None) -> list[ColumnRef]:
    if expr is None:
        return []
    if isinstance(expr, ColumnRef):
        return [] if _colref_key(expr)[-1] == "*" else [expr]
    if isinstance(expr, FuncCall):
        if expr.funcname[-1].sval.lower() in _AGGREGATES:
            return []
        return [r for a in expr.args or () for r in _bare_columns(a)]
    if isinstance(expr, SelectStmt):
        return []
    out = []
    for name in getattr(expr, "__slots__", ()):
        v = getattr(expr, name, None)
        for x in v if isinstance(v, tuple) else [v]:
            if isinstance(x, Node):
                out.extend(_bare_columns(x))
    return out


def _fix_group_by(sql: str) -> str:
    stmts = parse_sql(sql)
    _GroupByFixer()(stmts)
    return RawStream()(stmts[0])
