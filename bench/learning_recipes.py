"""Benchmark `learning_recipes` (issue 23): the retrain recipe's settings compared in one process, on the TUNE half.

How docs/learning.md's recipe was chosen. One clone of the embedded corpus with the 340 feedback rows of
``pg_docs_train.jsonl`` (as bench.learning inserts them); the trainer's own ``main`` (learning/train.py: the
grouped split, the canary set, the loss, the gate's evaluation) run in this process with the data loaded once,
once per recipe and seed. Per run: the candidate's recall@5 / MRR@10 on the ``tune`` half of the dev questions
and on the ``users-tune`` half of the user-worded set (bench/devsplit.py; searching v1's stored chunk vectors),
and the gate's own figures (grouped hold-out and canary, candidate minus active). The ``report`` halves are never
printed: they are bench.learning's, through the worker's retrain job.

``--teacher-vectors DIR`` (bench/gpu_distill.py's ``mpnet_ids.npy`` / ``mpnet_vectors.npy``) with
``--teacher-model DIR`` (all-mpnet-base-v2, torch) stand in for a teacher version: recipes with
``"teacher": true`` use them.

    python -m bench.learning_recipes --recipes '[{"name": "default"}, {"name": "lr 5e-5", "lr": 5e-5}]'
    python -m bench.learning_recipes --teacher-vectors DIR --teacher-model DIR \\
        --recipes '[{"name": "teacher", "teacher": true}]' --seeds 0,1,2

``--generated FILE`` (JSON lines ``{"chunk", "doc", "question"}``: questions a local model wrote for chunks of
this corpus template) adds them to the corpus pairs of recipes with ``"generated": true`` (each question's own
chunk is its positive; none from the canary set's documents, as for the heading pairs). An experiment: the
product's retrain has no such source yet.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from sentence_transformers import SentenceTransformer

from bench.common import emit, machine, parser, questions, run_benchmark, table
from bench.corpusdb import corpus_clone, on_corpus_server
from bench.devsplit import held_out
from bench.learning import _feedback
from bench.retrieval import vectors_recall
from pgsynapse.config import load_settings
from pgsynapse.export import source_model_path
from pgsynapse.handlers.retrain import train_spec
from pgsynapse.learning import train

B = "learning_recipes"
OUT = Path("/tmp/pgsynapse-bench-learning-recipes")
TEACHER_VERSION = -1  # a stand-in id: the teacher's vectors come from files, not from a registered version


def _spec(url: str, base_path: str) -> train.TrainSpec:
    """The retrain handler's spec with the product's default settings."""
    return train_spec(load_settings(environ={}, database_url=url), url=url, base_version=1, base_path=base_path,
                      active_path=base_path, out_dir=str(OUT), active_version=1)


def _gains(m: dict[str, Any], active: str, candidate: str) -> tuple[float, float]:
    a, c = m.get(active) or {}, m.get(candidate) or {}
    return (round(100 * (c.get("recall@5", 0) - a.get("recall@5", 0)), 1),
            round(c.get("mrr@10", 0) - a.get("mrr@10", 0), 3))


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--recipes", required=True, help="JSON list of {name, TrainSpec fields..., teacher: bool}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--teacher-vectors", type=Path)
    p.add_argument("--teacher-model", type=Path)
    p.add_argument("--generated", type=Path, help="JSON lines of generated questions per chunk (see above)")
    args = p.parse_args()
    on_corpus_server(args.database_url, lambda: run(args))


def _usable(question: str) -> bool:
    q = question.strip()
    return 12 <= len(q) <= 200 and q.endswith("?") and "passage" not in q.lower() and "\n" not in q


def _with_generated(generated: list[dict[str, Any]], chunk_ids: list[int]) -> Any:
    """train.synthetic_pairs plus the generated questions (their own chunk the positive), canary documents left out."""
    heading_pairs = train.synthetic_pairs
    index = {cid: i for i, cid in enumerate(chunk_ids)}

    def pairs(docs, doc_chunks, texts, n, seed, exclude=frozenset()):  # noqa: ANN001, ANN202 - train's signature
        extra = [(g["question"], g["doc"], [index[g["chunk"]]]) for g in generated
                 if g["chunk"] in index and g["doc"] not in exclude]
        return heading_pairs(docs, doc_chunks, texts, n, seed, exclude) + extra

    return pairs


def run(args: Any) -> None:
    emit(B, "machine", **machine())
    sets = held_out()
    tunes = {"tune": sets["tune"], "users": sets["users-tune"]}
    recipes = json.loads(args.recipes)
    seeds = [int(s) for s in args.seeds.split(",")]
    generated = [g for g in map(json.loads, args.generated.read_text().splitlines()) if _usable(g["question"])] \
        if args.generated else []
    if args.generated:
        emit(B, "generated", file=str(args.generated), usable=len(generated))
    with corpus_clone() as (url, info):
        with psycopg.connect(url, autocommit=True) as conn:
            v1 = dict(zip(["id", "name", "artifact_path", "runtime", "dim"], conn.execute(
                "SELECT id, name, artifact_path, runtime, dim FROM pgsynapse.model_versions WHERE id = 1").fetchone(),
                strict=True))
            _feedback(conn, questions("pg_docs_train.jsonl"))
            source = dict(conn.execute("SELECT c.id, d.source FROM pgsynapse.chunks c"
                                       " JOIN pgsynapse.documents d ON d.id = c.document_id").fetchall())
        base_path = str(source_model_path(v1, None))
        spec0 = _spec(url, base_path)
        data = train.load_data(spec0)
        if args.teacher_vectors:
            ids, vecs = np.load(args.teacher_vectors / "mpnet_ids.npy"), np.load(args.teacher_vectors / "mpnet_vectors.npy")
            data["teacher_stored"] = {int(i): v.astype(np.float32) for i, v in zip(ids, vecs, strict=True)}
        chunk_ids = [r[0] for r in data["chunks"]]
        chunk_vecs = np.stack([data["stored"][c] for c in chunk_ids])
        pages = [source[c] for c in chunk_ids]

        def tune_score(model: Any) -> dict[str, float]:
            """recall@5 / MRR@10 on the dev tune half (``tune_*``) and the user-worded set's (``users_*``)."""
            out = {}
            for name, items in tunes.items():
                s = vectors_recall(model.encode([q["q"] for q in items], normalize_embeddings=True), chunk_vecs,
                                   pages, [set(q["relevant"]) for q in items])
                out.update({f"{name}_recall5": s["recall@5"], f"{name}_mrr10": s["mrr@10"]})
            return out

        emit(B, "base", **tune_score(SentenceTransformer(base_path, device="cpu")), corpus_pages=info.get("pages"))
        summary = []
        for recipe in recipes:
            fields = {k: v for k, v in recipe.items() if k not in ("name", "teacher", "generated")}
            if recipe.get("generated") and not args.generated:
                raise SystemExit(f"recipe {recipe['name']!r} needs --generated FILE")
            if recipe.get("teacher"):
                if not args.teacher_vectors or not args.teacher_model:
                    raise SystemExit(f"recipe {recipe['name']!r} needs --teacher-vectors and --teacher-model")
                fields.update(teacher_version=TEACHER_VERSION, teacher_path=str(args.teacher_model), teacher_dim=768)
            runs = []
            for seed in seeds:
                started = time.perf_counter()
                pairs = train.synthetic_pairs
                if recipe.get("generated"):
                    train.synthetic_pairs = _with_generated(generated, chunk_ids)
                try:
                    m = train.main(dataclasses.replace(spec0, seed=seed, **fields), data)
                finally:
                    train.synthetic_pairs = pairs
                score = tune_score(SentenceTransformer(str(OUT), device="cpu"))
                held, canary = _gains(m, "active", "candidate"), _gains(m, "canary_active", "canary_candidate")
                runs.append(emit(B, recipe["name"], seed=seed, **score, heldout_recall5_gain=held[0],
                                 heldout_mrr10_gain=held[1],
                                 canary_recall5_gain=canary[0], canary_mrr10_gain=canary[1],
                                 synthetic_pairs=m["synthetic_pairs"], relabelled=m.get("teacher_relabelled"),
                                 seconds=round(time.perf_counter() - started)))
            summary.append({"recipe": recipe["name"], "seeds": len(runs), **{
                f"{k}_mean": round(statistics.mean(r[k] for r in runs), 3) for k in (
                    "tune_recall5", "tune_mrr10", "users_recall5", "users_mrr10", "heldout_recall5_gain",
                    "heldout_mrr10_gain", "canary_recall5_gain", "canary_mrr10_gain")},
                "tune_recall5_min": min(r["tune_recall5"] for r in runs),
                "users_recall5_min": min(r["users_recall5"] for r in runs)})
    table()
    table(summary)


if __name__ == "__main__":
    run_benchmark(main)
