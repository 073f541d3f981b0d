"""Benchmark `models` (issue 20): a distilled student against today's default, for speed and for quality.

The goal it checks: "a 3-layer student at >= 1.8x the throughput of today's default (6-layer onnx-int8
smooth-static) with dev recall@5 no more than 1 point below it".

On a fresh clone of the embedded docs corpus (bench/corpusdb.py): the train file's feedback is put in as rows
(bench/learning.py: answered questions and a `helpful` passage of their page, so the gate has questions; nothing
else is asked), then `pgsynapse model distill` (:func:`pgsynapse.learning.distill.distill`, ``force``: the gate's
verdict is recorded, the student registered whatever it says) trains the student, and the student is exported to
onnx-int8 the way a worker does (:func:`pgsynapse.export.optimise_version`: the first INT8 scheme whose agreement
passes, smooth-static first). Then:

- **throughput**: texts/s of the same corpus chunks (``--texts``, a fixed sample, as the backfill builds them),
  encoded at the worker's ``encode_batch_size``: v1 on its serving runtime (onnx-int8, the baseline) and the
  student's onnx-int8 in alternating rounds (the CPU is shared: each round's ratio is reported, the headline is
  the median of the rounds), and the torch weights of each once, for reference;
- **quality**: page recall@5 and MRR@10 on the dev questions (bench/devsplit.py; the headline is the ``report``
  half, ``tune`` is printed for choosing settings), each model searching its own vectors of the whole corpus
  (exact kNN): v1 its stored ones, the student the ones its INT8 runtime gives every chunk, as its backfill would.

    python -m bench.models                    # 3 layers, 3 epochs, the budget in --budget-seconds
    python -m bench.models --quick            # a small corpus and a short budget: checks the code path
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.rows import dict_row

from bench.common import RESULTS, emit, machine, parser, questions, run_benchmark, table
from bench.corpusdb import corpus_clone, on_corpus_server
from bench.devsplit import HALVES, split
from bench.learning import _feedback
from bench.retrieval import vectors_recall
from pgsynapse.chunking import Chunker
from pgsynapse.config import load_settings
from pgsynapse.export import optimise_version, source_model_path
from pgsynapse.learning.distill import distill, judge
from pgsynapse.learning.registry import add_model
from pgsynapse.models import Embedder, ModelCache, ModelSpec, load_embedder

GOAL_SPEEDUP = 1.8
GOAL_RECALL_LOSS = 1.0  # points of recall@5
QUICK_PAGES = 60


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _texts_per_s(embedder: Embedder, texts: list[str], batch: int) -> float:
    embedder.encode(texts[:batch], batch)  # warm
    started = time.perf_counter()
    embedder.encode(texts, batch)
    return len(texts) / (time.perf_counter() - started)


def _corpus(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every chunk with v1's stored vector and its page, in chunk order."""
    return conn.execute(
        "SELECT c.id, d.title, c.text, d.source, e.embedding FROM pgsynapse.chunks c"
        " JOIN pgsynapse.documents d ON d.id = c.document_id JOIN pgsynapse.embeddings e ON e.chunk_id = c.id"
        " AND e.model_version_id = 1 ORDER BY c.id").fetchall()


def _embed_texts(embedder: Embedder, rows: list[dict[str, Any]], chunk_tokens: int) -> list[str]:
    """What the backfill gives the model for each chunk (handlers/backfill.py)."""
    chunker = Chunker(embedder.tokenizer, min(chunk_tokens, embedder.max_seq_length), 0)
    return [chunker.embed_text(r["title"], r["text"]) for r in rows]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=3, help="transformer layers the student keeps")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--budget-seconds", type=float, default=1500.0, help="distill_budget_seconds: caps the training")
    p.add_argument("--texts", type=int, default=2000, help="corpus chunks the throughput is measured on")
    p.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds of the two INT8 models")
    p.add_argument("--student", help="a student trained before (a `model distill` directory, or its exported ONNX"
                                      " one): no training")
    p.add_argument("--speed-only", action="store_true", help="throughput only: no corpus re-encoding, no recall")
    args = p.parse_args()
    on_corpus_server(args.database_url, lambda: run(args))


