"""Hybrid retrieval: a question's kNN candidates fused with its full-text candidates, for answers and for search.

Both the answer handler and ``pgsynapse search`` fetch their kNN rows (each with ``chunk_id`` and ``score``, the
cosine similarity) and call :func:`fuse_full_text`, so a search shows the passages an answer would be written from.
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
import psycopg

from pgsynapse.logs import get_logger
from pgsynapse.metrics import KNN_EXACT_SCANS
from pgsynapse.queries import q

log = get_logger(__name__)

RRF_K = 60
CANDIDATES_FACTOR = 3  # hybrid: each list fetches this many times the chunks kept
TRAP_PROBE = 2  # the kNN fetches at least this many rows, so that a trap (all one vector) shows even for k=1

# a question that refers back to the conversation: it opens by going on from the last turn, or leans on it for
# its subject ("how do I undo it?", "what about indexes?", "and for views?", "any example?")
_GOES_ON = re.compile(r"^\W*(and|but|or|so|then|also|what about|how about|same|ok|okay)\b", re.I)
_LEANS_ON = re.compile(r"\b(it|its|it's|they|them|their|theirs|this|these|those|one|ones|same|such|above|former|"
                       r"latter|else|more|instead|too|again|other|another|previous|earlier|example)\b", re.I)
_WORD = re.compile(r"\w+")
SHORT_QUESTION_WORDS = 3  # "why?", "an example?", "in psql?": too short to stand alone


def refers_back(question: str) -> bool:
    """Whether ``question`` goes on from the conversation, rather than asking about something new: a follow-up is
    retrieved with the previous question (:func:`query_with_context`), a new topic in the same session on its own
    ("How do I make a column unique?" after a question about savepoints was searched with both)."""
    return (bool(_GOES_ON.search(question)) or bool(_LEANS_ON.search(question))
            or len(_WORD.findall(question)) <= SHORT_QUESTION_WORDS)


CONTEXT_TURNS = 3  # at most this many earlier questions go with a follow-up


def query_with_context(question: str, previous: list[str]) -> str:
    """What a question is searched with: a follow-up with the earlier questions of its session (oldest first in
    ``previous``) back to the one that set the topic, the last that stood on its own ("How do I make a column
    unique?", "can it cover only some rows?", "and how do I drop it?": the third is about the unique constraint)."""
    if not previous or not refers_back(question):
        return question
    chain: list[str] = []
    for earlier in reversed(previous[-CONTEXT_TURNS:]):
        chain.insert(0, earlier)
        if not refers_back(earlier):
            break
    return " ".join([*chain, question])


def trapped(rows: list[dict[str, Any]]) -> bool:
    """Whether the kNN's rows are all one vector (one score): the HNSW search may be trapped among copies of it."""
    return len(rows) >= TRAP_PROBE and len({float(r["score"]) for r in rows}) == 1


async def knn(conn: psycopg.AsyncConnection, sql: str, query_vector: np.ndarray, version_id: int, k: int
              ) -> list[dict[str, Any]]:
    """The ``k`` nearest chunks of ``sql`` (vector_candidates or search_chunks: the HNSW index), nearest first.
    When its nearest are all one vector, hundreds of copies of it (a crawl's boilerplate pages, one identical chunk
    each) may have trapped the HNSW search: it then scans exactly (``exact_candidates``), logged. A kNN whose rows
    differ, every normal search, runs the one index query."""
    params = {"query": query_vector, "version": version_id, "k": max(k, TRAP_PROBE)}
    rows = list(await (await conn.execute(sql, params)).fetchall())
    if not trapped(rows):
        return rows[:k]
    start = time.perf_counter()
    exact = list(await (await conn.execute(q("exact_candidates", "answers.sql"), params)).fetchall())
    KNN_EXACT_SCANS.labels(str(version_id)).inc()
    log.warning("knn_trapped_exact_scan", version=version_id, k=params["k"], copies=len(rows),
                chunk=rows[0]["chunk_id"], document=rows[0]["document_id"], score=round(float(rows[0]["score"]), 4),
                found=sum(r["score"] != rows[0]["score"] for r in exact), ms=round((time.perf_counter() - start) * 1000, 1))
    return exact[:k]


def rrf_scores(rankings: list[list[int]], weights: list[float] | None = None, k: int = RRF_K) -> dict[int, float]:
    """Weighted reciprocal-rank fusion of several rankings of chunk ids: each chunk's score, the sum over rankings of
    weight / (k + its rank), in first-seen order (the first ranking's first)."""
    score: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights or [1.0] * len(rankings), strict=True):
        for r, cid in enumerate(ranking):
            score[cid] = score.get(cid, 0.0) + weight / (k + r + 1)
    return score


def rrf(rankings: list[list[int]], weights: list[float] | None = None, k: int = RRF_K) -> list[int]:
    """The chunk ids of several rankings, best first by :func:`rrf_scores`; ties keep the first ranking's order."""
    score = rrf_scores(rankings, weights, k)
    return sorted(score, key=lambda c: -score[c])


async def fuse_full_text(conn: psycopg.AsyncConnection, version_id: int, query_vector: np.ndarray, text: str,
                         vec_rows: list[dict[str, Any]], k: int, text_weight: float, max_rows: int
                         ) -> tuple[list[int], dict[int, dict[str, Any]]]:
    """``vec_rows`` (the kNN, nearest first) fused with the ``k`` best full-text matches of ``text``, a full-text
    rank weighing ``text_weight`` of a vector rank, and about ``max_rows`` chunks ranked at most (``text_candidates``
    in answers.sql). Returns the fused chunk ids and each one's row; a full-text hit the kNN did not return gets its
    own cosine score (and drops out when it has no vector of this version)."""
    by_id = {r["chunk_id"]: r for r in vec_rows}
    text_rows = list(await (await conn.execute(q("text_candidates", "answers.sql"),
                                               {"text": text, "k": k, "max_rows": max_rows})).fetchall())
    missing = [r["chunk_id"] for r in text_rows if r["chunk_id"] not in by_id]
    if missing:
        scores = {r["chunk_id"]: float(r["score"]) for r in await (await conn.execute(
            q("chunk_scores", "answers.sql"), {"version": version_id, "ids": missing, "query": query_vector})).fetchall()}
        for r in text_rows:
            if r["chunk_id"] in scores:
                by_id[r["chunk_id"]] = {**r, "score": scores[r["chunk_id"]]}
    order = rrf([[r["chunk_id"] for r in vec_rows], [r["chunk_id"] for r in text_rows if r["chunk_id"] in by_id]],
                [1.0, text_weight])
    return order, by_id
