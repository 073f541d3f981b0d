"""Every named query the code asks for by a literal name exists in its .sql file. A query renamed or moved (the
SQL models' registry queries moved to side_models.sql) leaves no KeyError to be found at run time, in a job's
load, where it shows as a lease that expires."""

from __future__ import annotations

import ast
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


# a statement written in a module instead of its .sql file: a string that starts the way SQL the code sends does
# (keywords alone, as the safety check's lists of them, do not match: something must follow)
_STATEMENT = re.compile(r"^\s*(?:SELECT\s+\S|INSERT\s+INTO\s|UPDATE\s+\S+\s+SET\s|DELETE\s+FROM\s|WITH\s+\w+\s+AS\s"
                        r"|LOCK\s+TABLE\s|CREATE\s+(?:TABLE|SCHEMA|INDEX|VIEW)\s+\S|SET\s+(?:LOCAL|TRANSACTION|SESSION)\s)")


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def test_no_statement_is_written_inline():
    """The code's SQL lives in src/pgsynapse/sql/*.sql, by name (the project's layout rule): one place to read and
    review what is sent, and one copy of each statement. Session 26 found 65 in the modules, several
    twice (the active version's row, the models' NOTIFY, a version's index)."""
    inline = []
    for folder in ("src/pgsynapse", "handlers", "listener", "triggers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            skip = _docstrings(tree)
            inline += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.strip()[:60]}" for node in ast.walk(tree)
                       if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                       and _STATEMENT.match(node.value)]
    assert inline == []


def test_the_inline_check_sees_a_statement():
    assert _STATEMENT.match("SELECT * FROM pgsynapse.model_versions WHERE id = %s")
    assert _STATEMENT.match(" LOCK TABLE pgsynapse.model_versions IN SHARE ROW EXCLUSIVE MODE")
    assert _STATEMENT.match("UPDATE pgsynapse.jobs SET status = 'done'")
    assert not _STATEMENT.match("SELECT")  # a keyword in a list (textsql.safety)
    assert not _STATEMENT.match("CREATE TABLE ")  # the schema prompt's DDL, built a piece at a time
    assert not _STATEMENT.match("Select the rows that answer the question.")  # prose
