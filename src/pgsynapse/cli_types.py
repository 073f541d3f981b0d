"""The argparse types of the ``pgsynapse`` command's options (cli_args.py): numbers within their ranges, job kinds,
table and schema names, text encodings; each refusal is one line saying what is allowed."""

from __future__ import annotations

import argparse
import codecs
from collections.abc import Callable
from typing import Any

from pgsynapse.config import JOB_KINDS, SAMPLE_CHUNKS_RANGE, SAMPLE_CHUNKS_WHY, unknown_kinds
from pgsynapse.textsql.names import NotAName, split_list


def ranged(kind: type, low: float, high: float | None = None, why: str = "") -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` within [``low``, ``high``], else one line saying what is allowed."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value != value:  # NaN: every comparison with a bound is False, so it would pass any range
            raise argparse.ArgumentTypeError(f"not a number: {text!r}")
        if value < low or (high is not None and value > high):
            allowed = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}" + (f" ({why})" if why else ""))
        return value
    return parse


COUNT = ranged(int, 1)  # results, pages, layers, epochs, samples
SECONDS = ranged(float, 0)  # 0: no limit (ask, sql-ask)
SHARE = ranged(float, 0, 1)  # agreement thresholds
PERCENT = ranged(float, 0, 100)
SAMPLE_CHUNKS = ranged(int, *SAMPLE_CHUNKS_RANGE, why=f"as the export_sample_chunks setting: {SAMPLE_CHUNKS_WHY}")


def KINDS(text: str) -> tuple[str, ...]:  # noqa: N802 - an argparse type, named like the others
    """Comma-separated job kinds (``run --kinds``), each one that exists."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds:
        raise argparse.ArgumentTypeError(f"no job kind given (the kinds: {', '.join(JOB_KINDS)})")
    if unknown := [k for k in kinds if k not in JOB_KINDS]:
        raise argparse.ArgumentTypeError(unknown_kinds(unknown))
    return kinds


def TABLES(text: str) -> list[str]:  # noqa: N802 - an argparse type, named like the others
    """``sql-ask --tables``: comma-separated table names (a comma inside double quotes is part of a name), at least
    one: a list that names none would ask about no table, not about every one (that is --tables left out)."""
    try:
        names = split_list(text)
    except NotAName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not names:
        raise argparse.ArgumentTypeError("names no table: name the tables it may read, comma-separated, or leave "
                                         "--tables out for every table of the schema that the reader role may read")
    return names


def SCHEMA(text: str) -> str:  # noqa: N802 - an argparse type, named like the others
    """``sql-ask --schema``: a schema name, as written (blank: refused before its question is asked)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: name the schema of the question's tables (default public)")
    return text


def ENCODING(name: str) -> str:  # noqa: N802 - an argparse type, named like the others
    """A codec Python knows (``ingest --encoding``), by its canonical name."""
    try:
        b"x".decode(name)  # a text encoding, not base64 or rot13 (which lookup() knows too; b"" is not checked)
    except UnicodeError:
        pass  # a text encoding that x alone does not decode in (utf-16)
    except LookupError:
        raise argparse.ArgumentTypeError(f"not a text encoding Python knows: {name!r}") from None
    return codecs.lookup(name).name
