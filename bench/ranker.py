"""Benchmark `ranker` (issue 20 part 3): a second-stage cross-encoder against the vector order, for quality and for
the answer's latency.

The goal it checks: "dev MRR@10 +0.05 over vector-only, recall@5 not lower, and question INSERT -> answer NOTIFY
p50 still <= 300 ms on 2 cores (ONNX INT8 for the ranker too)".

On a fresh clone of the embedded docs corpus (bench/corpusdb.py): the train file's feedback is put in as rows
(bench/learning.py: answered questions and a `helpful` passage of their page), then `pgsynapse ranker train`
(:func:`pgsynapse.ranking.learn.train_ranker`, ``force``: the gate's verdict is recorded, the ranker registered
whatever it says) trains the cross-encoder from the active version's MiniLM weights, exports it to ONNX INT8 and
registers it. Then:

- **quality**: page recall@5 and MRR@10 on the dev questions (bench/devsplit.py: settings are chosen on ``tune``,
  the headline is ``report``), through :func:`pgsynapse.search.search` (the HNSW index, as served): the vector
  order of the first 10 pages against the ranker's order of the first ``rank_candidates`` chunks;
- **latency**: a worker process on the default settings (onnx-int8, the extractive answerer), the dev questions
  asked one at a time, INSERT -> final answer NOTIFY: once with the ranker active and once with none (the
  ceiling: the same worker without the second stage), alternating halves of the questions so load drift hits both;
  plus the ranker's own scoring time per question.

    python -m bench.ranker                    # the shipped settings
    python -m bench.ranker --candidates 30 --epochs 2
    python -m bench.ranker --quick            # a small corpus and a short budget: checks the code path
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg.rows import dict_row

from bench.common import (
    RESULTS, ask_one_at_a_time, emit, machine, parser, pct, questions, run_benchmark, spawn_worker, stop, table)
from bench.corpusdb import corpus_clone, on_corpus_server
from bench.devsplit import HALVES, split
from bench.learning import _feedback
from bench.retrieval import score
from bench.teacher import teacher_ranker
from pgsynapse.config import load_settings
from pgsynapse.models import ModelCache
from pgsynapse.ranking.learn import train_ranker
from pgsynapse.ranking.registry import REGISTRY
from pgsynapse.ranking.rescore import rescore
from pgsynapse.ranking.scorer import Ranker, passage_text, rerank
from pgsynapse.search import search

GOAL_MRR_GAIN = 0.05
GOAL_P50_MS = 300.0
QUICK_PAGES = 60
LATENCY_TRAIN_QUESTIONS = 63  # beside the 60 dev questions: 120 asked once each after 3 warm-ups, 60 per arm


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _pages(hits: list[Any]) -> list[str]:
    """The first 10 distinct pages of a ranking of chunks."""
    pages: list[str] = []
    for h in hits:
        if h.source not in pages:
            pages.append(h.source)
    return pages[:10]


async def _vector_hits(url: str, items: list[dict[str, Any]], models: ModelCache, k: int = 30) -> list[list[Any]]:
    """The first ``k`` chunks of the vector search (the HNSW index, as served) per question."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
        return [await search(conn, models, item["q"], k=k, hybrid=False) for item in items]


async def _rescored(url: str, models: ModelCache, row: dict[str, Any], items: list[dict[str, Any]],
                    hits: list[list[Any]], n: int) -> list[tuple[list[Any], float]]:
    """A teacher version ranker's order (the answer handler's :func:`rescore`: the teacher's question vector
    against its stored chunk vectors) of each question's first ``n`` hits, then the rest; and each one's ms."""
    out = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
        await register_vector_async(conn)
        for item, h in zip(items, hits, strict=True):
            started = time.perf_counter()
            order = await rescore(conn, models, row, item["q"], [x.chunk_id for x in h[:n]])
            by_id = {x.chunk_id: x for x in h[:n]}
            out.append(([by_id[c] for c in order] + h[n:], (time.perf_counter() - started) * 1000))
    return out


