"""Train a cross-encoder ranker, in its own process (``pgsynapse ranker train``).

Run as ``python -m pgsynapse.ranking.train`` with the JSON spec on stdin (it holds the database URL: a pipe, never
a file, argv or the environment) by :func:`pgsynapse.learning.trainer_process.run_trainer`, with the retrain job's
memory and time guards. Writes the model, ``pgsynapse_ranker.json`` and ``metrics.json`` into the output directory.

Recipe (docs/learning.md, "The ranker"):

- **Pairs**: the same examples the retrain job uses (feedback's ``training_examples`` and the corpus pairs of
  :func:`pgsynapse.learning.train.synthetic_pairs`). A question's **positive** is the best passage of its helpful
  page under the serving version's vectors; its **negatives** are the passages of other pages that the vector
  search ranks highest (the candidates the ranker will have to beat at serving time).
- **Model**: the serving version's transformer weights (MiniLM by default) with a fresh one-logit head
  (``AutoModelForSequenceClassification``); the input is ``[CLS] question [SEP] passage [SEP]``, the passage cut to
  ``max_length`` tokens (the question never is).
- **Loss**: listwise: a softmax over each question's positive and its negatives (cross-entropy towards the
  positive). AdamW, warm-up then linear decay, a wall-clock budget.
- **Gate** (learning/gate.py's verdict): the grouped hold-out of the examples (learning/holdout.py: whole groups of
  similar questions and their pages, which training never sees) and the canary set; per question, the page
  ranking the ranker gives the top ``candidates`` against the one serving today (the vector order, or the active
  ranker's), ``hit@5 + 0.5 x rr@10``, paired cluster bootstrap.
- **Export**: ONNX INT8 (ranking/export.py) when its order agrees with the fp32 weights'; torch otherwise.
"""

from __future__ import annotations

import json
import random
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pgsynapse.learning.canary import ensure_canary
from pgsynapse.learning.distill_train import kept_layers
from pgsynapse.learning.gate import ranking_scores, summary
from pgsynapse.learning.holdout import grouped_holdout
from pgsynapse.learning.metrics import distinct_documents
from pgsynapse.learning.train import stored_vectors, synthetic_pairs
from pgsynapse.learning.trainer_process import progress, read_spec
from pgsynapse.models import ModelCache
from pgsynapse.queries import q
from pgsynapse.ranking.export import export_ranker
from pgsynapse.ranking.learn import RankerSpec
from pgsynapse.ranking.scorer import META, Ranker, passage_text, rerank

EVAL_K = 5


def load_data(spec: RankerSpec) -> dict[str, Any]:
    with psycopg.connect(spec.url, autocommit=True, prepare_threshold=None) as conn:  # db.NO_PREPARE
        examples = conn.execute(q("ranker_examples", "rankers.sql")).fetchall()
        chunks = conn.execute(q("ranker_chunks", "rankers.sql")).fetchall()
        bodies = conn.execute(q("ranker_documents", "rankers.sql")).fetchall()
        stored = stored_vectors(conn, spec.version["id"])
        built = ensure_canary(conn, spec.version["id"], spec.canary_size)
        if built["built"]:
            progress("canary_built", questions=built["questions"], version=spec.version["id"])
        canary = conn.execute(q("canary_questions", "canary.sql")).fetchall()
        teacher = (spec.active_ranker or {}).get("version")  # the active ranker is a teacher version: its vectors
        taught = stored_vectors(conn, teacher["id"]) if teacher else {}
    return {"examples": examples, "chunks": chunks, "docs": {r[0]: (r[1], r[2]) for r in bodies},
            "stored": stored, "canary": canary, "teacher_stored": taught}


