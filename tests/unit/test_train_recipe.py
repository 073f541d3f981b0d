"""The query-side trainer's softmax pool: every chunk in a small corpus; in a large one the positives, each
query's hardest chunks and a random rest, within the size."""

from __future__ import annotations

import numpy as np

from pgsynapse.learning.train import negative_pool


def test_a_small_corpus_uses_every_chunk():
    scores = np.random.default_rng(0).random((3, 50)).astype(np.float32)
    assert negative_pool(50, {7}, scores, 100, 0).tolist() == list(range(50))


def test_a_large_corpus_keeps_positives_and_hardest_chunks_within_the_size():
    rng = np.random.default_rng(1)
    scores = rng.random((4, 5000)).astype(np.float32)
    hardest = {int(np.argmax(row)) for row in scores}
    pool = negative_pool(5000, {3, 4999}, scores, 1000, 0)
    assert len(pool) == 1000 and len(set(pool.tolist())) == 1000
    assert {3, 4999} <= set(pool.tolist()) and hardest <= set(pool.tolist())
    assert np.all(np.diff(pool) > 0)
    assert negative_pool(5000, {3, 4999}, scores, 1000, 0).tolist() == pool.tolist()  # deterministic per seed
