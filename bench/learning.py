"""Benchmark `learning` (issues 7, 23): what a retrain does for questions it has never seen, over three seeds.

Feedback = ../shared/data/pg_docs_train.jsonl (a question and the page that answered it), inserted as answered
questions plus `helpful` feedback on a passage of that page. For each seed, on a fresh clone of the embedded
corpus, the worker's own retrain job trains a candidate (in its own process, with the product's settings and
``retrain_seed``), its gate decides, and the candidate is registered. Then, on the dev questions
(pg_docs_dev.jsonl, never trained on), split by bench/devsplit.py: recall@5 / MRR@10 of the base model and of
the candidate, each gain with a 95 % interval (the questions resampled: how much a half of 27-33 questions can tell
apart). Settings are chosen on the ``tune`` half; the headline is the ``report`` half. The same figures on the
user-worded set's halves (``users-tune``, ``users-report``: bench/devsplit.py's ``held_out``).

Each figure twice: by the vectors alone (what the retrain changes, exact kNN) and in the order users are served
(``served``): the handler's hybrid retrieval, its ``answer_top_k`` x 3 nearest chunks fused with as many full-text
matches (fetched once with the handler's own ``text_candidates``; they do not depend on the model) by its weighted
reciprocal-rank fusion at ``hybrid_text_weight``. Nothing is chosen on the second; it says whether a gain in the
vectors survives the fusion.

The candidate is a query encoder over v1's chunk vectors (query-side recipe), so "after" encodes only the
questions and searches v1's stored vectors exactly (exact kNN; the HNSW search of the product returns the same
pages for these questions within noise). "base" is v1 as it serves (its runtime, usually onnx-int8) and, for a
like-for-like comparison with the torch candidate, v1's torch weights.

    python -m bench.learning                 # three seeds (0, 1, 2)
    python -m bench.learning --seeds 0       # one
    python -m bench.learning --teacher-vectors DIR --teacher-model DIR   # with the mpnet teacher as the ranker

With ``--teacher-vectors`` each clone first gets all-mpnet-base-v2 as a model version (``model add``, its vectors
computed elsewhere by bench/gpu_distill.py and preloaded, then backfilled by a real worker: bench.teacher's
``teacher_ranker``) and as the active ranker (``ranker add version:N``), as a user who runs the teacher ranker has
it; the retrain runs with ``retrain_teacher = ranker`` (off by default), so the teacher labels its examples.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from sentence_transformers import SentenceTransformer

from bench.common import emit, machine, parser, questions, run_benchmark, run_worker_until, table
from bench.corpusdb import corpus_clone, on_corpus_server
from bench.devsplit import SETS, held_out
from bench.retrieval import ranked_pages, score
from bench.teacher import teacher_ranker
from pgsynapse.config import load_settings
from pgsynapse.learning.metrics import distinct_documents
from pgsynapse.learning.gate import cluster_bootstrap, ranking_scores
from pgsynapse.export import source_model_path
from pgsynapse.models import ModelCache
from pgsynapse.queries import q as sql
from pgsynapse.retrieval import CANDIDATES_FACTOR, rrf

BOOTSTRAP = 2000  # resamples of the questions for the gains' 95 % intervals


def _vectors_recall(query_vecs: np.ndarray, vecs: np.ndarray, pages: list[str], rel: list[set[str]],
                    per: dict[str, Any] | None = None, key: Any = None) -> dict[str, float]:
    """Page-level recall@5 / MRR@10 by exact kNN; with ``per``, each question's hit@5 and reciprocal rank are kept
    under ``key`` for the gains' intervals."""
    ranked = ranked_pages(query_vecs, vecs, pages)
    if per is not None:
        per[key] = ranking_scores(ranked, rel)
    return score(ranked, rel)


