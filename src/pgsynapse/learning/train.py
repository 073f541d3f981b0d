"""Fine-tune a candidate query encoder from feedback, in its own process.

Run by the ``retrain`` handler as ``python -m pgsynapse.learning.train`` with the JSON spec on stdin (it holds the
database URL, password included: a pipe, never a file, argv or the environment); never inside a worker.
Reads training examples, chunks and the passage version's stored chunk vectors from the database (short
autocommit reads, no transaction held), writes the model and ``metrics.json`` into the output directory.

Recipe: **query-side fine-tuning** (see docs/learning.md for how it was chosen and what did not help).
- The chunks keep the vectors the passage version stored; only the encoder of questions is trained, starting
  from the passage version's own weights. The candidate is registered as a query encoder over those vectors
  (``model_versions.passage_version_id``): no corpus is encoded again, for training, evaluation or backfill.
- Each example's loss is a softmax over *every* chunk vector (or ``negative_pool`` of them in a large corpus:
  the positives, each query's hardest chunks under the base model, and a random rest), so every other page's
  passages are negatives, the hard ones included, at the cost of one matrix product.
- The positive is the best passage of the document the user marked helpful: under the **teacher** when there is
  one (``teacher_version``: a stronger model version with a vector for every chunk, e.g. the active ranker's;
  its pseudo-labels), else under the base model. Examples are the feedback plus corpus-only pairs (titles,
  "NAME — description" lines, numbered headings, configuration parameter entries -> their passage), which cover
  pages no user has asked about.
- ``anchor``: a pull towards the base model (squared distance of each query's vector to the base model's), so
  what it knew about questions nobody gave feedback on is not forgotten.
- ``interpolate``: after training, each weight is moved back towards the base model's, ``interpolate`` x the
  fine-tuned weight + (1 - ``interpolate``) x the base weight (WiSE-FT, Wortsman et al. 2022): a second pull
  towards the base model, on the weights rather than the outputs; 1 keeps the fine-tuned weights.
- AdamW with warm-up and linear decay, a wall-clock budget.
- ``soup``: the recipe runs that many times, each with its own seed (data order, initial state), and the
  candidate is the mean of their weights (a uniform model soup, Wortsman et al. 2022): one run's luck of the draw
  counts for less.
- Evaluation for the gate (learning/gate.py): a grouped hold-out of about ``heldout_fraction`` of the examples
  (whole groups of similar questions and their pages, learning/holdout.py) and the frozen canary set
  (learning/canary.py, whose documents give no corpus pairs), for the candidate and the active model on the same
  questions over the whole corpus: only questions are encoded, the chunk vectors are the stored ones.
"""

from __future__ import annotations

import json
import random
import re
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from pgsynapse.chunking import Chunker
from pgsynapse.learning.canary import ensure_canary
from pgsynapse.learning.gate import gate_metrics
from pgsynapse.learning.holdout import grouped_holdout
from pgsynapse.learning.trainer_process import progress as _progress, read_spec
from pgsynapse.models import ModelSpec, embedding_dimension, load_embedder, tokenized
from pgsynapse.queries import q


@dataclass
class TrainSpec:
    url: str
    base_version: int  # the passage version: its stored chunk vectors are searched, its weights start the encoder
    base_path: str
    out_dir: str
    active_path: str | None = None  # the active version's query encoder, compared at the gate (default: base)
    chunk_tokens: int = 256
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 32
    scale: float = 20.0
    anchor: float = 1.0
    interpolate: float = 1.0  # share of the fine-tuned weights kept; the rest is the base model's (WiSE-FT)
    soup: int = 1  # runs of the recipe (seeds seed, seed + 1000, ...) whose weights are averaged into one model
    negative_pool: int = 200_000
    freeze_layers: int = -2
    heldout_fraction: float = 0.2
    group_threshold: float = 0.85
    refit: bool = False  # after the gate's split, train the same recipe on every example: the registered model
    active_version: int | None = None  # the canary set, built by the first retrain, is frozen with it
    canary_size: int = 300
    synthetic_pairs: int = 4000
    exclude_documents: list[int] = field(default_factory=list)  # never used for corpus pairs (the canary set's)
    budget_seconds: float = 1800.0
    eval_k: int = 5
    seed: int = 0
    threads: int = 0
    # pseudo-labels from a stronger scorer: a model version with a vector for every chunk (``model add``,
    # backfilled), loaded as it serves (its runtime and artifact); it picks each example's positive passage among
    # its document's chunks and, with teacher_weight > 0, its distribution over the chunks is a soft target
    teacher_version: int | None = None
    teacher_path: str | None = None
    teacher_runtime: str = "torch"
    teacher_dim: int = 0
    teacher_weight: float = 0.0
    teacher_scale: float = 20.0
    teacher_top: int = 64  # the soft target keeps the teacher's most probable chunks (renormalised)
    extra: dict[str, Any] = field(default_factory=dict)


