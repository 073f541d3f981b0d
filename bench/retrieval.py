"""Page-level retrieval quality through the product's own retrieval path (the answer handler's)."""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg.rows import dict_row

from pgsynapse.config import load_settings
from pgsynapse.handlers.answer import AnswerHandler, AnswerWork
from pgsynapse.handlers.base import Job
from pgsynapse.learning.gate import ranking_scores
from pgsynapse.learning.metrics import ranked_documents
from pgsynapse.models import ModelCache


async def retrieve_pages(url: str, questions: list[str], *, version: dict[str, Any], hybrid: bool,
                         models: ModelCache, depth: int = 40) -> list[list[str]]:
    """For each question, the distinct page sources in rank order (first 10)."""
    settings = load_settings(environ={}, database_url=url, answer_top_k=depth, hybrid=hybrid)
    handler = AnswerHandler(settings, models)
    embedder = await anyio.to_thread.run_sync(models.get, version)
    vecs = await anyio.to_thread.run_sync(embedder.encode, questions)
    out = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        conn.row_factory = dict_row
        await register_vector_async(conn)
        for text, v in zip(questions, vecs, strict=True):
            w = AnswerWork(Job(0, "answer", 0, {}, 1, None), text, None, version, [], text, v)  # type: ignore[arg-type]
            passages = await handler._retrieve(conn, w)
            pages: list[str] = []
            for p in passages:
                if p.source not in pages:
                    pages.append(p.source)
            out.append(pages[:10])
    return out


def score(ranked: list[list[str]], relevant: list[set[str]], k: int = 5) -> dict[str, float]:
    per = ranking_scores(ranked, relevant, k)
    n = len(relevant)
    return {"recall@5": round(100 * sum(per["hit"]) / n, 1), "mrr@10": round(sum(per["rr"]) / n, 3), "questions": n}


def ranked_pages(query_vecs: np.ndarray, chunk_vecs: np.ndarray, chunk_pages: list[str]) -> list[list[str]]:
    """Each question's first 10 distinct pages by exact kNN over the chunk vectors."""
    return [ranked_documents(row, chunk_pages, 10) for row in query_vecs @ chunk_vecs.T]


def vectors_recall(query_vecs: np.ndarray, chunk_vecs: np.ndarray, chunk_pages: list[str],
                   relevant: list[set[str]]) -> dict[str, float]:
    """The same page-level metrics from raw vectors (exact kNN), for a model not in the database."""
    return score(ranked_pages(query_vecs, chunk_vecs, chunk_pages), relevant)
