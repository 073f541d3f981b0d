"""Retrieval metrics at document level, shared by the trainer's gate and the benchmark."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ranked_documents(scores: np.ndarray, chunk_docs: Sequence[int], k: int = 10) -> list[int]:
    """The first ``k`` distinct documents when chunks are ranked by score."""
    return distinct_documents(np.argsort(-scores), chunk_docs, k)


def distinct_documents(order: Sequence[int], chunk_docs: Sequence[int], k: int = 10) -> list[int]:
    """The first ``k`` distinct documents of a ranking of chunk indices."""
    seen: list[int] = []
    for i in order:
        d = chunk_docs[int(i)]
        if d not in seen:
            seen.append(d)
            if len(seen) >= k:
                break
    return seen


def recall_mrr(
    queries: np.ndarray, chunks: np.ndarray, chunk_docs: Sequence[int], relevant: Sequence[set[int]], k: int = 5
) -> dict[str, float]:
    """recall@k and MRR@10 of normalised query vectors against normalised chunk vectors."""
    hits = 0
    rr = 0.0
    scores = queries @ chunks.T
    for row, rel in zip(scores, relevant, strict=True):
        ranked = ranked_documents(row, chunk_docs, 10)
        pos = next((i for i, d in enumerate(ranked) if d in rel), None)
        if pos is not None:
            rr += 1.0 / (pos + 1)
            hits += pos < k
    n = max(1, len(relevant))
    return {f"recall@{k}": hits / n, "mrr@10": rr / n, "n": len(relevant)}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def two_proportion_z(s1: int, n1: int, s2: int, n2: int) -> float:
    """z statistic of the difference of two proportions (pooled); 0 when undefined."""
    if n1 == 0 or n2 == 0:
        return 0.0
    p = (s1 + s2) / (n1 + n2)
    se = (p * (1 - p) * (1 / n1 + 1 / n2)) ** 0.5
    return 0.0 if se == 0 else (s1 / n1 - s2 / n2) / se
