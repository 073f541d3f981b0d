"""The query-side trainer's softmax pool: every chunk in a small corpus; in a large one the positives, each
query's hardest chunks and a random rest, within the size."""

from __future__ import annotations

import numpy as np

from pgsynapse.learning.train import negative_pool, pick_positives, soft_targets


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


def test_the_teacher_picks_each_examples_positive_among_its_documents_chunks():
    # two documents: chunks 0-2 and 3-4; the base model prefers chunk 0 and 3, the teacher chunk 2 and 4
    base_scores = np.array([[0.9, 0.5, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.8, 0.2]], dtype=np.float32)
    teacher_vecs = np.eye(5, dtype=np.float32)
    teacher_q = np.array([[0.0, 0.3, 0.9, 1.0, 0.0], [1.0, 0.0, 0.0, 0.1, 0.7]], dtype=np.float32)
    candidates = [[0, 1, 2], [3, 4]]
    assert pick_positives(candidates, base_scores) == [0, 3]
    # the teacher's best chunk *of the document*: chunk 3 scores higher for the first question, but is not its page's
    assert pick_positives(candidates, base_scores, teacher_q, teacher_vecs) == [2, 4]


def test_soft_targets_are_the_teachers_distribution_over_its_best_chunks():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(40, 8)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    qv = pool[[5, 17]] + 0.01
    idx, prob = soft_targets(qv, pool, 20.0, 6, block=1)
    assert idx.shape == prob.shape == (2, 6)
    assert np.allclose(prob.sum(1), 1.0) and (prob > 0).all()
    for k, (row, best) in enumerate(zip(idx, (5, 17), strict=True)):
        assert best in row.tolist()
        assert set(row.tolist()) == set(np.argsort(-(qv @ pool.T)[k])[:6].tolist())
    assert idx[0][int(np.argmax(prob[0]))] == 5 and idx[1][int(np.argmax(prob[1]))] == 17
    # a softmax: probabilities in the order of the teacher's scores
    order = np.argsort(-prob[0])
    assert np.all(np.diff((qv[0] @ pool.T)[idx[0][order]]) <= 0)
