"""Token-aware chunking with the model's own tokenizer.

A chunk is a span of the original body (so passages quote the source exactly); the embedded text is
``title + "\n" + chunk``, and its token count, special tokens included, never exceeds the limit.
Chunk ends snap back to a paragraph or sentence break when one is near, so passages read well.

A chunk's token count is that of its embedded text tokenized on its own. With a BERT-style tokenizer (each word
tokenized alone) a chunk that starts and ends on word boundaries has exactly the body's tokens over its span,
so its count is known without tokenizing it again (about half of the chunker's time); any other chunk, and
every chunk of any other tokenizer, is tokenized again to count.

A token that spans more than :data:`MAX_TOKEN_CHARS` characters is in no chunk: it is a run without a space or
punctuation (a hex or base64 dump, a script the tokenizer does not know), which a WordPiece tokenizer reads as one
unknown token, and a chunk holding it held all of it (a 2 MB body was one chunk of 6 tokens). Chunks break around
it; a body with nothing else fails with :class:`InputError`.

Identical chunks of one document (a body of a word or a paragraph repeated: windows that cut the same text) are
stored once, by :func:`distinct`: they carry nothing new for retrieval, and hundreds of identical vectors trap an
HNSW search among them (ef_search 40 finds none of the others' chunks, however near).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, replace
from typing import Any

from pgsynapse.errors import InputError

MAX_TITLE_TOKENS = 32
MAX_TOKEN_CHARS = 100  # WordPiece's max_input_chars_per_word: a longer word is one [UNK]


@dataclass(frozen=True)
class Chunk:
    ord: int
    text: str  # the passage, a slice of the body
    embed_text: str  # what the model sees
    token_count: int  # tokens of embed_text, special tokens included
    char_start: int
    char_end: int


def _break_score(body: str, pos: int) -> int:
    """How good a place ``pos`` (a char offset where a token starts) is to end a chunk."""
    before = body[max(0, pos - 2) : pos]
    if before.endswith("\n\n") or "\n\n" in before:
        return 3
    if before.endswith("\n"):
        return 2
    if before[-2:-1] in {".", "!", "?", ":", ";"} and before.endswith(" "):
        return 2
    return 0


class Chunker:
    def __init__(self, tokenizer: Any, max_tokens: int, overlap: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap = overlap
        self.specials = len(tokenizer("", add_special_tokens=True)["input_ids"])
        self._words = _word_local(tokenizer)

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])

    def _title_prefix(self, title: str | None) -> str:
        title = " ".join((title or "").split())
        if not title:
            return ""
        enc = self.tokenizer(title, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        if len(enc["input_ids"]) > MAX_TITLE_TOKENS:
            title = title[: enc["offset_mapping"][MAX_TITLE_TOKENS - 1][1]]
        return title + "\n"

    def embed_text(self, title: str | None, passage: str) -> str:
        """What the model sees for a stored passage: the same title prefix as at chunking time."""
        return self._title_prefix(title) + passage

    def split(self, title: str | None, body: str | None) -> list[Chunk]:
        body = body or ""
        if not body.strip():
            return []
        prefix = self._title_prefix(title)
        prefix_tokens = self._count(prefix) - self.specials if prefix else 0
        budget = max(self.max_tokens - self.specials - prefix_tokens, 8)
        words: list[int | None] | None = None
        if self._words is not None:
            enc = self._words.encode(body, add_special_tokens=False)
            offsets: list[tuple[int, int]] = enc.offsets
            words = enc.word_ids
        else:
            enc = self.tokenizer(body, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
            offsets = [tuple(o) for o in enc["offset_mapping"]]
        n = len(offsets)
        blobs = [i for i, (a, b) in enumerate(offsets) if b - a > MAX_TOKEN_CHARS]
        if blobs and len(blobs) == n:
            raise InputError(f"the body has no text the model reads: {n} run(s) of over {MAX_TOKEN_CHARS} characters "
                             "without a space or punctuation, each one unknown token to its tokenizer")

        def known(start: int, end: int) -> int | None:
            """The chunk's count when its span starts and ends on word boundaries (see the module docstring)."""
            if words is None:
                return None
            if (start > 0 and words[start] == words[start - 1]) or (end < n and words[end] == words[end - 1]):
                return None  # the span cuts a word
            return self.specials + prefix_tokens + end - start

        chunks: list[Chunk] = []
        start = 0
        overlap = min(self.overlap, budget // 4)
        while start < n:
            if blobs and offsets[start][1] - offsets[start][0] > MAX_TOKEN_CHARS:
                start += 1  # in no chunk
                continue
            k = bisect_left(blobs, start)
            stop = blobs[k] if k < len(blobs) else n  # the chunk ends before the next blob, or at the end
            end = min(start + budget, stop)
            if end < stop:
                # snap back to a good break in the last third of the window
                best, best_score = end, 0
                floor = start + (2 * budget) // 3
                for i in range(end, floor, -1):
                    score = _break_score(body, offsets[i][0])
                    if score > best_score:
                        best, best_score = i, score
                        if score == 3:
                            break
                end = best
            chunk = self._make(prefix, body, offsets, start, end, len(chunks), known(start, end))
            # decoding boundaries can merge tokens differently: shrink until it fits
            while chunk.token_count > self.max_tokens and end - start > 1:
                end -= max(1, (chunk.token_count - self.max_tokens))
                chunk = self._make(prefix, body, offsets, start, end, len(chunks), known(start, end))
            if chunk.text.strip():
                chunks.append(chunk)
            if end >= n:
                break
            start = end if end == stop else max(end - overlap, start + 1)  # no overlap across a blob
        return chunks

    def _make(self, prefix: str, body: str, offsets: list[tuple[int, int]], start: int, end: int, ord_: int,
              count: int | None) -> Chunk:
        c0, c1 = offsets[start][0], offsets[end - 1][1]
        text = body[c0:c1]
        embed_text = prefix + text
        return Chunk(ord_, text, embed_text, self._count(embed_text) if count is None else count, c0, c1)


def distinct(chunks: list[Chunk]) -> list[Chunk]:
    """The first of each chunk text, in order, numbered again from 0 (``ord`` stays the chunk's rank among the
    document's stored chunks, as after a blank window; ``char_start`` and ``char_end`` still say where it is)."""
    seen: set[str] = set()
    out: list[Chunk] = []
    for c in chunks:
        if c.text not in seen:
            seen.add(c.text)
            out.append(c if c.ord == len(out) else replace(c, ord=len(out)))
    return out


def _word_local(tokenizer: Any) -> Any:
    """``tokenizer``'s ``tokenizers.Tokenizer`` when it is BERT-style: a character-wise normaliser, words split
    on whitespace and punctuation, and WordPiece on each word alone. Then the tokens of a span that starts and
    ends on word boundaries are the whole text's tokens over that span. ``None`` for any other tokenizer."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "model"):
        return None
    kinds = (type(backend.model).__name__, type(backend.pre_tokenizer).__name__, type(backend.normalizer).__name__)
    return backend if kinds == ("WordPiece", "BertPreTokenizer", "BertNormalizer") else None
