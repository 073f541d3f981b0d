"""Every setting is documented with its default: a row of a settings table in README.md or docs/*.md names it.

A setting found only in src/pgsynapse/config.py (PGSYNAPSE_ANSWER_TOP_K, the retrieval's top-k, was in no table) is
one a user cannot find, and a table whose default differs from the code's misleads."""

from __future__ import annotations

import re
from pathlib import Path

from pgsynapse.config import Settings

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _table_rows(defaults_only: bool = False) -> list[tuple[str, str, str]]:
    """(file, first cell, second cell) of every settings table row: a row whose first cell names a setting
    (``defaults_only``: of the tables whose second column is the default)."""
    rows = []
    for path in DOCS:
        header = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if len(cells) >= 3 and not cells[0].startswith(("`", "-")):
                header = cells[1]
            if len(cells) >= 3 and cells[0].startswith("`") and (header == "default" or not defaults_only):
                rows.append((path.name, cells[0], cells[1]))
    return rows


def _names(cell: str) -> list[str]:
    """The settings a first cell names: `PGSYNAPSE_BATCH_SIZE`, `_CHUNK_OVERLAP` (of the row's prefix), `lease_seconds`."""
    names = []
    for token in re.findall(r"`([A-Za-z_]+)`", cell):
        if token.startswith("PGSYNAPSE_"):
            names.append(token.removeprefix("PGSYNAPSE_").lower())
        elif token.startswith("_"):
            names.append(token[1:].lower())
        else:
            names.append(token.lower() if token.isupper() else token)
    return names


def test_every_setting_is_in_a_settings_table():
    documented = {name for _, first, _ in _table_rows() for name in _names(first)}
    missing = [name for name in Settings.model_fields if name not in documented]
    assert not missing, f"settings in no table of README.md or docs/*.md: {missing}"


def test_a_table_of_one_setting_gives_the_code_default():
    # rows of one setting whose default is a plain number or word: the code's default, as the table writes it
    wrong, checked = [], 0
    for file, first, default in _table_rows(defaults_only=True):
        names = [n for n in _names(first) if n in Settings.model_fields]
        if len(names) != 1 or not re.fullmatch(r"`?[\w.-]+`?", default):
            continue
        value, checked = Settings.model_fields[names[0]].default, checked + 1
        shown = default.strip("`")
        if shown in ("none", "off") and not value:
            continue
        if str(value).lower() != shown.lower() and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and _number(shown) == value):
            wrong.append((file, names[0], shown, value))
    assert checked >= 40, f"only {checked} rows of one setting and a default found: the tables' form changed?"
    assert not wrong, f"defaults that differ from the code's (file, setting, documented, code): {wrong}"


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None
