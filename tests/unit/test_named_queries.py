"""Every named query the code asks for by a literal name exists in its .sql file. A query renamed or moved (the
SQL models' registry queries moved to side_models.sql) leaves no KeyError to be found at run time, in a job's
load, where it shows as a lease that expires."""

from __future__ import annotations

import re
from pathlib import Path

from pgsynapse.queries import _load

ROOT = Path(__file__).resolve().parents[2]
CALL = re.compile(r'\bq\(\s*"(\w+)"(?:\s*,\s*(?:"([\w.]+)"|(FILE)))?\s*\)')
FILE_CONST = re.compile(r'^FILE = "([\w.]+)"', re.MULTILINE)


def test_every_named_query_exists():
    missing, seen = [], 0
    for folder in ("src/pgsynapse", "handlers", "listener", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            const = FILE_CONST.search(text)
            for m in CALL.finditer(text):
                name, literal, by_const = m.groups()
                filename = literal or (const.group(1) if by_const and const else "queries.sql")
                seen += 1
                if name not in _load(filename):
                    missing.append(f"{path.relative_to(ROOT)}: {name} in {filename}")
    assert seen > 100  # the pattern still finds the calls
    assert missing == []


def test_a_query_is_sent_without_its_leading_comment():
    """pg_stat_activity keeps the first 1 kB of a query (track_activity_query_size): a leading comment sent along
    filled it, and an operator saw text_candidates' comment, not its SQL."""
    sql_dir = ROOT / "src/pgsynapse/sql"
    commented = 0
    for path in sorted(sql_dir.glob("*.sql")):
        for name, body in _load(path.name).items():
            assert not body.lstrip().startswith("--"), f"{path.name}: {name}"
            assert body.strip(), f"{path.name}: {name} is empty"
        commented += len(re.findall(r"^--\s*name:\s*\w+\s*\n--", path.read_text(), re.MULTILINE))
    assert commented > 10  # queries with a leading comment are there to be stripped
