"""Named SQL queries, loaded from ``sql/*.sql`` files with ``-- name: query_name`` headers."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_HEADER = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_LEADING_COMMENTS = re.compile(r"\A(?:\s*--[^\n]*\n)+")


@cache
def _load(filename: str) -> dict[str, str]:
    text = resources.files("pgsynapse").joinpath("sql", filename).read_text()
    parts = _HEADER.split(text)
    # a query's leading comment stays in the file: sent along, it would fill pg_stat_activity's query text
    # (track_activity_query_size, 1 kB by default) before the SQL itself
    return {name: _LEADING_COMMENTS.sub("", body.strip()).rstrip(";")
            for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def q(name: str, filename: str = "queries.sql") -> str:
    """The text of query ``name``; a KeyError names the missing query."""
    return _load(filename)[name]
