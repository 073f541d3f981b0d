"""The SQL examples of README.md and docs/*.md that wait for a notification LISTEN before they write.

A NOTIFY reaches only the sessions that listened before its commit: an example that INSERTs and then LISTENs
misses the notification whenever the worker is faster than the reader typing the next line (the README's first
psql example did, and the document was embedded before its LISTEN ran)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _sql_blocks() -> list[tuple[str, str]]:
    return [(path.name, block) for path in DOCS
            for block in re.findall(r"```sql\n(.*?)```", path.read_text(encoding="utf-8"), re.S)]


def test_every_sql_example_that_listens_listens_before_it_writes():
    late = []
    for name, block in _sql_blocks():
        statements = [line for line in block.splitlines() if not line.lstrip().startswith("--")]
        listen = next((k for k, line in enumerate(statements) if line.lstrip().upper().startswith("LISTEN ")), None)
        write = next((k for k, line in enumerate(statements)
                      if re.match(r"\s*(INSERT INTO|UPDATE|COPY) pgsynapse\.", line, re.I)), None)
        if listen is not None and write is not None and write < listen:
            late.append((name, statements[write].strip()))
    assert not late, f"these examples write before they LISTEN: {late}"


def test_the_examples_checked_are_there():
    listening = [name for name, block in _sql_blocks() if "LISTEN pgsynapse_" in block]
    assert "README.md" in listening and "sql.md" in listening
