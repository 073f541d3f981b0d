"""A model's output -> the statement it holds (textsql/generate.py runs every candidate through it).

Models wrap SQL in prose and fences, add a second statement, or stop without a ``;``: :func:`extract_sql` takes the
statement out, and :func:`statement_complete` tells generation where to stop. Both read SQL lexically (quotes,
dollar quotes and comments hide a ``;``). A second statement after the first is kept, for the safety check to
refuse (one SELECT answers a question: the first alone may answer half of it, and nothing would say so); what
follows the first ``;`` counts as a statement only when a line of it begins with a statement keyword and
PostgreSQL's parser takes it (prose such as "With this query..." is not). Neither judges safety: a write stays a
write, for textsql/safety.py to refuse, never the harmless subquery inside it.
"""

from __future__ import annotations

import re

from pglast.parser import ParseError, parse_sql

_STRONG = ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE", "MERGE", "CREATE", "DROP", "ALTER", "TRUNCATE", "GRANT",
           "REVOKE", "COPY")
# a statement begins at the text's or a line's first word when it is one of these (any case); words that often
# begin prose ("show", "table", "set", "do", ...) are left out: a statement they begin is not found, and the
# empty statement is refused like any other that is not one SELECT
_STARTS = tuple(w.lower() for w in _STRONG)
_AT_LINE = re.compile(r"^[ \t]*(" + "|".join(_STARTS) + r")\b",
                      re.IGNORECASE | re.MULTILINE)
_UPPER = re.compile(r"\b(" + "|".join(_STRONG) + r")\b")
_ANY_SELECT = re.compile(r"\bselect\b", re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
# the languages of a later fence that may hold a second statement (a ```text or ```output fence holds prose)
_SQL_FENCES = ("", "sql", "postgresql", "postgres", "pgsql", "plpgsql", "psql")
# words a statement's later lines start with: a blank line before anything else ends the statement (prose)
_CLAUSES = set(_STARTS) | {"from", "where", "group", "order", "having", "limit", "offset", "union", "intersect",
                           "except", "join", "inner", "left", "right", "full", "cross", "natural", "on", "and", "or",
                           "not", "as", "window", "fetch", "for", "case", "when", "then", "else", "end", "lateral",
                           "using", "returning", "into", "all", "distinct", "values", "table", "(", ")"}


def _statement_end(text: str) -> int | None:
    """The index of the first ``;`` outside quotes, dollar quotes and comments, or None."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == ";":
            return i
        if c == "'":
            escapes = i > 0 and text[i - 1] in "eE" and (i < 2 or not (text[i - 2].isalnum() or text[i - 2] == "_"))
            i += 1
            while i < n:
                if escapes and text[i] == "\\":
                    i += 2
                    continue
                if text[i] == "'":
                    if i + 1 < n and text[i + 1] == "'":
                        i += 2
                        continue
                    break
                i += 1
        elif c == '"':
            close = text.find('"', i + 1)
            i = n if close < 0 else close
        elif c == "-" and text.startswith("--", i):
            close = text.find("\n", i)
            i = n if close < 0 else close
        elif c == "/" and text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            continue
        elif c == "$":
            m = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", text[i:])
            if m and not (i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")):
                close = text.find(m.group(0), i + len(m.group(0)))
                i = n if close < 0 else close + len(m.group(0))
                continue
        i += 1
    return None


def _statement_start(text: str) -> int | None:
    """Where the statement begins: at the start of the text or of a line when one begins with a statement keyword,
    else at the first upper-case statement keyword, else at the first ``select`` in any case."""
    stripped = text.lstrip()
    head = stripped.split(None, 1)[0].lower() if stripped else ""
    if head.startswith("(") or head in _STARTS or head.rstrip(";") in _STARTS:
        return len(text) - len(stripped)
    for pattern in (_AT_LINE, _UPPER, _ANY_SELECT):
        m = pattern.search(text)
        if m:
            return m.start(1) if pattern is _AT_LINE else m.start()
    return None


def _fenced(text: str) -> list[tuple[str, str]]:
    """The (language, body) of the fenced code blocks (```sql ... ```) that hold a statement, in order."""
    return [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text) if _statement_start(m.group(2)) is not None]


def _unfenced(text: str) -> str:
    """The body of the first fenced code block that holds a statement, else the text."""
    fenced = _fenced(text)
    return fenced[0][1] if fenced else text


def _cut_prose(sql: str) -> str:
    """A statement without ``;`` followed by a blank line and prose: the prose goes."""
    for m in re.finditer(r"\n[ \t]*\n[ \t]*(\S+)", sql):
        word = m.group(1).lower()
        if not (word in _CLAUSES or word.startswith(("(", ")", "--", "/*")) or word.rstrip(",;") in _CLAUSES):
            return sql[:m.start()]
    return sql


def _one_statement(text: str) -> str:
    """``text``'s statement up to its top-level ``;`` (without it), else up to a fence or prose after a blank line."""
    end = _statement_end(text)
    return text[:end] if end is not None else _cut_prose(text.split("```", 1)[0])


def _parses(sql: str) -> bool:
    try:
        return bool(parse_sql(sql))
    except (ParseError, RecursionError):
        return False


def _next_statement(rest: str) -> int | None:
    """The end of a statement in ``rest`` (the text after a statement's ``;``), or None when it holds prose or
    comments only: a line of it (its first line included) that begins with a statement keyword and parses."""
    rest = rest.split("```", 1)[0]
    for m in _AT_LINE.finditer(rest):
        sql = _one_statement(rest[m.start(1):])
        if _parses(sql):
            return m.start(1) + len(sql)
    return None


def extract_sql(text: str) -> str:
    """A model's output -> its statement, without the ``;``: the body of a ```sql fence, from the first statement
    keyword on (prose before it dropped), up to the first top-level ``;`` (prose after it dropped). When a second
    statement follows, in the same fence or in a later one ("Or: ```sql ...```"), both (joined by ``;``), for the
    safety check to refuse ("2 statements"); a later fence counts only when it is marked SQL (or not marked),
    PostgreSQL's parser takes its statement and it is not the first one again (white space aside). "" when the output holds no statement: the safety check
    refuses it as empty."""
    fenced = _fenced(text)
    if not fenced:
        return _extract(text)
    sql = _extract(fenced[0][1])
    for language, body in fenced[1:]:
        more = _extract(body) if language in _SQL_FENCES else ""
        if more and _parses(more) and " ".join(more.split()) != " ".join(sql.split()):
            sql += ";\n" + more
    return sql


def _extract(body: str) -> str:
    """``extract_sql`` of one fence's body (or of an output without a fence)."""
    start = _statement_start(body)
    if start is None:
        return ""
    sql = body[start:]
    end = _statement_end(sql)
    if end is None:
        return _one_statement(sql).strip()
    second = _next_statement(sql[end + 1:])
    return (sql[:end + 1 + second] if second is not None else sql[:end]).strip()


def statement_complete(text: str) -> bool:
    """Whether a model's output so far holds a whole statement (its top-level ``;``): generation stops there."""
    body = _unfenced(text)
    start = _statement_start(body)
    return start is not None and _statement_end(body[start:]) is not None
