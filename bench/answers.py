"""Benchmark `answers` (issue 4): retrieval recall@5 / MRR@10 at page level, vector and hybrid, through the
product's retrieval path, on the held-out dev questions (all, and bench/devsplit.py's halves), the user-worded set's
halves and the 340 train questions (nothing is trained here); and question INSERT -> answer NOTIFY latency
p50/p95/p99 over at least 200 questions asked one at a time to an idle worker, beside the raw time to embed one
question.

    python -m bench.answers [--questions 200]
    python -m bench.answers --questions 0      # retrieval quality only
"""

from __future__ import annotations

import time

import anyio
import psycopg

from bench.common import (
    ask_one_at_a_time, emit, machine, parser, pct, questions, run_benchmark, spawn_worker, stop, table)
from bench.corpusdb import corpus_clone
from bench.devsplit import held_out
from bench.retrieval import retrieve_pages, score
from pgsynapse.models import ModelCache


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--questions", type=int, default=200)
    args = p.parse_args()
    emit("answers", "machine", **machine())
    dev = questions("pg_docs_dev.jsonl")
    train = questions("pg_docs_train.jsonl")
    models = ModelCache()
    with corpus_clone(database_url=args.database_url) as (url, info):
        emit("answers", "corpus", **info)
        with psycopg.connect(url) as conn:
            version = conn.execute("SELECT id, name, artifact_path, runtime, dim, status FROM pgsynapse.model_versions"
                                   " WHERE status = 'active'").fetchone()
            version = dict(zip(["id", "name", "artifact_path", "runtime", "dim", "status"], version, strict=True))
        sets = {"dev": dev, **held_out(), "train": [{"q": q["q"], "relevant": [q["page"]]} for q in train]}
        for hybrid in (False, True):
            for name, items in sets.items():
                ranked = anyio.run(lambda: retrieve_pages(url, [q["q"] for q in items], version=version,
                                                          hybrid=hybrid, models=models))  # noqa: B023 - run at once
                emit("answers", "retrieval_hybrid" if hybrid else "retrieval_vector", set=name,
                     **score(ranked, [set(q["relevant"]) for q in items]))

        if not args.questions:
            table()
            return
        embedder = models.get(version)
        embedder.encode(["warm up"])
        t = []
        for q in dev[:50]:
            s = time.perf_counter()
            embedder.encode([q["q"]])
            t.append((time.perf_counter() - s) * 1000)
        emit("answers", "raw_query_embedding_ms", p50=round(pct(t, 50), 1), p95=round(pct(t, 95), 1))

        texts = [q["q"] for q in dev] + [q["q"] for q in train]
        texts = (texts * (args.questions // len(texts) + 1))[: args.questions]
        worker = spawn_worker(url, {"PGSYNAPSE_KINDS": "answer"})
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                lat = ask_one_at_a_time(conn, texts, "bench", timeout=60)
                rows = conn.execute("SELECT latency_ms FROM pgsynapse.questions WHERE session_id LIKE 'bench-%'").fetchall()
                row_lat = [r[0] for r in rows if r[0] is not None]
        finally:
            stop(worker)
        emit("answers", "insert_to_answer_notify_ms", n=len(lat), p50=round(pct(lat, 50), 1),
             p95=round(pct(lat, 95), 1), p99=round(pct(lat, 99), 1))
        emit("answers", "row_latency_ms", n=len(row_lat), p50=round(pct(row_lat, 50), 1),
             p95=round(pct(row_lat, 95), 1), p99=round(pct(row_lat, 99), 1))
    table()


if __name__ == "__main__":
    run_benchmark(main)