class _Served:
    """The served order (hybrid retrieval, the handler's depth and weight) from a model's question vectors: the
    kNN over every chunk fused with each question's full-text list, fetched once."""

    def __init__(self, conn: psycopg.Connection, halves: dict[str, list[dict[str, Any]]], chunk_ids: list[int],
                 pages: list[str]) -> None:
        settings = load_settings(environ={})
        self.depth = settings.answer_top_k * CANDIDATES_FACTOR
        self.weight = settings.hybrid_text_weight
        self.chunk_ids = np.asarray(chunk_ids)
        self.page = dict(zip(chunk_ids, pages, strict=True))
        self.text = {name: [[r[0] for r in conn.execute(sql("text_candidates", "answers.sql"),
                                                       {"text": q["q"], "k": self.depth,
                                                        "max_rows": settings.hybrid_text_max_rows}).fetchall()]
                            for q in items] for name, items in halves.items()}

    def recall(self, name: str, query_vecs: np.ndarray, vecs: np.ndarray, rel: list[set[str]],
               per: dict[str, Any], key: Any) -> dict[str, float]:
        ranked = []
        for row, text in zip(query_vecs @ vecs.T, self.text[name], strict=True):
            near = np.argpartition(-row, self.depth)[: self.depth]
            vector = self.chunk_ids[near[np.argsort(-row[near], kind="stable")]].tolist()
            fused = rrf([vector, [c for c in text if c in self.page]], [1.0, self.weight])
            ranked.append(distinct_documents(fused, self.page))
        per[key] = ranking_scores(ranked, rel)
        return score(ranked, rel)


def _rank(rr: float) -> int | None:
    """The rank of the first relevant page from a reciprocal rank at 10 (None: not in the first ten)."""
    return round(1 / rr) if rr else None


def _misses(halves: dict[str, list[dict[str, Any]]], per: dict[Any, dict[str, list[float]]],
            seeds: list[int]) -> None:
    """Each question that the base or a candidate misses at recall@5: where each puts its first relevant page (None:
    not in the first ten). Says whether a gain of one question is a matter of the recipe or of the question, and
    which questions a retrain loses (the tune halves' lines may guide a recipe; the report halves' only report)."""
    for name, order in itertools.product(SETS, ("vectors", "served")):
        key = name if order == "vectors" else f"{name} served"
        for i, item in enumerate(halves[name]):
            ranks = {"base": _rank(per[("base", key)]["rr"][i]),
                     **{f"seed{s}": _rank(per[(s, key)]["rr"][i]) for s in seeds}}
            if any(r is None or r > 5 for r in ranks.values()):
                emit("learning", f"miss_{name}", order=order, question=item["q"], relevant=sorted(item["relevant"]),
                     **ranks)


def _interval(base: dict[str, list[float]], cands: list[dict[str, list[float]]]) -> dict[str, float]:
    """95 % intervals of the gain over the base, candidates minus base per question (averaged over the candidates,
    one per seed), the questions resampled with replacement: how much a half of dev can tell apart."""
    hit, rr = (np.mean([np.subtract(c[m], base[m]) for c in cands], axis=0) for m in ("hit", "rr"))
    ci = cluster_bootstrap({"hit": hit, "rr": rr}, list(range(len(hit))), BOOTSTRAP, 0.95)
    return {"recall5_low": round(100 * ci["hit"]["low"], 1), "recall5_high": round(100 * ci["hit"]["high"], 1),
            "mrr10_low": ci["rr"]["low"], "mrr10_high": ci["rr"]["high"]}


def _feedback(conn: psycopg.Connection, train: list[dict[str, Any]]) -> None:
    """Users' feedback: each train question answered by its page; they mark a passage of it helpful."""
    conn.execute("UPDATE pgsynapse.learning_settings SET retrain_min_feedback = %s", (len(train),))
    for t in train:
        qid = conn.execute("INSERT INTO pgsynapse.questions (session_id, text, status) VALUES ('train', %s,"
                           " 'answered') RETURNING id", (t["q"],)).fetchone()[0]
        chunk = conn.execute("SELECT c.id FROM pgsynapse.chunks c JOIN pgsynapse.documents d"
                             " ON d.id = c.document_id WHERE d.source = %s ORDER BY c.ord LIMIT 1",
                             (t["page"],)).fetchone()
        if chunk:
            conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id) VALUES (%s, true, %s)",
                         (qid, chunk[0]))


