"""Peers: the same PostgreSQL-docs pages through pgai's vectorizer worker and through pgsynapse, in one run,
with the same base model, all-MiniLM-L6-v2: pgai reaches it through its OpenAI provider pointed at
``bench.embed_server`` on 127.0.0.1 (sentence-transformers on torch); pgsynapse runs it on the runtime a default
install switches to at its first start (onnx-int8 ``smooth-static``, agreement-checked; ``--runtime torch`` for
the same runtime on both sides).

For each system: pages/s from the INSERT of the pages to the last embedding committed (the worker already
running and idle), chunks, the efficiency ratio (end-to-end chunks/s / raw ``encode`` chunks/s of the same
model on that system's own chunk texts, measured in this run), idle single-INSERT -> embedding latency, and
page-level recall@5 / MRR@10 on ``pg_docs_dev.jsonl`` over that system's own chunks (exact cosine kNN of the
question embedded by the same model). pgai runs with its defaults (recursive character splitter 800/400,
``$chunk`` formatting) and its shortest documented poll interval (1 s); pgsynapse with its defaults otherwise.

pgai lives in its own virtualenv, never in pgsynapse's dependencies:

    python3 -m venv /tmp/pgai-venv && /tmp/pgai-venv/bin/pip install 'pgai[vectorizer-worker]==0.12.1'
    python -m bench.peers [--quick] [--pages N] [--pgai-venv /tmp/pgai-venv]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from bench.common import DEFAULT_INT8_SCHEME, corpus, database, emit, machine, parser, pct, questions, run_benchmark, set_runtime, spawn_worker, stop, table
from bench.latency import idle_latency, one_chunk_texts
from bench.retrieval import score
from pgsynapse.models import ModelCache


def page_pool(n: int) -> tuple[list[dict[str, str]], list[dict]]:
    """The dev questions' pages first, then the corpus in order; the dev questions answerable in the pool."""
    pages = corpus()
    dev = questions("pg_docs_dev.jsonl")
    relevant = {p for d in dev for p in d["relevant"]}
    pages = [p for p in pages if p["id"] in relevant] + [p for p in pages if p["id"] not in relevant]
    pool = pages[:n]
    ids = {p["id"] for p in pool}
    return pool, [d for d in dev if set(d["relevant"]) & ids]