class TeacherOrder:
    """A ``version:N`` ranker's order (ranking/rescore.py) of the trainer's chunks: the cosine of the teacher's stored
    vectors to its encoding of the question, stable; a chunk it has no vector for goes last."""

    def __init__(self, spec: RankerSpec, stored: dict[int, np.ndarray], chunk_ids: list[int]) -> None:
        self.embedder = ModelCache(model_path=spec.model_path, threads=spec.threads,
                                   data_dir=spec.data_dir).get(spec.active_ranker["version"])  # type: ignore[index]
        self.vectors = {i: unit(stored[cid]) for i, cid in enumerate(chunk_ids) if cid in stored}

    def order(self, question: str, cands: list[int]) -> list[int]:
        qv = unit(self.embedder.encode([question])[0])
        scores = {i: float(self.vectors[i] @ qv) for i in cands if i in self.vectors}
        return [i for _, i in sorted(enumerate(cands), key=lambda p: (-scores.get(p[1], -2.0), p[0]))]


def unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n else v


def baseline(spec: RankerSpec, data: dict[str, Any], chunk_ids: list[int],
             texts: list[str]) -> Callable[[str, list[int], np.ndarray], list[int]] | None:
    """Today's order of a question's candidates (indexes of the chunks, with their first-stage cosines): the active
    ranker's, a cross-encoder's or a teacher version's (``version:N``); None: the vector order. Loaded before the
    training: an active ranker that cannot be loaded fails the run at once, not once the ranker is trained."""
    if spec.active_ranker is None:
        return None
    if spec.active_ranker["runtime"] == "version":
        teacher = TeacherOrder(spec, data["teacher_stored"], chunk_ids)
        return lambda question, cands, sims: teacher.order(question, cands)
    ranker = Ranker(spec.active_ranker, threads=spec.threads, data_dir=spec.data_dir)
    return lambda question, cands, sims: rerank(ranker, question, cands, texts.__getitem__, sims.__getitem__)


