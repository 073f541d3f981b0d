"""Benchmark `learning` (issue 7): dev recall@5 / MRR@10 before and after retraining from feedback.

Feedback = ../shared/data/pg_docs_train.jsonl (a question and the page that answered it, inserted as answered
questions plus `helpful` feedback on a passage of that page). The worker's own retrain job trains a candidate
(in its own process), gates it on the newest 20 % of that feedback, and registers it. Held-out questions =
pg_docs_dev.jsonl, never trained on. "after" is measured on the candidate's vectors of every chunk (what a
backfill writes), whether or not the gate passed it.

    python -m bench.learning
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio
import numpy as np
import psycopg

from bench.common import emit, machine, parser, questions, table
from bench.corpusdb import corpus_clone
from bench.retrieval import retrieve_pages, score, vectors_recall


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--margin", type=float, default=None, help="gate margin (default: the setting's)")
    args = p.parse_args()
    emit("learning", "machine", **machine())
    dev = questions("pg_docs_dev.jsonl")
    train = questions("pg_docs_train.jsonl")
    relevant = [set(q["relevant"]) for q in dev]
    from pgsynapse.config import load_settings
    from pgsynapse.listener.worker import Worker
    from pgsynapse.models import ModelCache

    models = ModelCache()
    with corpus_clone() as (url, info):
        emit("learning", "corpus", **info)
        with psycopg.connect(url, autocommit=True) as conn:
            cols = ["id", "name", "artifact_path", "runtime", "dim", "status"]
            v1 = dict(zip(cols, conn.execute(f"SELECT {', '.join(cols)} FROM pgsynapse.model_versions WHERE id = 1")
                          .fetchone(), strict=True))
        before = score(anyio.run(lambda: retrieve_pages(url, [q["q"] for q in dev], version=v1, hybrid=False,
                                                        models=models)), relevant)
        emit("learning", "dev_before_product_path", **before)
        from pgvector.psycopg import register_vector

        with psycopg.connect(url, autocommit=True) as conn:
            register_vector(conn)
            rows = conn.execute("SELECT e.chunk_id, e.embedding, d.source FROM pgsynapse.embeddings e JOIN"
                                " pgsynapse.chunks c ON c.id = e.chunk_id JOIN pgsynapse.documents d ON d.id = c.document_id"
                                " WHERE e.model_version_id = 1").fetchall()
        base_vecs = np.stack([np.asarray(r[1].to_numpy() if hasattr(r[1], "to_numpy") else r[1], dtype=np.float32) for r in rows])
        base_q = models.get(v1).encode([q["q"] for q in dev])
        before = vectors_recall(base_q, base_vecs, [r[2] for r in rows], relevant)
        emit("learning", "dev_before", **before)

        overrides = {"database_url": url, "kinds": ("retrain", "backfill"), "retrain_min_feedback": len(train),
                     "data_dir": str(Path("/tmp/pgsynapse-bench-learning"))}
        if args.margin is not None:
            overrides["retrain_margin"] = args.margin
        settings = load_settings(**overrides)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE pgsynapse.learning_settings SET retrain_min_feedback = %s", (len(train),))
            # users' feedback: each train question answered by its page; they mark a passage of it helpful
            for t in train:
                qid = conn.execute("INSERT INTO pgsynapse.questions (session_id, text, status) VALUES ('train', %s,"
                                   " 'answered') RETURNING id", (t["q"],)).fetchone()[0]
                chunk = conn.execute("SELECT c.id FROM pgsynapse.chunks c JOIN pgsynapse.documents d"
                                     " ON d.id = c.document_id WHERE d.source = %s ORDER BY c.ord LIMIT 1",
                                     (t["page"],)).fetchone()
                if chunk:
                    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id) VALUES (%s, true, %s)",
                                 (qid, chunk[0]))
            queued = conn.execute("SELECT count(*) FROM pgsynapse.jobs WHERE kind = 'retrain'").fetchone()[0]
        emit("learning", "feedback", examples=len(train), retrain_jobs_queued=queued)

        started = time.perf_counter()

        async def run() -> None:
            worker = Worker(settings, url)
            async with anyio.create_task_group() as tg:
                await tg.start(lambda task_status: worker.run(task_status=task_status, handle_signals=False))
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    await conn.execute("LISTEN pgsynapse_models")
                    await conn.execute("LISTEN pgsynapse_jobs")
                    while True:
                        row = await (await conn.execute(
                            "SELECT count(*) FROM pgsynapse.model_versions WHERE id > 1 AND"
                            " (status = 'rejected' OR backfilled_at IS NOT NULL)")).fetchone()
                        failed = await (await conn.execute(
                            "SELECT last_error FROM pgsynapse.jobs WHERE kind = 'retrain' AND status = 'failed'")).fetchone()
                        if row[0] or failed:
                            break
                        async for _ in conn.notifies(timeout=30, stop_after=1):
                            pass
                worker.request_stop()

        anyio.run(run)
        wall = time.perf_counter() - started
        with psycopg.connect(url, autocommit=True) as conn:
            cand = conn.execute("SELECT id, status, artifact_path, metrics FROM pgsynapse.model_versions WHERE id > 1"
                                " ORDER BY id DESC LIMIT 1").fetchone()
            if cand is None:
                err = conn.execute("SELECT last_error FROM pgsynapse.jobs WHERE kind = 'retrain'").fetchone()
                raise SystemExit(f"retrain failed: {err}")
            chunk_pages = dict(conn.execute("SELECT c.id, d.source FROM pgsynapse.chunks c JOIN pgsynapse.documents d"
                                            " ON d.id = c.document_id").fetchall())
        vid, status, path, metrics = cand
        emit("learning", "retrain", version=vid, status=status, wall_seconds=round(wall, 1),
             train_seconds=metrics.get("train_seconds"), steps=metrics.get("steps"),
             peak_rss_mb=metrics.get("peak_rss_mb_observed"), synthetic_pairs=metrics.get("synthetic_pairs"),
             train_examples=metrics.get("train_examples"), heldout=metrics.get("heldout"))
        emit("learning", "gate_heldout", active_recall5=round(100 * metrics["active"]["recall@5"], 1),
             candidate_recall5=round(100 * metrics["candidate"]["recall@5"], 1),
             active_mrr10=round(metrics["active"]["mrr@10"], 3), candidate_mrr10=round(metrics["candidate"]["mrr@10"], 3),
             passed=metrics["gate"]["passed"], delta=metrics["gate"]["delta"])
        from sentence_transformers import SentenceTransformer

        ids = np.load(Path(path) / "chunk_ids.npy")
        vecs = np.load(Path(path) / "chunk_vectors.npy")
        cand_model = SentenceTransformer(path, device="cpu", local_files_only=True)
        qv = cand_model.encode([q["q"] for q in dev], normalize_embeddings=True, convert_to_numpy=True)
        after = vectors_recall(qv, vecs, [chunk_pages[int(i)] for i in ids], relevant)
        emit("learning", "dev_after", **after)
        emit("learning", "dev_gain", recall5_points=round(after["recall@5"] - before["recall@5"], 1),
             mrr10=round(after["mrr@10"] - before["mrr@10"], 3))
        print(json.dumps({"metrics": {k: v for k, v in metrics.items() if k != "used_example_ids"}}, default=str))
    table()


if __name__ == "__main__":
    main()