def wait_for(conn: psycopg.Connection, sql: str, params=None, timeout: float = 3600, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not conn.execute(sql, params).fetchone()[0]:
        if time.monotonic() > deadline:
            raise TimeoutError(sql)
        time.sleep(every)


def ceiling(embedder, texts: list[str], batch: int = 32) -> float:
    embedder.encode(texts[:batch], batch)  # warm
    started = time.perf_counter()
    embedder.encode(texts, batch)
    return len(texts) / (time.perf_counter() - started)


def ranked_pages(conn: psycopg.Connection, sql: str, qvecs: np.ndarray, depth: int = 40) -> list[list[str]]:
    out = []
    for v in qvecs:
        pages: list[str] = []
        for (page,) in conn.execute(sql, (v, depth)):
            if page not in pages:
                pages.append(page)
        out.append(pages[:10])
    return out


# -- pgsynapse -------------------------------------------------------------------------------------------------
def run_pgsynapse(url: str, pages, dev, embedder, latency_docs, threads: int) -> dict:
    env = {"PGSYNAPSE_TORCH_THREADS": str(threads)} if threads else {}
    worker = spawn_worker(url, env)
    try:
        idle_latency(url, latency_docs[:5])  # warm the worker's paths
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM pgsynapse.documents")
            started = time.perf_counter()
            conn.execute(
                "INSERT INTO pgsynapse.documents (source, title, body)"
                " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])",
                ([p["id"] for p in pages], [p["title"] for p in pages], [p["text"] for p in pages]))
            wait_for(conn, "SELECT NOT EXISTS (SELECT 1 FROM pgsynapse.documents WHERE status = 'pending')")
            seconds = time.perf_counter() - started
            texts = [r[0] for r in conn.execute(
                "SELECT c.text FROM pgsynapse.chunks c ORDER BY c.document_id, c.ord")]
            embed_texts = [r[0] for r in conn.execute(
                "SELECT coalesce(d.title || E'\\n', '') || c.text FROM pgsynapse.chunks c"
                " JOIN pgsynapse.documents d ON d.id = c.document_id ORDER BY c.document_id, c.ord")]
        lat = idle_latency(url, latency_docs[5:])
    finally:
        stop(worker)
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        qvecs = embedder.encode([d["q"] for d in dev], 32)
        ranked = ranked_pages(conn, (
            "SELECT d.source FROM pgsynapse.embeddings e JOIN pgsynapse.chunks c ON c.id = e.chunk_id"
            " JOIN pgsynapse.documents d ON d.id = c.document_id WHERE e.model_version_id = 1"
            " ORDER BY e.embedding::vector(384) <=> %s::vector(384) LIMIT %s"), qvecs)
    ceil = ceiling(embedder, embed_texts)
    return {"pages": len(pages), "chunks": len(texts), "seconds": seconds, "ceiling_chunks_per_s": ceil,
            "latency_ms": lat, **score(ranked, [set(d["relevant"]) for d in dev])}


# -- pgai --------------------------------------------------------------------------------------------------------
def pgai_command(venv: Path) -> Path:
    """The ``pgai`` command of ``venv``, else a SystemExit saying how to install it (asked before any work: the
    pgsynapse half takes minutes)."""
    pgai = venv / "bin" / "pgai"
    if not pgai.exists():
        raise SystemExit(f"pgai not found at {pgai}: python3 -m venv {venv} && "
                         f"{venv}/bin/pip install 'pgai[vectorizer-worker]==0.12.1' (or --pgai-venv DIR)")
    return pgai


def run_pgai(url: str, pages, dev, embedder, latency_docs, pgai: Path, threads: int) -> dict:
    subprocess.run([str(pgai), "install", "-d", url], check=True, capture_output=True, text=True, timeout=300)
    server = subprocess.Popen([sys.executable, "-m", "bench.embed_server", "--port", "0",
                               *(["--threads", str(threads)] if threads else [])],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert server.stdout is not None
    base_url = server.stdout.readline().strip().rsplit(" ", 1)[-1]
    worker = None
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE public.pages (id text PRIMARY KEY, title text, body text NOT NULL)")
            conn.execute(
                "SELECT ai.create_vectorizer('public.pages'::regclass,"
                " loading => ai.loading_column('body'),"
                " embedding => ai.embedding_openai('all-MiniLM-L6-v2', 384, base_url => %s),"
                " destination => ai.destination_table('pages_embeddings'))", (base_url,))
            env = {**os.environ, "OPENAI_API_KEY": "local-server"}
            worker = subprocess.Popen([str(pgai), "vectorizer", "worker", "-d", url, "--poll-interval", "1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            # warm: one page through the whole path, then an empty queue
            conn.execute("INSERT INTO public.pages VALUES ('warm-up', 'Warm-up', 'A first page to warm the worker.')")
            wait_for(conn, "SELECT EXISTS (SELECT 1 FROM public.pages_embeddings_store WHERE id = 'warm-up')")
            conn.execute("DELETE FROM public.pages")
            wait_for(conn, "SELECT ai.vectorizer_queue_pending(1, exact_count => true) = 0")
            nonblank = sum(1 for p in pages if p["text"].strip())
            started = time.perf_counter()
            conn.execute("INSERT INTO public.pages SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])",
                         ([p["id"] for p in pages], [p["title"] for p in pages], [p["text"] for p in pages]))
            wait_for(conn, "SELECT count(DISTINCT id) >= %s FROM public.pages_embeddings_store", (nonblank,))
            wait_for(conn, "SELECT ai.vectorizer_queue_pending(1, exact_count => true) = 0")
            seconds = time.perf_counter() - started
            texts = [r[0] for r in conn.execute("SELECT chunk FROM public.pages_embeddings_store ORDER BY id, chunk_seq")]
            lat = []
            for i, (title, body) in enumerate(latency_docs):
                key = f"latency-{i}"
                conn.execute("INSERT INTO public.pages VALUES (%s, %s, %s)", (key, title, body))
                committed = time.perf_counter()
                wait_for(conn, "SELECT EXISTS (SELECT 1 FROM public.pages_embeddings_store WHERE id = %s)", (key,),
                         timeout=120, every=0.01)
                lat.append((time.perf_counter() - committed) * 1000)
            register_vector(conn)
            qvecs = embedder.encode([d["q"] for d in dev], 32)
            ranked = ranked_pages(conn, (
                "SELECT id FROM public.pages_embeddings_store WHERE id NOT LIKE 'latency-%%'"
                " ORDER BY embedding <=> %s::vector(384) LIMIT %s"), qvecs)
    finally:
        for proc in (worker, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(60)
    ceil = ceiling(embedder, texts)
    return {"pages": len(pages), "chunks": len(texts), "seconds": seconds, "ceiling_chunks_per_s": ceil,
            "latency_ms": lat, **score(ranked, [set(d["relevant"]) for d in dev])}


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--pages", type=int, default=0, help="pages (default 120, --quick 25): the dev pages first")
    p.add_argument("--pgai-venv", default=os.environ.get("PGAI_VENV", "/tmp/pgai-venv"))
    p.add_argument("--latency-n", type=int, default=0, help="idle inserts per system (default 30, --quick 10)")
    p.add_argument("--runtime", default=f"onnx-int8:{DEFAULT_INT8_SCHEME}",
                   help="pgsynapse's runtime[:int8 scheme] (default: what a default install switches to at its first start)")
    args = p.parse_args()
    pgai = pgai_command(Path(args.pgai_venv))
    n_pages = args.pages or (25 if args.quick else 120)
    n_lat = args.latency_n or (10 if args.quick else 30)
    emit("peers", "machine", **machine())
    pages, dev = page_pool(n_pages)
    latency_docs = one_chunk_texts(corpus()[-200:], n_lat + 5)
    models = ModelCache(threads=args.threads, onnx_threads=args.threads)
    embedder = models.get({"id": 1, "name": "all-MiniLM-L6-v2", "runtime": "torch", "dim": 384})
    results = {}
    with database(args.database_url) as url:
        own = models.get(set_runtime(url, *args.runtime.split(":")))
        results["pgsynapse"] = run_pgsynapse(url, pages, dev, own, latency_docs, args.threads)
        results["pgai"] = run_pgai(url, pages, dev, embedder, latency_docs[5:], pgai, args.threads)
    rows = []
    for name, r in results.items():
        lat = r.pop("latency_ms")
        chunks_per_s = r["chunks"] / r["seconds"]
        rows.append(emit("peers", name, pages=r["pages"], chunks=r["chunks"], seconds=round(r["seconds"], 1),
                         pages_per_s=round(r["pages"] / r["seconds"], 3), chunks_per_s=round(chunks_per_s, 2),
                         ceiling_chunks_per_s=round(r["ceiling_chunks_per_s"], 2),
                         efficiency=round(chunks_per_s / r["ceiling_chunks_per_s"], 3),
                         idle_p50_ms=round(pct(lat, 50), 1), idle_p95_ms=round(pct(lat, 95), 1), idle_n=len(lat),
                         recall_at_5=r["recall@5"], mrr_at_10=r["mrr@10"], dev_questions=r["questions"]))
    ps, pa = rows
    pages_ratio, latency_ratio = ps["pages_per_s"] / pa["pages_per_s"], pa["idle_p50_ms"] / ps["idle_p50_ms"]
    emit("peers", "comparison", pages_per_s_ratio=round(pages_ratio, 2), target_pages=4.0,
         idle_latency_ratio=round(latency_ratio, 1), target_latency=20.0,
         recall_at_5_pgsynapse=ps["recall_at_5"], recall_at_5_pgai=pa["recall_at_5"],
         passed=pages_ratio >= 4.0 and latency_ratio >= 20.0 and ps["recall_at_5"] >= pa["recall_at_5"])
    table()


if __name__ == "__main__":
    run_benchmark(main)