class Listwise:
    """The cross-encoder and its training loop (a softmax over each question's positive and negatives)."""

    def __init__(self, spec: RankerSpec) -> None:
        self.spec = spec
        self.cosine_scale = spec.cosine_scale
        self.tok = AutoTokenizer.from_pretrained(spec.base_path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(spec.base_path, num_labels=1,
                                                                        local_files_only=True)
        if spec.layers:  # a smaller, faster ranker: ``layers`` of the base's, evenly spaced, the last one kept
            encoder = self.model.base_model.encoder
            keep = kept_layers(len(encoder.layer), spec.layers)
            encoder.layer = torch.nn.ModuleList([encoder.layer[i] for i in keep])
            self.model.config.num_hidden_layers = len(keep)

    def logits(self, question: str, passages: list[str]) -> torch.Tensor:
        feats = self.tok([question] * len(passages), passages, truncation="only_second",
                         max_length=self.spec.max_length, padding=True, return_tensors="pt")
        return self.model(**feats).logits[:, 0]

    def fit(self, groups: list[tuple[str, list[str], np.ndarray]], started: float) -> dict[str, Any]:
        """``groups``: (question, [positive, negatives...], their cosines to the question under the first stage)."""
        spec = self.spec
        random.seed(spec.seed)
        torch.manual_seed(spec.seed)
        head = [p for n, p in self.model.named_parameters() if n.startswith(("classifier", "bert.pooler"))]
        body = [p for n, p in self.model.named_parameters() if not n.startswith(("classifier", "bert.pooler"))]
        # the fresh head learns at head_lr, the pretrained encoder at lr
        opt = torch.optim.AdamW([{"params": body, "lr": spec.lr}, {"params": head, "lr": spec.head_lr}],
                                weight_decay=0.01)
        steps = spec.epochs * ((len(groups) + spec.batch_size - 1) // spec.batch_size)
        warm = max(1, int(0.1 * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
        self.model.train()
        step, stopped, t0 = 0, False, time.time()
        for epoch in range(spec.epochs):
            order = list(range(len(groups)))
            random.shuffle(order)
            for b0 in range(0, len(order), spec.batch_size):
                if time.time() - started > spec.budget_seconds:
                    stopped = True
                    break
                # the batch's mean loss, one question's graph at a time (gradients add up): the activations of a
                # single (question, candidates) list are held, not the batch's
                batch = order[b0: b0 + spec.batch_size]
                opt.zero_grad()
                loss = 0.0
                for i in batch:
                    question, passages, cosines = groups[i]
                    scores = self.logits(question, passages) + self.cosine_scale * torch.from_numpy(cosines)
                    one = torch.nn.functional.cross_entropy(scores[None, :], torch.zeros(1, dtype=torch.long))
                    (one / len(batch)).backward()
                    loss += float(one.item()) / len(batch)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                progress("ranker_train_step", step=step, steps=steps, epoch=epoch, loss=round(loss, 4))
            if stopped:
                break
        self.model.eval()
        return {"steps": step, "planned_steps": steps, "stopped_early": stopped, "train_seconds": round(time.time() - t0, 1)}

    def score(self, question: str, passages: list[str]) -> np.ndarray:
        with torch.no_grad():
            return self.logits(question, passages).numpy()

    def save(self, out: Path, meta: dict[str, Any]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out))
        self.tok.save_pretrained(str(out))
        (out / META).write_text(json.dumps(meta, indent=2))


def main(spec: RankerSpec) -> dict[str, Any]:
    started = time.time()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    data = load_data(spec)
    v = spec.version
    embedder = ModelCache(model_path=spec.model_path, threads=spec.threads, data_dir=spec.data_dir).get(v)
    chunk_ids = [r[0] for r in data["chunks"]]
    chunk_docs = [r[1] for r in data["chunks"]]
    texts = [passage_text(r[2], r[3]) for r in data["chunks"]]
    index = {cid: i for i, cid in enumerate(chunk_ids)}
    doc_chunks: dict[int, list[int]] = {}
    for i, d in enumerate(chunk_docs):
        doc_chunks.setdefault(d, []).append(i)
    vecs = np.zeros((len(texts), int(v["dim"])), dtype=np.float32)
    missing = [i for i, cid in enumerate(chunk_ids) if cid not in data["stored"]]
    for i, cid in enumerate(chunk_ids):
        if cid in data["stored"]:
            vecs[i] = data["stored"][cid]
    if missing:
        vecs[missing] = embedder.encode([texts[i] for i in missing])
    progress("ranker_data_loaded", examples=len(data["examples"]), chunks=len(texts), encoded=len(missing))

    examples = [(query, chunk_docs[index[pos]]) for query, pos in data["examples"] if pos in index]
    ex_vecs = embedder.encode([e[0] for e in examples]) if examples else np.zeros((0, vecs.shape[1]), np.float32)
    split = grouped_holdout([e[0] for e in examples], ex_vecs, [e[1] for e in examples], spec.heldout_fraction,
                            spec.seed, spec.group_threshold)
    canary = [(question, d) for question, d in data["canary"] if d in doc_chunks]
    corpus = synthetic_pairs(data["docs"], doc_chunks, texts, spec.synthetic_pairs, spec.seed + 1,
                             {d for _, d in canary} | split.heldout_pages) if spec.synthetic_pairs else []

    # the training groups: the positive (the page's best passage under the vectors), then the hard negatives
    train_q = [examples[i][0] for i in split.train] + [c[0] for c in corpus]
    train_docs = [examples[i][1] for i in split.train] + [c[1] for c in corpus]
    train_vecs = np.concatenate([ex_vecs[split.train], embedder.encode([c[0] for c in corpus])]) \
        if corpus else ex_vecs[split.train]
    groups: list[tuple[str, list[str]]] = []
    for question, doc, qv in zip(train_q, train_docs, train_vecs, strict=True):
        scores = vecs @ qv
        own = doc_chunks[doc]
        pos = own[int(np.argmax(scores[own]))]
        pool = max(spec.candidates, spec.negatives_skip + spec.negatives) + len(own)
        negs = [int(i) for i in np.argsort(-scores)[:pool] if chunk_docs[i] != doc][spec.negatives_skip:]
        if negs:
            chosen = [pos] + negs[: spec.negatives]
            groups.append((question, [texts[i] for i in chosen], scores[chosen].astype(np.float32)))
    progress("ranker_pairs_built", groups=len(groups), feedback=len(split.train), corpus=len(corpus),
             heldout=len(split.heldout), canary=len(canary), negatives=spec.negatives)
    today = baseline(spec, data, chunk_ids, texts)
    model = Listwise(spec)
    fitted = model.fit(groups, started)

    # the gate's evaluation: today's order of each question's candidates against the candidate ranker's
    held = [examples[i] for i in split.heldout]
    asked = [e[0] for e in held] + [c[0] for c in canary]
    relevant = [{e[1]} for e in held] + [{c[1]} for c in canary]
    ask_vecs = embedder.encode(asked) if asked else np.zeros((0, vecs.shape[1]), np.float32)
    progress("ranker_evaluating", heldout=len(held), canary=len(canary))
    now_pages, cand_pages, lists = [], [], []
    for question, qv in zip(asked, ask_vecs, strict=True):
        sims = vecs @ qv
        order = np.argsort(-sims)
        cands = [int(i) for i in order[: spec.candidates]]
        rest = [int(i) for i in order[spec.candidates: spec.candidates + 30]]  # served after the ranked ones
        base = today(question, cands, sims) if today else cands
        now_pages.append(distinct_documents(base + rest, chunk_docs))
        cand_pages.append(distinct_documents(
            rerank(model, question, cands, texts.__getitem__, sims.__getitem__) + rest, chunk_docs))
        lists.append((question, [texts[i] for i in cands]))
    n = len(held)
    evals: dict[str, Any] = {}
    for name, sl, grp in (("heldout", slice(0, n), [split.groups[i] for i in split.heldout]),
                          ("canary", slice(n, None), [c[1] for c in canary])):
        evals[name] = {"k": EVAL_K, "groups": [int(g) for g in grp],
                       "active": ranking_scores(now_pages[sl], relevant[sl], EVAL_K),
                       "candidate": ranking_scores(cand_pages[sl], relevant[sl], EVAL_K)}
    out = Path(spec.out_dir)
    model.save(out, {"max_length": spec.max_length, "candidates": spec.candidates, "base": spec.base_path,
                     "layers": model.model.config.num_hidden_layers, "cosine_scale": spec.cosine_scale,
                     "recipe": "listwise cross-encoder", "negatives": spec.negatives})
    metrics: dict[str, Any] = {
        **fitted, "groups": len(groups), "train_examples": len(split.train), "corpus_pairs": len(corpus),
        "heldout": n, "split": split.summary(), "candidates": spec.candidates, "max_length": spec.max_length,
        "layers": model.model.config.num_hidden_layers,
        "gate_scores": evals, "active": summary(evals["heldout"]["active"], EVAL_K),
        "candidate": summary(evals["heldout"]["candidate"], EVAL_K),
        "baseline": f"ranker {spec.active_ranker['id']}" if spec.active_ranker else "vector order"}
    metrics["runtime"], metrics["agreement"] = "torch", None
    if spec.export:
        exported = export_ranker(out, lists[:50] or [(g[0], g[1]) for g in groups[:20]], spec.threads)
        metrics.update(exported)
    metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    metrics["total_seconds"] = round(time.time() - started, 1)
    (out / "metrics.json").write_text(json.dumps(metrics))
    progress("ranker_trained", **{k: v for k, v in metrics.items() if k not in ("gate_scores", "split")})
    return metrics


if __name__ == "__main__":
    main(RankerSpec(**read_spec()))