def _ranked(ranker: Ranker, question: str, hits: list[Any], n: int) -> tuple[list[Any], float]:
    """The first ``n`` hits in the ranker's order, then the rest in the vector order; and the scoring's ms."""
    started = time.perf_counter()
    head = rerank(ranker, question, hits[:n], lambda h: passage_text(h.title, h.text), lambda h: h.score)
    return head + hits[n:], (time.perf_counter() - started) * 1000


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, help="rank_candidates (default: the setting's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--negatives", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--layers", type=int, help="ranker_layers")
    p.add_argument("--negatives-skip", type=int, help="ranker_negatives_skip")
    p.add_argument("--eval-candidates", default="10,20", help="candidate counts the quality is measured at "
                   "(comma-separated; the latency runs at rank_candidates)")
    p.add_argument("--lr", type=float)
    p.add_argument("--synthetic-pairs", type=int)
    p.add_argument("--budget-seconds", type=float, default=1800.0)
    p.add_argument("--ranker", help="a ranker directory trained before (with model_int8.onnx): no training")
    p.add_argument("--teacher", action="store_true", help="the teacher as the ranker (runtime version): "
                   "all-mpnet-base-v2 added as a model version, backfilled, then `ranker add version:N`; no training")
    p.add_argument("--teacher-model", type=Path, help="with --teacher: mpnet's ONNX export from an earlier run "
                   "(DATA_DIR/models/vN-onnx-int8-...): added as it is, no export")
    p.add_argument("--teacher-vectors", type=Path, help="with --teacher: mpnet's vectors of the template's chunks "
                   "computed elsewhere (bench/gpu_distill.py), written before the worker's backfill")
    p.add_argument("--no-latency", action="store_true", help="quality only")
    args = p.parse_args()
    on_corpus_server(args.database_url, lambda: run(args))


def run(args: Any) -> None:
    if args.quick:
        args.budget_seconds = min(args.budget_seconds, 60)
    halves = split(questions("pg_docs_dev.jsonl"))
    train = questions("pg_docs_train.jsonl")
    data_dir = Path(tempfile.gettempdir()) / "pgsynapse-bench-models" / f"ranker-{os.getpid()}"
    overrides = {k: v for k, v in {"rank_candidates": args.candidates, "ranker_epochs": args.epochs,
                                   "ranker_negatives": args.negatives, "ranker_max_length": args.max_length,
                                   "ranker_layers": args.layers, "ranker_negatives_skip": args.negatives_skip,
                                   "ranker_lr": args.lr, "ranker_synthetic_pairs": args.synthetic_pairs}.items()
                 if v is not None}
    with corpus_clone(limit=QUICK_PAGES if args.quick else None) as (url, info):
        settings = load_settings(environ={}, database_url=url, data_dir=str(data_dir), torch_threads=args.threads,
                                 onnx_threads=args.threads, ranker_budget_seconds=args.budget_seconds, **overrides)
        emit("ranker", "machine", **machine(), loadavg=_load(), candidates=settings.rank_candidates,
             epochs=settings.ranker_epochs, negatives=settings.ranker_negatives,
             max_length=settings.ranker_max_length, lr=settings.ranker_lr, layers=settings.ranker_layers,
             negatives_skip=settings.ranker_negatives_skip,
             synthetic_pairs=settings.ranker_synthetic_pairs)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            with psycopg.connect(url, autocommit=True) as plain:  # bench.learning reads tuples
                _feedback(plain, train)
            emit("ranker", "corpus", **info, feedback=len(train))
            if args.teacher:
                teacher, row, bf = teacher_ranker(settings, url, args.teacher_vectors, args.teacher_model)
                emit("ranker", "teacher", version=teacher["id"], dim=teacher["dim"], path=teacher["artifact_path"],
                     **bf)
                train_s = None
            elif args.ranker:
                row = REGISTRY.add_model(conn, "bench", args.ranker, "onnx-int8")
                train_s = None
            else:
                started = time.perf_counter()
                row = train_ranker(settings, force=True, out_dir=data_dir / "ranker")
                train_s = round(time.perf_counter() - started, 1)
                m, gate = row["metrics"], row["gate"]
                emit("ranker", "train", ranker=row["id"], wall_seconds=train_s, steps=m["steps"],
                     planned_steps=m["planned_steps"], groups=m["groups"], heldout=m["heldout"],
                     train_seconds=m["train_seconds"], peak_rss_mb=m.get("peak_rss_mb_observed"),
                     runtime=m["runtime"], agreement=m["agreement"], gate_passed=gate["passed"],
                     heldout_mrr_vector=round(m["active"]["mrr@10"], 3),
                     heldout_mrr_ranker=round(m["candidate"]["mrr@10"], 3),
                     gate_reasons=" | ".join(gate["reasons"]), loadavg=_load())
            row = REGISTRY.get_model(conn, row["id"])
        models = ModelCache(threads=args.threads, onnx_threads=args.threads)
        ranker = None if row["runtime"] == "version" else Ranker(row, threads=args.threads)
        quality: dict[str, dict[str, dict[str, float]]] = {}
        counts = sorted({int(c) for c in args.eval_candidates.split(",")} | {settings.rank_candidates})
        score_ms: list[float] = []
        for half in HALVES:
            items = halves[half]
            relevant = [set(q["relevant"]) for q in items]
            hits = anyio.run(_vector_hits, url, items, models)
            quality[half] = {"vector": score([_pages(h) for h in hits], relevant, 5)}
            emit("ranker", f"quality_{half}", order="vector", n=len(items), **quality[half]["vector"])
            for n in counts:
                ranked = anyio.run(_rescored, url, models, row, items, hits, n) if ranker is None else \
                    [_ranked(ranker, q["q"], h, n) for q, h in zip(items, hits, strict=True)]
                quality[half][f"ranker@{n}"] = score([_pages(r) for r, _ in ranked], relevant, 5)
                if n == settings.rank_candidates:
                    score_ms += [ms for _, ms in ranked]
                emit("ranker", f"quality_{half}", order=f"ranker, {n} candidates", n=len(items),
                     **quality[half][f"ranker@{n}"], scoring_p50_ms=round(statistics.median(ms for _, ms in ranked), 1))
        emit("ranker", "scoring", candidates=settings.rank_candidates, ranker=row["runtime"],
             max_length=ranker.max_length if ranker else None,
             p50_ms=round(statistics.median(score_ms), 1), p95_ms=round(pct(score_ms, 95), 1), loadavg=_load())
        asked = [q["q"] for h in HALVES for q in halves[h]] + [t["q"] for t in train[:LATENCY_TRAIN_QUESTIONS]]
        latency = {} if args.no_latency else _latency(url, row["id"], asked, settings.rank_candidates)
    rep = quality["report"]
    served = rep[f"ranker@{settings.rank_candidates}"]
    gain = served["mrr@10"] - rep["vector"]["mrr@10"]
    emit("ranker", "goal", candidates=settings.rank_candidates, mrr10_gain_report=round(gain, 3),
         recall5_change_report=round(served["recall@5"] - rep["vector"]["recall@5"], 1),
         answer_p50_ms_ranked=latency.get("ranker"), answer_p50_ms_vector=latency.get("vector"),
         met=(gain >= GOAL_MRR_GAIN and served["recall@5"] >= rep["vector"]["recall@5"]
              and latency.get("ranker", 1e9) <= GOAL_P50_MS) if not args.quick else "not judged (--quick)",
         train_wall_seconds=train_s, loadavg=_load())
    for prefix in ("quality", "scoring", "latency", "goal"):
        table([r for r in RESULTS if r["name"].startswith(prefix)])


