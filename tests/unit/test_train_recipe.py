"""The query-side trainer's parts: the softmax pool (every chunk in a small corpus; in a large one the positives,
each query's hardest chunks and a random rest, within the size), the teacher's positives and soft targets, and the
interpolation of the fine-tuned weights towards the base model's, and the soup of several runs."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from pgsynapse.learning.train import (
    Teacher,
    TrainSpec,
    average_weights,
    fit,
    interpolate_weights,
    negative_pool,
    pick_positives,
    soft_targets,
)
from tests.embed_models import tiny_embedding_model


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


def test_interpolation_moves_every_weight_back_towards_the_base_model(tmp_path):
    # two tiny models of one architecture with different random weights: the "fine-tuned" one and the base
    tuned = SentenceTransformer(str(tiny_embedding_model(tmp_path / "tuned", 16, seed=1)), device="cpu")
    base = SentenceTransformer(str(tiny_embedding_model(tmp_path / "base", 16, seed=2)), device="cpu")
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    theirs = base.state_dict()
    interpolate_weights(tuned, base, 0.25)
    after = tuned.state_dict()
    moved = 0
    for name, w in after.items():
        if w.is_floating_point():
            assert torch.allclose(w, 0.25 * before[name] + 0.75 * theirs[name], atol=1e-6), name
            moved += int(not torch.equal(before[name], theirs[name]))
        else:  # position ids and the like are not weights
            assert torch.equal(w, before[name]), name
    assert moved > 10  # the two models really differed, so the check above could fail
    # the model in use changed, not a copy: its question vectors are now between the two models'
    text = ["how do I roll back part of a transaction"]
    assert not np.allclose(tuned.encode(text), SentenceTransformer(str(tmp_path / "tuned"), device="cpu").encode(text))


def test_interpolation_at_the_ends_and_out_of_range(tmp_path):
    tuned = SentenceTransformer(str(tiny_embedding_model(tmp_path / "tuned", 16, seed=1)), device="cpu")
    base = SentenceTransformer(str(tiny_embedding_model(tmp_path / "base", 16, seed=2)), device="cpu")
    text = ["what does vacuum do"]
    interpolate_weights(tuned, base, 0.0)
    assert np.allclose(tuned.encode(text), base.encode(text), atol=1e-6)
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        interpolate_weights(tuned, base, 1.5)


def test_a_soup_is_the_mean_of_its_models_weights(tmp_path):
    models = [SentenceTransformer(str(tiny_embedding_model(tmp_path / f"m{i}", 16, seed=i)), device="cpu")
              for i in range(3)]
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    average_weights(models[0], models[1:])
    floats = 0
    for name, w in models[0].state_dict().items():
        if w.is_floating_point():
            assert torch.allclose(w, sum(st[name] for st in states) / 3, atol=1e-6), name
            floats += int(not torch.equal(states[0][name], states[1][name]))
        else:
            assert torch.equal(w, states[0][name]), name
    assert floats > 10
    for other, st in zip(models[1:], states[1:], strict=True):  # the others are read, not changed
        assert all(torch.equal(v, st[k]) for k, v in other.state_dict().items())


class CountingEncoder:
    """A model whose ``encode`` calls are counted (the texts of each call kept); everything else is the model's."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def encode(self, texts, **kwargs):
        self.calls.append(list(texts))
        return self.model.encode(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_a_soup_encodes_the_questions_once_for_all_its_runs(tmp_path):
    path = tiny_embedding_model(tmp_path / "base", 16, seed=0)
    base = CountingEncoder(SentenceTransformer(str(path), device="cpu"))
    teacher_model = CountingEncoder(SentenceTransformer(str(tiny_embedding_model(tmp_path / "t", 16, seed=3)),
                                                        device="cpu"))
    rng = np.random.default_rng(0)
    chunk_vecs = rng.normal(size=(12, 16)).astype(np.float32)
    chunk_vecs /= np.linalg.norm(chunk_vecs, axis=1, keepdims=True)
    items = [(f"how do I use feature {i}", i % 4, [3 * (i % 4), 3 * (i % 4) + 1, 3 * (i % 4) + 2]) for i in range(8)]
    spec = TrainSpec(url="", base_version=1, base_path=str(path), out_dir=str(tmp_path / "out"), soup=3,
                     batch_size=4, teacher_weight=0.5, teacher_top=4)
    result = fit(spec, base, items, chunk_vecs, time.time(), "t",
                 Teacher(teacher_model, chunk_vecs.copy()))
    # three runs of two steps each, averaged; the base model and the teacher each read the questions once
    assert result.steps == 6 and result.examples == 8
    assert base.calls == [[q for q, _d, _c in items]]
    assert teacher_model.calls == [[q for q, _d, _c in items]]


def _two_layer_fit(tmp_path, freeze_layers: int):
    """``fit`` of a 2-layer model on four questions, each with its own chunk, with ``freeze_layers`` frozen: the base
    model and the call (to run, or to expect an error from)."""
    path = tiny_embedding_model(tmp_path / "base", 16, seed=0, layers=2)
    base = SentenceTransformer(str(path), device="cpu")
    items = [(f"how do I use feature {i}", i, [i]) for i in range(4)]
    spec = TrainSpec(url="", base_version=1, base_path=str(path), out_dir=str(tmp_path / "out"), batch_size=2,
                     freeze_layers=freeze_layers)
    return base, lambda: fit(spec, base, items, np.eye(4, 16, dtype=np.float32), time.time(), "t")


@pytest.mark.parametrize("freeze", [2, 5])
def test_freezing_every_layer_is_refused_with_what_can_be_frozen(tmp_path, freeze):
    """retrain_freeze_layers at or above the model's depth leaves nothing to train: a clear error, not torch's
    "element 0 of tensors does not require grad" from the first step."""
    _, run = _two_layer_fit(tmp_path, freeze)
    with pytest.raises(ValueError, match=r"retrain_freeze_layers = %d freezes all 2 layers.*at most 1" % freeze):
        run()
    assert not (tmp_path / "out").exists()


def test_freezing_some_layers_trains_the_rest(tmp_path):
    base, run = _two_layer_fit(tmp_path, 1)
    result = run()
    assert result.steps == 2
    before, after = base[0].auto_model, result.model[0].auto_model
    assert torch.equal(before.encoder.layer[0].output.dense.weight, after.encoder.layer[0].output.dense.weight)
    assert not torch.equal(before.encoder.layer[1].output.dense.weight, after.encoder.layer[1].output.dense.weight)
