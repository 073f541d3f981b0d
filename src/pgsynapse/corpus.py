"""Demo corpora: Debian's PostgreSQL HTML docs when installed, else the pages this package ships."""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pgsynapse.textextract import html_to_text


@dataclass(frozen=True)
class Page:
    source: str
    title: str
    text: str


def shipped_pages() -> Iterator[Page]:
    with resources.files("pgsynapse").joinpath("data", "demo_corpus.jsonl.gz").open("rb") as raw:
        with gzip.open(raw, "rt", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                yield Page(d["id"], d["title"], d["text"])


def debian_html_dir() -> Path | None:
    dirs = sorted(glob.glob("/usr/share/doc/postgresql-doc-*/html"))
    return Path(dirs[-1]) if dirs else None


def html_pages(directory: Path, limit: int, prefer: list[str]) -> Iterator[Page]:
    files = {p.name: p for p in directory.glob("*.html")}
    order = [n for n in prefer if n in files] + sorted(n for n in files if n not in set(prefer))
    n = 0
    for name in order:
        if n >= limit:
            break
        title, text = html_to_text(files[name].read_text(encoding="utf-8", errors="replace"))
        if len(text) < 300:
            continue
        n += 1
        yield Page(name, title, text)


def demo_pages(limit: int) -> tuple[str, list[Page]]:
    """``(description, pages)``."""
    shipped = list(shipped_pages())
    directory = debian_html_dir()
    if directory is not None:
        return f"PostgreSQL docs from {directory}", list(html_pages(directory, limit, [p.source for p in shipped]))
    return "PostgreSQL docs shipped with pgsynapse", shipped[:limit]