def _latency(url: str, ranker_id: int, texts: list[str], candidates: int) -> dict[str, float]:
    """INSERT -> answer NOTIFY p50 on a worker with the shipped defaults, with the ranker serving and with none:
    blocks of 10 questions, each block asked once, by one arm (ABBA order against load drift). A question asked
    twice would find its embeddings in the inference cache the second time (the answer cache is off)."""
    # answers only: the feedback put in for training queues a retrain, which would share the cores
    proc = spawn_worker(url, {"PGSYNAPSE_KINDS": "answer", "PGSYNAPSE_RUNTIME": "onnx-int8",
                              "PGSYNAPSE_ANSWER_CACHE": "false",
                              "PGSYNAPSE_RANK_CANDIDATES": str(candidates)})
    lat: dict[str, list[float]] = {"vector": [], "ranker": []}
    try:
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn, \
                psycopg.connect(url, autocommit=True) as listen:
            REGISTRY.set_traffic(conn, ranker_id, 100)
            ask_one_at_a_time(listen, texts[:3], "warm")  # the models and the ranker loaded, caches warm
            blocks = [texts[i:i + 10] for i in range(3, len(texts), 10)]  # the first 3 warmed the worker
            for b, block in enumerate(blocks):
                name = "ranker" if b % 4 in (0, 3) else "vector"
                # the candidate ranker serves every session (100 %) or none (0 %: the vector order)
                REGISTRY.set_traffic(conn, ranker_id, 100 if name == "ranker" else 0)
                lat[name] += ask_one_at_a_time(listen, block, f"lat-{name}-{b}")
    finally:
        stop(proc)
    out = {}
    for name, values in lat.items():
        out[name] = round(statistics.median(values), 1)
        emit("ranker", "latency", order=name, n=len(values), p50_ms=out[name], p95_ms=round(pct(values, 95), 1),
             p99_ms=round(pct(values, 99), 1), loadavg=_load())
    return out


if __name__ == "__main__":
    run_benchmark(main)