def _retrain(url: str, seed: int, data_dir: Path, n_train: int, after: int, **overrides: Any) -> float:
    """Run a worker until the retrain job has registered its candidate (a version after ``after``: rejected, or
    backfilled)."""
    settings = load_settings(database_url=url, kinds=("retrain", "backfill"), retrain_min_feedback=n_train,
                             retrain_seed=seed, data_dir=str(data_dir), **overrides)
    started = time.perf_counter()
    run_worker_until(settings, url, f"SELECT EXISTS (SELECT 1 FROM pgsynapse.model_versions WHERE id > {int(after)}"
                     " AND (status = 'rejected' OR backfilled_at IS NOT NULL)) OR EXISTS (SELECT 1 FROM pgsynapse.jobs"
                     " WHERE kind = 'retrain' AND status = 'failed')", ("pgsynapse_models", "pgsynapse_jobs"))
    return time.perf_counter() - started


def _add_teacher(url: str, args: Any, seed: int) -> int:
    """mpnet as a model version and as the active ranker (bench.ranker --teacher); its version id."""
    settings = load_settings(environ={}, database_url=url, data_dir=f"/tmp/pgsynapse-bench-learning/teacher{seed}")
    teacher, _ranker, bf = teacher_ranker(settings, url, args.teacher_vectors, args.teacher_model, status="active")
    emit("learning", "teacher", seed=seed, version=teacher["id"], **{"teacher_runtime": teacher["runtime"], **bf})
    return int(teacher["id"])


def _encode(model: Any, texts: list[str]) -> np.ndarray:
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated retrain seeds")
    p.add_argument("--teacher-vectors", type=Path, help="mpnet's vectors of the template's chunks (bench/gpu_distill.py):"
                   " mpnet is added as a model version and the active ranker, and labels the retrain's examples")
    p.add_argument("--teacher-model", type=Path, help="with --teacher-vectors: mpnet's ONNX export from an earlier run "
                   "(added as it is, no export)")
    args = p.parse_args()
    on_corpus_server(args.database_url, lambda: run(args))