def run(args: Any) -> None:
    if args.quick:
        args.budget_seconds, args.epochs, args.texts, args.rounds = min(args.budget_seconds, 60), 1, 200, 1
    args.rounds = max(1, args.rounds)
    emit("models", "machine", **machine(), loadavg=_load(), layers=args.layers, epochs=args.epochs,
         budget_seconds=args.budget_seconds)
    halves = split(questions("pg_docs_dev.jsonl"))
    train = questions("pg_docs_train.jsonl")
    data_dir = Path(tempfile.gettempdir()) / "pgsynapse-bench-models" / f"distill-{os.getpid()}"
    with corpus_clone(limit=QUICK_PAGES if args.quick else None) as (url, info):
        settings = load_settings(environ={}, database_url=url, data_dir=str(data_dir), runtime="onnx-int8",
                                 distill_budget_seconds=args.budget_seconds, torch_threads=args.threads,
                                 onnx_threads=args.threads)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            register_vector(conn)
            rows = _corpus(conn)
            with psycopg.connect(url, autocommit=True) as plain:  # bench.learning reads tuples
                _feedback(plain, train)
            emit("models", "corpus", **info, chunks=len(rows), feedback=len(train))
            if args.student:  # a student trained before (its metrics.json beside it): registered as distill does
                found = Path(args.student) / "metrics.json"  # absent from an exported ONNX directory
                trained = json.loads(found.read_text()) if found.exists() else {}
                if "gate_scores" in trained:  # trained elsewhere (bench/gpu_distill.py): the gate's verdict here
                    trained["gate"] = judge(trained, settings, force=True)
                student = add_model(conn, args.student, name=f"student-{args.layers}l",
                                    serving_runtime=settings.runtime, chunk_tokens=settings.chunk_tokens,
                                    threads=settings.torch_threads, metrics={"distilled": trained})
                distill_s = None
            else:
                started = time.perf_counter()
                student = distill(conn, settings, url, layers=args.layers, epochs=args.epochs, force=True).row
                assert student is not None  # force: registered whatever the gate said
                distill_s = round(time.perf_counter() - started, 1)
            d = conn.execute("SELECT metrics FROM pgsynapse.model_versions WHERE id = %s",
                             (student["id"],)).fetchone()["metrics"]["distilled"]
            gate = d.get("gate") or {"passed": None, "reasons": []}
            emit("models", "distill", version=student["id"], wall_seconds=distill_s,
                 train_seconds=d.get("train_seconds"), steps=d.get("steps"), planned_steps=d.get("planned_steps"),
                 stopped_at_budget=d.get("stopped_at_budget"), final_loss=d.get("final_loss"),
                 heldout_cosine_mean=d.get("heldout_cosine_mean"), heldout_cosine_p05=d.get("heldout_cosine_p05"),
                 gate_passed=gate["passed"], gate_reasons=" | ".join(gate["reasons"]), loadavg=_load())
            started = time.perf_counter()
            report = optimise_version(settings, url, student["id"], actor="bench")
            emit("models", "export", version=student["id"], accepted=report is not None,
                 scheme=report.options.get("scheme") if report else None,
                 overlap_at_10=report.agreement.overlap_at_10 if report else None,
                 cosine_mean=report.agreement.cosine_mean if report else None,
                 seconds=round(time.perf_counter() - started, 1), loadavg=_load())
            cols = "id, name, artifact_path, runtime, dim, metrics"
            v1 = conn.execute(f"SELECT {cols} FROM pgsynapse.model_versions WHERE id = 1").fetchone()
            st = conn.execute(f"SELECT {cols} FROM pgsynapse.model_versions WHERE id = %s", (student["id"],)).fetchone()
    measure(args, settings, rows, v1, st, halves)


