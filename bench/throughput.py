"""End-to-end throughput: plain INSERTs of the PostgreSQL docs, time until every chunk is embedded, divided by
the raw ``encode`` chunks/s on the same chunk texts with the same runtime, measured in the same run (before and
after the end-to-end run; the mean is the ceiling).

    python -m bench.throughput [--quick] [--pages N] [--runtime torch|onnx|onnx-int8]
"""

from __future__ import annotations

import time

import psycopg

from bench.common import (
    add_runtime_option, corpus, database, emit, machine, parser, run_benchmark, set_runtime, spawn_worker, stop, table)
from pgsynapse.chunking import Chunker
from pgsynapse.config import load_settings
from pgsynapse.models import ModelCache


def chunk_texts(embedder, pages, settings) -> list[str]:
    chunker = Chunker(embedder.tokenizer, min(settings.chunk_tokens, embedder.max_seq_length), settings.chunk_overlap)
    return [c.embed_text for p in pages for c in chunker.split(p["title"], p["text"])]


def ceiling(embedder, texts: list[str], batch: int) -> float:
    embedder.encode(texts[:batch], batch)  # warm
    started = time.perf_counter()
    embedder.encode(texts, batch)
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--pages", type=int, default=0, help="pages of the corpus (default: 200, --quick 30)")
    add_runtime_option(p)
    args = p.parse_args()
    n_pages = args.pages or (30 if args.quick else 200)
    emit("throughput", "machine", **machine())
    pages = corpus(n_pages)
    with database(args.database_url) as url:
        row = set_runtime(url, args.runtime)
        settings = load_settings(environ={}, database_url=url)
        embedder = ModelCache(threads=args.threads, onnx_threads=args.threads).get(row)
        texts = chunk_texts(embedder, pages, settings)
        before = ceiling(embedder, texts, settings.encode_batch_size)
        emit("throughput", "ceiling_before", runtime=args.runtime, chunks=len(texts), chunks_per_s=round(before, 2))
        env = {"PGSYNAPSE_TORCH_THREADS": str(args.threads), "PGSYNAPSE_ONNX_THREADS": str(args.threads)}
        worker = spawn_worker(url, env)
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                started = time.perf_counter()
                for page in pages:  # plain INSERTs, one per page, as an application would write them
                    conn.execute("INSERT INTO pgsynapse.documents (source, title, body) VALUES (%s, %s, %s)",
                                 (page["id"], page["title"], page["text"]))
                inserted = time.perf_counter() - started
                while True:
                    pending = conn.execute("SELECT count(*) FROM pgsynapse.documents WHERE status = 'pending'").fetchone()[0]
                    if pending == 0:
                        break
                    time.sleep(0.05)
                elapsed = time.perf_counter() - started
                chunks = conn.execute("SELECT count(*) FROM pgsynapse.chunks").fetchone()[0]
                failed = conn.execute("SELECT count(*) FROM pgsynapse.documents WHERE status = 'failed'").fetchone()[0]
        finally:
            stop(worker)
        e2e = chunks / elapsed
        emit("throughput", "end_to_end", runtime=args.runtime, pages=len(pages), chunks=chunks, failed=failed,
             insert_s=round(inserted, 2), seconds=round(elapsed, 2), chunks_per_s=round(e2e, 2))
        after = ceiling(embedder, texts, settings.encode_batch_size)
        emit("throughput", "ceiling_after", runtime=args.runtime, chunks=len(texts), chunks_per_s=round(after, 2))
        ceil = (before + after) / 2
        emit("throughput", "ratio", runtime=args.runtime, e2e_chunks_per_s=round(e2e, 2), ceiling_chunks_per_s=round(ceil, 2),
             ratio=round(e2e / ceil, 3), target=0.9, passed=e2e / ceil >= 0.9)
    table()


if __name__ == "__main__":
    run_benchmark(main)