def run(args: Any) -> None:
    emit("learning", "machine", **machine())
    halves = held_out()
    train = questions("pg_docs_train.jsonl")
    models = ModelCache()
    runs: list[dict[str, Any]] = []
    base: dict[str, dict[str, float]] = {}
    per: dict[Any, dict[str, list[float]]] = {}  # (seed or "base", half) -> each question's hit@5, rr@10
    for seed in [int(s) for s in args.seeds.split(",")]:
        with corpus_clone() as (url, info):
            with psycopg.connect(url, autocommit=True) as conn:
                register_vector(conn)
                cols = ["id", "name", "artifact_path", "runtime", "dim", "status"]
                v1 = dict(zip(cols, conn.execute(f"SELECT {', '.join(cols)} FROM pgsynapse.model_versions"
                                                 " WHERE id = 1").fetchone(), strict=True))
                rows = conn.execute("SELECT e.embedding, d.source, c.id FROM pgsynapse.embeddings e"
                                    " JOIN pgsynapse.chunks c ON c.id = e.chunk_id"
                                    " JOIN pgsynapse.documents d ON d.id = c.document_id"
                                    " WHERE e.model_version_id = 1 ORDER BY c.id").fetchall()
                if not base:
                    served_order = _Served(conn, halves, [r[2] for r in rows], [r[1] for r in rows])
                _feedback(conn, train)
            vecs = np.stack([np.asarray(r[0].to_numpy(), dtype=np.float32) for r in rows])
            pages = [r[1] for r in rows]
            if not base:
                emit("learning", "corpus", **info, chunks=len(pages))
                served = models.get(v1)
                torch_v1 = SentenceTransformer(str(source_model_path(v1, None)), device="cpu", local_files_only=True)
                for name, items in halves.items():
                    rel = [set(q["relevant"]) for q in items]
                    texts = [q["q"] for q in items]
                    qv = torch_v1.encode(texts, normalize_embeddings=True)
                    base[name] = _vectors_recall(qv, vecs, pages, rel, per, ("base", name))
                    base[f"{name} served"] = served_order.recall(name, qv, vecs, rel, per, ("base", f"{name} served"))
                    emit("learning", f"base_{name}", runtime="torch", **base[name])
                    emit("learning", f"base_{name}", runtime="torch", order="served", **base[f"{name} served"])
                    emit("learning", f"base_{name}", runtime=v1["runtime"],
                         **_vectors_recall(served.encode(texts), vecs, pages, rel))
            after = _add_teacher(url, args, seed) if args.teacher_vectors else 1
            # the teacher is the active ranker; retrain_teacher = ranker (off by default) lets it label the examples
            wall = _retrain(url, seed, Path(f"/tmp/pgsynapse-bench-learning/seed{seed}"), len(train), after,
                            **({"retrain_teacher": "ranker"} if args.teacher_vectors else {}))
            with psycopg.connect(url, autocommit=True) as conn:
                cand = conn.execute("SELECT id, status, artifact_path, metrics, passage_version_id"
                                    " FROM pgsynapse.model_versions WHERE id > %s ORDER BY id DESC LIMIT 1",
                                    (after,)).fetchone()
                if cand is None:
                    err = conn.execute("SELECT last_error FROM pgsynapse.jobs WHERE kind = 'retrain'").fetchone()
                    raise SystemExit(f"retrain failed: {err}")
        vid, status, path, metrics, passage = cand
        model = SentenceTransformer(path, device="cpu", local_files_only=True)
        run: dict[str, Any] = {"seed": seed, "status": status, "gate": metrics.get("gate"),
                               "wall_seconds": round(wall, 1), "train_seconds": metrics.get("train_seconds"),
                               "teacher": metrics.get("teacher"), "relabelled": metrics.get("teacher_relabelled"),
                               "peak_rss_mb": metrics.get("peak_rss_mb_observed"), "passage_version": passage}
        for name, items in halves.items():
            rel = [set(q["relevant"]) for q in items]
            qv = _encode(model, [q["q"] for q in items])
            run[name] = _vectors_recall(qv, vecs, pages, rel, per, (seed, name))
            run[f"{name} served"] = served_order.recall(name, qv, vecs, rel, per, (seed, f"{name} served"))
            for key, order in ((name, "vectors"), (f"{name} served", "served")):
                emit("learning", f"candidate_{name}", seed=seed, order=order, **run[key],
                     recall5_gain=round(run[key]["recall@5"] - base[key]["recall@5"], 1),
                     mrr10_gain=round(run[key]["mrr@10"] - base[key]["mrr@10"], 3),
                     **_interval(per[("base", key)], [per[(seed, key)]]))
        passed = bool((metrics.get("gate") or {}).get("passed"))
        # a candidate the gate passes must be no worse on the held-out set, at recall@5 and at MRR@10
        agrees = {key: passed <= (run[key]["recall@5"] >= base[key]["recall@5"]
                                  and run[key]["mrr@10"] >= base[key]["mrr@10"])
                  for key in ("report", "report served", "users-report", "users-report served")}
        emit("learning", "retrain", seed=seed, version=vid, status=status, wall_seconds=round(wall, 1),
             train_seconds=metrics.get("train_seconds"), steps=metrics.get("steps"),
             peak_rss_mb=metrics.get("peak_rss_mb_observed"), gate_passed=passed, teacher=metrics.get("teacher"),
             relabelled=metrics.get("teacher_relabelled"), synthetic_pairs=metrics.get("synthetic_pairs"),
             gate_agrees_with_report=agrees["report"], gate_agrees_with_report_served=agrees["report served"],
             gate_agrees_with_users_report=agrees["users-report"],
             gate_agrees_with_users_report_served=agrees["users-report served"])
        print(json.dumps({"seed": seed, "metrics": {k: v for k, v in metrics.items() if k != "used_example_ids"}},
                         default=str))
        runs.append(run)
    for name, order in itertools.product(SETS, ("vectors", "served")):
        key = name if order == "vectors" else f"{name} served"
        gains = [r[key]["recall@5"] - base[key]["recall@5"] for r in runs]
        mrr = [r[key]["mrr@10"] - base[key]["mrr@10"] for r in runs]
        emit("learning", f"summary_{name}", order=order, seeds=len(runs),
             recall5_gain_mean=round(statistics.mean(gains), 2),
             recall5_gain_min=round(min(gains), 1), recall5_gain_max=round(max(gains), 1),
             mrr10_gain_mean=round(statistics.mean(mrr), 4), mrr10_gain_min=round(min(mrr), 4),
             **_interval(per[("base", key)], [per[(r["seed"], key)] for r in runs]))
    _misses(halves, per, [r["seed"] for r in runs])
    table()


if __name__ == "__main__":
    run_benchmark(main)
