"""The text an export is checked and calibrated on: chunks of a corpus (the shipped docs by default), made as
the worker would make them, and real questions."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from pgsynapse.chunking import Chunk, Chunker
from pgsynapse.config import DEFAULT_SAMPLE_CHUNKS
from pgsynapse.errors import InputError


def _jsonl(path: Path, label: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each line of a JSONL file (gzip when it ends in .gz). A file that cannot be read
    or a line that is not a JSON object is an :class:`InputError` that names the file (after ``label``, the option
    that gave it) and the line."""
    name = f"{label} {path}" if label else str(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    raise InputError(f"{name}, line {n}: not a JSON object (JSONL: one object per line)")
                yield n, obj
    except (OSError, UnicodeDecodeError) as exc:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{name}: cannot read it: {getattr(exc, 'strerror', None) or exc}") from None


def _with_text(path: Path, label: str, key: str, what: str) -> Iterator[dict[str, Any]]:
    for n, obj in _jsonl(path, label):
        if not isinstance(obj.get(key), str):
            raise InputError(f'{label} {path}, line {n}: no "{key}" ({what}) in it')
        yield obj


def _pages(corpus: Path | None) -> list[dict[str, Any]]:
    if corpus is None:
        return [p for _, p in _jsonl(Path(str(resources.files("pgsynapse").joinpath("data", "demo_corpus.jsonl.gz"))))]
    return list(_with_text(corpus, "--corpus", "text", "a page's text"))


def _questions(paths: list[Path] | None) -> list[str]:
    return [d["q"] for p in paths or [] for d in _with_text(p, "--questions", "q", "a question's text")]


def check_sample_files(corpus: Path | None = None, questions: list[Path] | None = None) -> None:
    """Read the corpus and question files of ``model export`` before any work: a file it cannot read or a line it
    cannot take is an :class:`InputError` naming the option, the file and the line; so is a sample with no question
    to compare neighbours on (no question in the files, and pages with no title)."""
    pages = _pages(corpus)
    if not _questions(questions) and not any(p.get("title") for p in pages):
        given = f"--questions {', '.join(map(str, questions))} hold none and " if questions else ""
        raise InputError(f"no question for the agreement check: {given}the pages of --corpus {corpus} have no title; "
                         'give --questions FILE (JSONL, {"q": ...} per line) or give the pages titles')


def sample_texts(
    tokenizer: Any,
    *,
    corpus: Path | None = None,
    questions: list[Path] | None = None,
    n_chunks: int = DEFAULT_SAMPLE_CHUNKS,
    chunk_tokens: int = 256,
) -> tuple[list[str], list[str]]:
    """``(chunks, queries)``: chunks of the corpus (``{"title", "text"}`` per line; the shipped docs by default)
    as the worker would make them, and queries (``{"q"}`` per line; the page titles when no file is given)."""
    pages = _pages(corpus)
    chunker = Chunker(tokenizer, chunk_tokens, 32)
    # every page contributes its first chunks, round-robin, so the sample spans the corpus
    per_page = [_chunks(chunker, p) for p in pages[: max(1, n_chunks)]]
    chunks: list[str] = []
    depth = 0
    while len(chunks) < n_chunks and any(len(c) > depth for c in per_page):
        chunks.extend(c[depth].embed_text for c in per_page if len(c) > depth)
        depth += 1
    chunks = chunks[:n_chunks]
    queries = _questions(questions)
    if not queries:
        queries = [p["title"] for p in pages if p.get("title")]
    return chunks, queries


def _chunks(chunker: Chunker, page: dict[str, Any]) -> list[Chunk]:
    """A page's chunks as the worker makes them; none for a page the worker would fail (no text the model reads)."""
    try:
        return chunker.split(page.get("title"), page["text"][:20_000])
    except InputError:
        return []
