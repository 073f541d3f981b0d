"""Named SQL queries, loaded from ``sql/*.sql`` files with ``-- name: query_name`` headers."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_HEADER = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


@cache
def _load(filename: str) -> dict[str, str]:
    text = resources.files("pgsynapse").joinpath("sql", filename).read_text()
    parts = _HEADER.split(text)
    return {name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def q(name: str, filename: str = "queries.sql") -> str:
    """The text of query ``name``; a KeyError names the missing query."""
    return _load(filename)[name]