def _encode(model: Any, texts: list[str], batch_size: int = 64) -> np.ndarray:
    if not texts:
        return np.zeros((0, embedding_dimension(model)), dtype=np.float32)
    return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False).astype(np.float32)


def synthetic_pairs(docs: dict[int, tuple[str, str]], doc_chunks: dict[int, list[int]], texts: list[str],
                    n: int, seed: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[tuple[str, int, list[int]]]:
    """Corpus-only (query, document, candidate chunks) pairs from titles, 'NAME — description' lines,
    numbered section headings and configuration parameter entries. Uses no questions at all; the documents in
    ``exclude`` (the canary set's) give none."""
    out: list[tuple[str, int, list[int]]] = []
    for doc_id, (title, body) in docs.items():
        cids = doc_chunks.get(doc_id) or []
        if not cids or doc_id in exclude:
            continue
        lines = body.split("\n")
        t = re.sub(r"^([A-Z]\.|\d+\.)(\d+\.)*\s*", "", title or "").strip()
        m = re.match(r"^([A-Z][A-Z ]+) — (.+)$", lines[1]) if len(lines) > 1 else None
        if m:
            out.append((f"sql command to {m.group(2)}", doc_id, cids[:1]))
            out.append((f"{m.group(1)} syntax", doc_id, cids[:1]))
        elif t:
            out.append((t, doc_id, cids))
        for line in lines[2:]:
            h = re.match(r"^(?:[A-Z]\.|\d+\.)(?:\d+\.)+\s+(\S.{3,80})$", line)
            g = re.match(r"^([a-z_][a-z0-9_.]*) \((integer|boolean|string|enum|floating point|real)\)", line)
            q = h.group(1) if h else (f"what does the {g.group(1)} setting do" if g else None)
            if q:
                cc = [i for i in cids if line in texts[i]] or cids
                out.append((q, doc_id, cc))
    random.Random(seed).shuffle(out)
    return out[:n]


def load_data(spec: TrainSpec) -> dict[str, Any]:
    with psycopg.connect(spec.url, autocommit=True, prepare_threshold=None) as conn:  # db.NO_PREPARE
        examples = conn.execute(q("feedback_examples", "learning.sql")).fetchall()
        rows = conn.execute(q("train_chunks", "learning.sql")).fetchall()
        bodies = conn.execute(q("train_documents", "learning.sql")).fetchall()
        stored = stored_vectors(conn, spec.base_version)
        teacher = stored_vectors(conn, spec.teacher_version) if spec.teacher_version else None
        # the gate's canary set: built from the corpus by the first retrain, frozen after (learning/canary.py)
        built = ensure_canary(conn, spec.active_version, spec.canary_size)
        if built["built"]:
            _progress("canary_built", questions=built["questions"], version=spec.active_version)
        canary = conn.execute(q("canary_questions", "canary.sql")).fetchall()
    return {"examples": examples, "chunks": rows, "docs": {r[0]: (r[1], r[2]) for r in bodies},
            "stored": stored, "teacher_stored": teacher, "chunker": Chunker,
            "canary": [(question, doc) for question, doc in canary]}


def stored_vectors(conn: Any, version: int) -> dict[int, np.ndarray]:
    """A version's stored chunk vectors by chunk id."""
    rows = conn.execute(q("stored_vectors", "learning.sql"), {"version": version}).fetchall()
    return {cid: np.array(json.loads(v), dtype=np.float32) for cid, v in rows}


def negative_pool(n_chunks: int, must: set[int], scores: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The chunks of the softmax: all of them, or in a corpus over ``size`` the positives, each query's hardest
    chunks under the base model and a random rest."""
    if n_chunks <= size:
        return np.arange(n_chunks)
    keep = set(must)
    per_query = max(1, (size // 2) // max(1, len(scores)))
    for row in scores:
        keep.update(int(j) for j in np.argpartition(-row, per_query)[:per_query])
    rest = np.setdiff1d(np.arange(n_chunks), np.fromiter(keep, dtype=np.int64))
    rng = np.random.default_rng(seed)
    extra = rng.choice(rest, size=max(0, min(len(rest), size - len(keep))), replace=False)
    return np.sort(np.concatenate([np.fromiter(keep, dtype=np.int64), extra]))


@dataclass
class Fit:
    """One trained query encoder and how its training went."""

    model: Any
    steps: int
    stopped_early: bool
    seconds: float
    pool: int
    examples: int
    relabelled: int = 0  # examples whose positive the teacher moved to another chunk than the base model's


@dataclass
class Teacher:
    """A stronger scorer: its question encoder (an :class:`pgsynapse.models.Embedder`) and its stored vector of
    every chunk (rows in the chunks' order)."""

    model: Any
    chunk_vecs: np.ndarray


def soft_targets(teacher_q: np.ndarray, teacher_pool: np.ndarray, scale: float, top: int,
                 block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Each question's distribution under the teacher (softmax of ``scale`` x cosine) over its ``top`` most
    probable chunks of the pool, renormalised: (indices into the pool, probabilities), each (n, top)."""
    top = min(top, teacher_pool.shape[0])
    idx = np.zeros((len(teacher_q), top), dtype=np.int64)
    prob = np.zeros((len(teacher_q), top), dtype=np.float32)
    for b0 in range(0, len(teacher_q), block):
        logits = scale * (teacher_q[b0: b0 + block] @ teacher_pool.T)
        best = np.argpartition(-logits, top - 1, axis=1)[:, :top]
        kept = np.take_along_axis(logits, best, axis=1)
        kept = np.exp(kept - kept.max(axis=1, keepdims=True))
        idx[b0: b0 + block], prob[b0: b0 + block] = best, kept / kept.sum(axis=1, keepdims=True)
    return idx, prob


def pick_positives(candidates: list[list[int]], base_scores: np.ndarray, teacher_q: np.ndarray | None = None,
                   teacher_vecs: np.ndarray | None = None) -> list[int]:
    """Each example's positive: the chunk of its document (``candidates``: chunk rows) that scores best, under the
    teacher when there is one (its question vectors and its chunk vectors), else under the base model."""
    if teacher_q is None or teacher_vecs is None:
        return [int(c[int(np.argmax(base_scores[k][c]))]) for k, c in enumerate(candidates)]
    return [int(c[int(np.argmax(teacher_vecs[c] @ teacher_q[k]))]) for k, c in enumerate(candidates)]


def fit(spec: TrainSpec, base: Any, items: list[tuple[str, int, list[int]]], chunk_vecs: np.ndarray,
        started: float, label: str, teacher: Teacher | None = None) -> Fit:
    """Train a query encoder from the base weights on ``items`` (query, document, its chunks): a softmax over the
    chunk vectors (every one, or ``negative_pool`` of them) towards the document's best chunk under the base
    model (under the ``teacher`` when there is one), plus the anchor to the base model's question vectors, plus
    with a teacher its distribution over the same chunks as a soft target (``teacher_weight``). With ``soup`` > 1
    the recipe runs that many times (other seeds) and the weights are averaged; the questions are encoded by the
    base model (and the teacher) once for all the runs."""
    base_q = _encode(base, [it[0] for it in items])
    teacher_q = None if teacher is None else teacher.model.encode([it[0] for it in items], batch_size=64)
    if spec.soup <= 1:
        return _fit_once(spec, base, items, base_q, teacher_q, chunk_vecs, started, label, teacher)
    runs = [_fit_once(replace(spec, soup=1, seed=spec.seed + 1000 * i), base, items, base_q, teacher_q, chunk_vecs,
                      started, f"{label}.{i}", teacher) for i in range(spec.soup)]
    average_weights(runs[0].model, [r.model for r in runs[1:]])
    return Fit(runs[0].model, sum(r.steps for r in runs), any(r.stopped_early for r in runs),
               round(sum(r.seconds for r in runs), 1), runs[0].pool, runs[0].examples, runs[0].relabelled)


def _fit_once(spec: TrainSpec, base: Any, items: list[tuple[str, int, list[int]]], base_q: np.ndarray,
              teacher_q: np.ndarray | None, chunk_vecs: np.ndarray, started: float, label: str,
              teacher: Teacher | None) -> Fit:
    """One run of :func:`fit`'s recipe with ``spec.seed``; ``base_q`` and ``teacher_q``: the items' questions as
    the base model and the teacher encode them."""
    import torch
    from sentence_transformers import SentenceTransformer

    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    scores = base_q @ chunk_vecs.T if items else np.zeros((0, len(chunk_vecs)), dtype=np.float32)
    candidates = [c for _q, _d, c in items]
    positives = pick_positives(candidates, scores)
    relabelled = 0
    if teacher is not None:
        by_base, positives = positives, pick_positives(candidates, scores, teacher_q, teacher.chunk_vecs)
        relabelled = sum(a != b for a, b in zip(positives, by_base, strict=True))
    pool = negative_pool(len(chunk_vecs), set(positives), scores, spec.negative_pool, spec.seed)
    del scores
    where = {int(j): k for k, j in enumerate(pool)}
    targets = torch.tensor([where[p] for p in positives], dtype=torch.long)
    pool_vecs = torch.from_numpy(chunk_vecs[pool])
    anchors = torch.from_numpy(base_q)
    soft = None
    if teacher is not None and spec.teacher_weight:
        idx, prob = soft_targets(teacher_q, teacher.chunk_vecs[pool], spec.teacher_scale, spec.teacher_top)
        soft = (torch.from_numpy(idx), torch.from_numpy(prob))

    model = SentenceTransformer(spec.base_path, device="cpu", local_files_only=True)
    bert = model[0].auto_model
    if spec.freeze_layers >= 0 and hasattr(bert, "embeddings"):
        depth = len(bert.encoder.layer)
        if spec.freeze_layers >= depth:
            raise ValueError(f"retrain_freeze_layers = {spec.freeze_layers} freezes all {depth} layers of the query"
                             f" encoder (and its embeddings): nothing is left to train; at most {depth - 1}, or -1"
                             " for none")
        for p in bert.embeddings.parameters():
            p.requires_grad = False
        for layer in bert.encoder.layer[: spec.freeze_layers]:
            for p in layer.parameters():
                p.requires_grad = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    steps = spec.epochs * ((len(items) + spec.batch_size - 1) // spec.batch_size)
    warm = max(1, int(0.1 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    model.train()
    t_train, step, stopped_early = time.time(), 0, False
    for epoch in range(spec.epochs):
        order = list(range(len(items)))
        random.shuffle(order)
        for b0 in range(0, len(order), spec.batch_size):
            if time.time() - started > spec.budget_seconds:
                stopped_early = True
                break
            b = order[b0: b0 + spec.batch_size]
            feats = tokenized(model, [items[i][0] for i in b])
            qv = torch.nn.functional.normalize(model(feats)["sentence_embedding"], dim=-1)
            logp = torch.log_softmax(spec.scale * qv @ pool_vecs.T, dim=-1)
            loss = torch.nn.functional.nll_loss(logp, targets[b])
            if soft is not None:
                loss = loss - spec.teacher_weight * (soft[1][b] * logp.gather(1, soft[0][b])).sum(1).mean()
            if spec.anchor:
                loss = loss + spec.anchor * ((qv - anchors[b]) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            _progress("retrain_step", model=label, step=step, steps=steps, epoch=epoch,
                      loss=round(float(loss.item()), 4))
        if stopped_early:
            break
    model.eval()
    if spec.interpolate < 1.0:
        interpolate_weights(model, base, spec.interpolate)
    return Fit(model, step, stopped_early, round(time.time() - t_train, 1), len(pool), len(items), relabelled)


def interpolate_weights(model: Any, base: Any, keep: float) -> None:
    """Move ``model``'s floating-point weights back towards ``base``'s (the same architecture), in place:
    ``keep`` x its own + (1 - ``keep``) x the base's. Integer buffers (position ids) are left as they are."""
    import torch

    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"interpolate must be within [0, 1], got {keep}")
    own, theirs = model.state_dict(), base.state_dict()
    if own.keys() != theirs.keys():
        raise ValueError("interpolate: the fine-tuned and the base model's weights differ in their names")
    with torch.no_grad():
        for name, w in own.items():
            if w.is_floating_point():
                w.mul_(keep).add_(theirs[name].to(w.dtype), alpha=1.0 - keep)


def average_weights(model: Any, others: list[Any]) -> None:
    """Average ``model``'s floating-point weights with ``others``' (the same architecture), in place: a uniform
    model soup (Wortsman et al. 2022)."""
    import torch

    own = model.state_dict()
    theirs = [o.state_dict() for o in others]
    if any(t.keys() != own.keys() for t in theirs):
        raise ValueError("soup: the models' weights differ in their names")
    with torch.no_grad():
        for name, w in own.items():
            if w.is_floating_point():
                for t in theirs:
                    w.add_(t[name].to(w.dtype))
                w.div_(1 + len(theirs))


def _teacher(spec: TrainSpec, stored: dict[int, np.ndarray] | None, chunk_ids: list[int]) -> Teacher | None:
    """The pseudo-labelling teacher: ``teacher_version``'s stored vector of every chunk and its weights."""
    if not spec.teacher_version:
        return None
    missing = sum(cid not in (stored or {}) for cid in chunk_ids)
    if missing:
        raise ValueError(f"teacher version {spec.teacher_version} has no vector for {missing} of the {len(chunk_ids)} "
                         "chunks: wait for its backfill (pgsynapse status), or set retrain_teacher = none")
    model = load_embedder(ModelSpec(version_id=spec.teacher_version, name="teacher", path=Path(spec.teacher_path or ""),
                                    runtime=spec.teacher_runtime, dim=spec.teacher_dim), threads=spec.threads)
    return Teacher(model, np.stack([stored[cid] for cid in chunk_ids]))  # type: ignore[index]


def main(spec: TrainSpec, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, evaluate for the gate, save; ``data`` is :func:`load_data`'s result when the caller has it."""
    import torch
    from sentence_transformers import SentenceTransformer

    started = time.time()
    np.random.seed(spec.seed)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    data = data if data is not None else load_data(spec)
    base = SentenceTransformer(spec.base_path, device="cpu", local_files_only=True)
    chunker = data["chunker"](base.tokenizer, min(spec.chunk_tokens, base.max_seq_length), 0)
    chunk_ids = [r[0] for r in data["chunks"]]
    chunk_docs = [r[1] for r in data["chunks"]]
    texts = [chunker.embed_text(r[2], r[3]) for r in data["chunks"]]
    index = {cid: i for i, cid in enumerate(chunk_ids)}
    doc_chunks: dict[int, list[int]] = {}
    for i, d in enumerate(chunk_docs):
        doc_chunks.setdefault(d, []).append(i)
    _progress("retrain_data_loaded", examples=len(data["examples"]), chunks=len(texts))

    # the chunk vectors serving searches: what the passage version stored, encoded only where one is missing
    chunk_vecs = np.zeros((len(texts), embedding_dimension(base)), dtype=np.float32)
    missing = [i for i, cid in enumerate(chunk_ids) if cid not in data["stored"]]
    for i, cid in enumerate(chunk_ids):
        if cid in data["stored"]:
            chunk_vecs[i] = data["stored"][cid]
    if missing:
        chunk_vecs[missing] = _encode(base, [texts[i] for i in missing])
    teacher = _teacher(spec, data.get("teacher_stored"), chunk_ids)

    examples = [e for e in data["examples"] if e[2] in index]
    # the gate's grouped hold-out: whole groups of similar questions, and their pages (learning/holdout.py)
    example_q = _encode(base, [e[1] for e in examples])
    split = grouped_holdout([e[1] for e in examples], example_q, [chunk_docs[index[e[2]]] for e in examples],
                            spec.heldout_fraction, spec.seed, spec.group_threshold)
    train_ex, held_ex = [examples[i] for i in split.train], [examples[i] for i in split.heldout]
    canary = [(question, d) for question, d in data["canary"] if d in doc_chunks]
    canary_docs = set(spec.exclude_documents) | {d for _, d in canary}
    corpus_items = synthetic_pairs(data["docs"], doc_chunks, texts, spec.synthetic_pairs, spec.seed + 1,
                                   canary_docs) if spec.synthetic_pairs else []

    def items_of(chosen: list[Any]) -> list[tuple[str, int, list[int]]]:
        """Feedback examples as (query, document, its chunks), then the corpus pairs."""
        out = []
        for _id, query, pos, _negs, _at in chosen:
            d = chunk_docs[index[pos]]
            out.append((query, d, doc_chunks[d]))
        return out + corpus_items

    _progress("retrain_pairs_built", train=len(train_ex), synthetic=len(corpus_items), heldout=len(held_ex),
              dropped=len(split.dropped), canary=len(canary))
    gated = fit(spec, base, items_of(train_ex), chunk_vecs, started, "gated", teacher)

    # the gate's evaluation (learning/gate.py): grouped hold-out and canary set, candidate vs active, whole
    # corpus; both search the same stored chunk vectors, so only the questions are encoded
    metrics: dict[str, Any] = {"heldout": len(held_ex), "train_examples": len(train_ex),
                               "synthetic_pairs": len(corpus_items), "steps": gated.steps,
                               "stopped_early": gated.stopped_early, "train_seconds": gated.seconds,
                               "recipe": "query-side", "soup": spec.soup,
                               "interpolate": spec.interpolate, "negative_pool": gated.pool, "split": split.summary(),
                               "teacher": spec.teacher_version, "teacher_relabelled": gated.relabelled}
    _progress("retrain_evaluating", heldout=len(held_ex), canary=len(canary))
    active = base if not spec.active_path or spec.active_path == spec.base_path else \
        SentenceTransformer(spec.active_path, device="cpu", local_files_only=True)
    asked = [e[1] for e in held_ex] + [question for question, _ in canary]
    active_q = _encode(active, asked)
    relevant = [{chunk_docs[index[e[2]]]} for e in held_ex]
    held_groups = [split.groups[i] for i in split.heldout]
    metrics.update(gate_metrics(active_q, _encode(gated.model, asked), chunk_vecs, chunk_vecs, chunk_docs,
                                heldout=(relevant, held_groups), canary=[d for _, d in canary], k=spec.eval_k))
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    served = gated
    if spec.refit and held_ex:
        # the recipe the gate judged, trained again on every example (the held-out groups and their pages too):
        # that model is the one registered; its canary scores are checked as well (it never saw those questions)
        served = fit(spec, base, items_of(examples), chunk_vecs, started, "refit", teacher)
        gated.model.save(str(out / "gated"))
        refit = gate_metrics(active_q, _encode(served.model, asked), chunk_vecs, chunk_vecs, chunk_docs,
                             heldout=(relevant, held_groups), canary=[d for _, d in canary], k=spec.eval_k)
        metrics["refit"] = {"examples": len(examples), "steps": served.steps, "train_seconds": served.seconds,
                            "canary_candidate": refit.get("canary_candidate")}
        metrics["gate_scores"]["refit_canary"] = refit["gate_scores"]["canary"]
    served.model.save(str(out))
    metrics["used_example_ids"] = [e[0] for e in examples]
    metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    metrics["total_seconds"] = round(time.time() - started, 1)
    (out / "metrics.json").write_text(json.dumps(metrics))
    _progress("retrain_finished", **{k: v for k, v in metrics.items() if k not in ("used_example_ids", "gate_scores")})
    return metrics


if __name__ == "__main__":
    main(TrainSpec(**read_spec()))