def measure(args: Any, settings: Any, rows: list[dict[str, Any]], v1: dict[str, Any], st: dict[str, Any],
            halves: dict[str, list[dict[str, Any]]]) -> None:
    models = ModelCache(threads=args.threads, onnx_threads=args.threads)
    served = {"v1": models.get(v1), "student": models.get(st)}
    torch = {name: load_embedder(ModelSpec(row["id"], row["name"], source_model_path(row, None), "torch", row["dim"]),
                                 threads=args.threads)
             for name, row in (("v1", v1), ("student", st))}
    schemes = {name: (row["metrics"].get("export") or {}).get("options", {}).get("scheme")
               for name, row in (("v1", v1), ("student", st))}
    texts = _embed_texts(served["v1"], rows, settings.chunk_tokens)
    sample = [texts[i] for i in sorted(random.Random(0).sample(range(len(texts)), min(args.texts, len(texts))))]
    batch = settings.encode_batch_size
    tps: dict[str, list[float]] = {"v1": [], "student": []}
    for r in range(args.rounds):
        for name in ("v1", "student") if r % 2 == 0 else ("student", "v1"):
            tps[name].append(_texts_per_s(served[name], sample, batch))
        emit("models", "throughput_round", round=r, v1=round(tps["v1"][-1], 1), student=round(tps["student"][-1], 1),
             ratio=round(tps["student"][-1] / tps["v1"][-1], 3), loadavg=_load())
    speedup = statistics.median(s / b for s, b in zip(tps["student"], tps["v1"], strict=True))
    ref = {name: _texts_per_s(torch[name], sample, batch) for name in ("v1", "student")}
    layers = {"v1": 6, "student": args.layers}
    for name in ("v1", "student"):
        emit("models", "throughput", model=name, layers=layers[name], runtime=served[name].spec.runtime,
             scheme=schemes[name], texts=len(sample), batch=batch, texts_per_s=round(statistics.median(tps[name]), 1),
             vs_v1_int8=round(speedup if name == "student" else 1.0, 3))
        emit("models", "throughput", model=name, layers=layers[name], runtime="torch", texts=len(sample), batch=batch,
             texts_per_s=round(ref[name], 1), vs_v1_int8=round(ref[name] / statistics.median(tps["v1"]), 3))

    if args.speed_only:
        emit("models", "goal", layers=args.layers, speedup=round(speedup, 3), speedup_met=speedup >= GOAL_SPEEDUP,
             recall="not measured (--speed-only)", loadavg=_load())
        _tables()
        return
    # quality: each model searches its own vectors of the whole corpus
    started = time.perf_counter()
    student_texts = _embed_texts(served["student"], rows, settings.chunk_tokens)
    chunk_vecs = {"v1": np.stack([np.asarray(r["embedding"].to_numpy(), dtype=np.float32) for r in rows]),
                  "student": served["student"].encode(student_texts, batch)}
    backfill_s = time.perf_counter() - started
    pages = [r["source"] for r in rows]
    quality: dict[str, dict[str, dict[str, float]]] = {}
    for name in ("v1", "student"):
        quality[name] = {}
        for half in HALVES:
            items = halves[half]
            qv = served[name].encode([q["q"] for q in items], batch)
            quality[name][half] = vectors_recall(qv, chunk_vecs[name], pages, [set(q["relevant"]) for q in items])
            emit("models", f"quality_{half}", model=name, runtime=served[name].spec.runtime, **quality[name][half])
    loss = quality["v1"]["report"]["recall@5"] - quality["student"]["report"]["recall@5"]
    emit("models", "goal", layers=args.layers, speedup=round(speedup, 3), recall5_loss_report=round(loss, 1),
         mrr10_loss_report=round(quality["v1"]["report"]["mrr@10"] - quality["student"]["report"]["mrr@10"], 3),
         met=(speedup >= GOAL_SPEEDUP and loss <= GOAL_RECALL_LOSS) if not args.quick else "not judged (--quick)",
         student_corpus_encode_s=round(backfill_s, 1),
         loadavg=_load())
    print(json.dumps({"schemes": schemes}))
    _tables()


def _tables() -> None:
    """One readable table per kind of result (the distill and export lines are long: JSON above)."""
    for prefix in ("throughput", "quality", "goal"):
        table([r for r in RESULTS if r["name"].startswith(prefix)])


if __name__ == "__main__":
    run_benchmark(main)
