"""Benchmark `gate` (issue 23, item 1): does the retrain gate's verdict agree with questions nobody trained on?

On the embedded PostgreSQL docs corpus (bench/corpusdb.py: the base model's stored chunk vectors), feedback =
../shared/data/pg_docs_train.jsonl. Candidates are query-side: a linear map on the base model's query vectors
(initialised to the identity), trained with a softmax over every stored chunk vector on the training side of the
split; a fast stand-in for the trainer's recipe (the same family: chunk vectors fixed, query side trained). Three
kinds of feedback, for each seed:

- ``faithful``: the feedback as it is;
- ``shuffled``: every page replaced by another one (a consistent mix-up);
- ``memoriser``: only the feedback's two largest templates (groups), the rest dropped.

For each: the **old** gate (newest 20 % of the feedback in file order, recall@5 + 0.5 MRR gain >= 0.01, on a
candidate trained on the other 80 %), the **new** gate (grouped hold-out and canary set, learning/gate.py, on a
candidate trained on the grouped split's training side), and that candidate's gain on the dev questions
(bench/devsplit.py: ``tune`` and ``report`` halves; the report half is the untouched one). Also the canary's
per-question score spread, which sizes ``retrain_canary_tolerance`` (docs/learning.md).

    python -m bench.gate [--seeds 3] [--steps 100] [--lr 1e-4]
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import psycopg

from bench.common import emit, machine, parser, questions, run_benchmark, table
from bench.corpusdb import corpus_clone
from bench.devsplit import split as dev_split
from pgsynapse.learning.canary import build_questions
from pgsynapse.learning.gate import RR_WEIGHT, gate_metrics, verdict
from pgsynapse.learning.holdout import grouped_holdout
from pgsynapse.learning.metrics import recall_mrr
from pgsynapse.models import ModelCache


def adapter(x: np.ndarray, targets: list[int], chunks: np.ndarray, steps: int = 100, lr: float = 0.001,
            seed: int = 0) -> np.ndarray:
    """A query-side linear map trained with a softmax over all chunk vectors (cross-entropy, scale 20)."""
    import torch

    torch.manual_seed(seed)
    w = torch.eye(x.shape[1], requires_grad=True)
    c, xt, yt = torch.from_numpy(chunks), torch.from_numpy(x), torch.tensor(targets)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        q = torch.nn.functional.normalize(xt @ w, dim=-1)
        loss = torch.nn.functional.cross_entropy(20.0 * q @ c.T, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().numpy()


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=100, help="adapter training steps (full batch)")
    p.add_argument("--lr", type=float, default=1e-4, help="adapter learning rate (Adam)")
    args = p.parse_args()
    emit("gate", "machine", **machine())
    from pgvector.psycopg import register_vector

    train = questions("pg_docs_train.jsonl")
    dev = dev_split(questions("pg_docs_dev.jsonl"))
    with corpus_clone(database_url=args.database_url) as (url, info):
        emit("gate", "corpus", **info, adapter_steps=args.steps, adapter_lr=args.lr)
        with psycopg.connect(url, autocommit=True) as conn:
            register_vector(conn)
            v1 = dict(zip(["id", "name", "artifact_path", "runtime", "dim"], conn.execute(
                "SELECT id, name, artifact_path, runtime, dim FROM pgsynapse.model_versions WHERE id = 1").fetchone(),
                strict=True))
            rows = conn.execute("SELECT c.document_id, e.embedding FROM pgsynapse.embeddings e JOIN pgsynapse.chunks c"
                                " ON c.id = e.chunk_id WHERE e.model_version_id = 1 ORDER BY c.id").fetchall()
            docs = conn.execute("SELECT id, coalesce(source, ''), coalesce(title, ''), coalesce(body, '')"
                                " FROM pgsynapse.documents ORDER BY id").fetchall()
    chunk_docs = [r[0] for r in rows]
    vecs = np.stack([np.asarray(r[1].to_numpy() if hasattr(r[1], "to_numpy") else r[1], dtype=np.float32)
                     for r in rows])
    by_source = {d[1]: d[0] for d in docs}
    base = ModelCache().get(v1)
    canary = build_questions(docs, 300)
    emit("gate", "canary", questions=len(canary), **Counter(c.origin for c in canary))

    fb = [(t["q"], by_source[t["page"]]) for t in train if t["page"] in by_source]
    all_q = list(dict.fromkeys([q for q, _ in fb] + [c.question for c in canary]
                               + [d["q"] for h in dev.values() for d in h]))
    enc = dict(zip(all_q, base.encode(all_q, batch_size=64), strict=True))
    chunk_docs_arr = np.asarray(chunk_docs)

    def targets(qv: np.ndarray, pages: list[int]) -> list[int]:
        out = []
        for s, pg in zip(qv @ vecs.T, pages, strict=True):
            own = np.flatnonzero(chunk_docs_arr == pg)
            out.append(int(own[np.argmax(s[own])]))
        return out

    def train_on(qs: list[str], pages: list[int], seed: int) -> np.ndarray:
        x = np.stack([enc[q] for q in qs])
        return adapter(x, targets(x, pages), vecs, steps=args.steps, lr=args.lr, seed=seed)

    def apply(w: np.ndarray, qs: list[str]) -> np.ndarray:
        x = np.stack([enc[q] for q in qs]) @ w
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def dev_gain(w: np.ndarray, half: str) -> tuple[float, float]:
        qs = [d["q"] for d in dev[half]]
        rel = [{by_source[p] for p in d["relevant"] if p in by_source} for d in dev[half]]
        a = recall_mrr(apply(np.eye(vecs.shape[1], dtype=np.float32), qs), vecs, chunk_docs, rel, 5)
        c = recall_mrr(apply(w, qs), vecs, chunk_docs, rel, 5)
        return round(100 * (c["recall@5"] - a["recall@5"]), 1), round(c["mrr@10"] - a["mrr@10"], 3)

    base_q = np.stack([enc[q] for q, _ in fb])
    results = []
    for seed in range(args.seeds):
        split0 = grouped_holdout([q for q, _ in fb], base_q, [p for _, p in fb], 0.2, seed)
        sizes = Counter(split0.groups)
        top2 = {g for g, _ in sizes.most_common(2)}
        referenced = sorted({p for _, p in fb})
        mixup = dict(zip(referenced, referenced[7:] + referenced[:7], strict=True))
        variants = {"faithful": fb, "shuffled": [(q, mixup[p]) for q, p in fb],
                    "memoriser": [fb[i] for i in range(len(fb)) if split0.groups[i] in top2]}
        for name, data in variants.items():
            qs, pages = [q for q, _ in data], [p for _, p in data]
            sp = grouped_holdout(qs, np.stack([enc[q] for q in qs]), pages, 0.2, seed)
            w = train_on([qs[i] for i in sp.train], [pages[i] for i in sp.train], seed)
            asked = [qs[i] for i in sp.heldout] + [c.question for c in canary]
            m = gate_metrics(apply(np.eye(vecs.shape[1], dtype=np.float32), asked), apply(w, asked), vecs, vecs,
                             chunk_docs, heldout=([{pages[i]} for i in sp.heldout], [sp.groups[i] for i in sp.heldout]),
                             canary=[c.document_id for c in canary], k=5)
            v = verdict(m["gate_scores"]["heldout"], m["gate_scores"]["canary"])
            cs = m["gate_scores"]["canary"]
            diff = (np.asarray(cs["candidate"]["hit"]) - np.asarray(cs["active"]["hit"])
                    + RR_WEIGHT * (np.asarray(cs["candidate"]["rr"]) - np.asarray(cs["active"]["rr"])))
            n_old = len(qs) - int(round(0.2 * len(qs)))
            w_old = train_on(qs[:n_old], pages[:n_old], seed)
            rel_old = [{p} for p in pages[n_old:]]
            a = recall_mrr(apply(np.eye(vecs.shape[1], dtype=np.float32), qs[n_old:]), vecs, chunk_docs, rel_old, 5)
            c = recall_mrr(apply(w_old, qs[n_old:]), vecs, chunk_docs, rel_old, 5)
            old_delta = (c["recall@5"] - a["recall@5"]) + 0.5 * (c["mrr@10"] - a["mrr@10"])
            tune, report = dev_gain(w, "tune"), dev_gain(w, "report")
            h, cy = v.get("heldout", {}).get("score", {}), v.get("canary", {}).get("score", {})
            results.append(emit(
                "gate", "verdict", seed=seed, feedback=name, examples=len(qs), **{
                    "old_passed": old_delta >= 0.01, "old_delta": round(old_delta, 3), "new_passed": v["passed"],
                    "heldout_q": sp.summary()["heldout"], "heldout_groups": sp.summary()["heldout_groups"],
                    "dropped": len(sp.dropped), "heldout_gain": h.get("gain"), "heldout_low": h.get("low"),
                    "canary_gain": cy.get("gain"), "canary_low": cy.get("low"),
                    "canary_sd": round(float(np.std(diff)), 3), "canary_moved": int(np.count_nonzero(diff)),
                    "dev_tune_r5": tune[0], "dev_report_r5": report[0], "dev_report_mrr": report[1]}))
    table()


if __name__ == "__main__":
    run_benchmark(main)
