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


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        for line in f:
            if line.strip():
                yield json.loads(line)


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
    if corpus is None:
        pages = list(_jsonl(Path(str(resources.files("pgsynapse").joinpath("data", "demo_corpus.jsonl.gz")))))
    else:
        pages = list(_jsonl(corpus))
    chunker = Chunker(tokenizer, chunk_tokens, 32)
    # every page contributes its first chunks, round-robin, so the sample spans the corpus
    per_page = [_chunks(chunker, p) for p in pages[: max(1, n_chunks)]]
    chunks: list[str] = []
    depth = 0
    while len(chunks) < n_chunks and any(len(c) > depth for c in per_page):
        chunks.extend(c[depth].embed_text for c in per_page if len(c) > depth)
        depth += 1
    chunks = chunks[:n_chunks]
    queries: list[str] = []
    for qp in questions or []:
        queries.extend(d["q"] for d in _jsonl(qp))
    if not queries:
        queries = [p["title"] for p in pages if p.get("title")]
    return chunks, queries


def _chunks(chunker: Chunker, page: dict[str, Any]) -> list[Chunk]:
    """A page's chunks as the worker makes them; none for a page the worker would fail (no text the model reads)."""
    try:
        return chunker.split(page.get("title"), page["text"][:20_000])
    except InputError:
        return []
