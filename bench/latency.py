"""Latency at idle and the single-row stream.

1. Idle: one single-row INSERT at a time into a worker at rest; time from the INSERT's commit to the
   ``pgsynapse_documents`` NOTIFY that the worker sends in the transaction that commits the embedding.
   p50/p95/p99 over >= 200 inserts, beside the raw model time of one chunk (the same texts, encode([text])).
2. Stream vs bulk: the same N one-chunk documents, once as one bulk INSERT, once as single-row INSERTs from
   8 concurrent clients; documents/s until all are embedded, and the ratio stream / bulk.

    python -m bench.latency [--quick] [--runtime torch|onnx|onnx-int8] [--n 200]
"""

from __future__ import annotations

import threading
import time

import psycopg

from bench.common import (
    add_runtime_option, corpus, database, emit, machine, parser, pct, run_benchmark, set_runtime, spawn_worker, stop,
    table)
from pgsynapse.chunking import Chunker
from pgsynapse.config import load_settings
from pgsynapse.models import ModelCache


def one_chunk_texts(pages, n: int) -> list[tuple[str, str]]:
    """Paragraph-sized documents (one chunk each) cut from the corpus."""
    out = []
    for p in pages:
        for para in p["text"].split("\n\n"):
            para = " ".join(para.split())
            if 200 <= len(para) <= 900:
                out.append((p["title"], para))
                if len(out) >= n:
                    return out
    while len(out) < n:  # a small corpus: reuse with a suffix so each text is new
        t, b = out[len(out) % max(1, len(out))]
        out.append((t, f"{b} ({len(out)})"))
    return out


def idle_latency(url: str, docs: list[tuple[str, str]]) -> list[float]:
    lat = []
    with psycopg.connect(url, autocommit=True) as listen, psycopg.connect(url, autocommit=True) as conn:
        listen.execute("LISTEN pgsynapse_documents")
        for title, body in docs:
            doc_id = conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES (%s, %s) RETURNING id",
                                  (title, body)).fetchone()[0]
            committed = time.perf_counter()  # autocommit: the INSERT is committed when execute returns
            for n in listen.notifies(timeout=60):
                if f'"id" : {doc_id},' in n.payload or f'"id": {doc_id},' in n.payload:
                    lat.append((time.perf_counter() - committed) * 1000)
                    break
            else:
                raise TimeoutError(f"document {doc_id} not embedded within 60 s")
    return lat


def wait_all(conn: psycopg.Connection) -> None:
    while conn.execute("SELECT count(*) FROM pgsynapse.documents WHERE status = 'pending'").fetchone()[0]:
        time.sleep(0.02)


def bulk_rate(url: str, docs: list[tuple[str, str]]) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute("INSERT INTO pgsynapse.documents (title, body) SELECT * FROM unnest(%s::text[], %s::text[])",
                     ([t for t, _ in docs], [b for _, b in docs]))
        wait_all(conn)
        return len(docs) / (time.perf_counter() - started)


def stream_rate(url: str, docs: list[tuple[str, str]], clients: int = 8) -> float:
    def client(part: list[tuple[str, str]]) -> None:
        with psycopg.connect(url, autocommit=True) as c:
            for title, body in part:
                c.execute("INSERT INTO pgsynapse.documents (title, body) VALUES (%s, %s)", (title, body))

    threads = [threading.Thread(target=client, args=(docs[i::clients],)) for i in range(clients)]
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_all(conn)
        return len(docs) / (time.perf_counter() - started)


def main() -> None:
    p = parser(__doc__ or "")
    add_runtime_option(p)
    p.add_argument("--n", type=int, default=0, help="idle inserts (default 200, --quick 40)")
    p.add_argument("--stream", type=int, default=0, help="documents of the stream and bulk runs (default 800, --quick 160)")
    args = p.parse_args()
    n = args.n or (40 if args.quick else 200)
    n_stream = args.stream or (160 if args.quick else 800)
    emit("latency", "machine", **machine())
    docs = one_chunk_texts(corpus(400), n + 2 * n_stream + 20)
    with database(args.database_url) as url:
        row = set_runtime(url, args.runtime)
        settings = load_settings(environ={}, database_url=url)
        embedder = ModelCache(threads=args.threads, onnx_threads=args.threads).get(row)
        chunker = Chunker(embedder.tokenizer, min(settings.chunk_tokens, embedder.max_seq_length), settings.chunk_overlap)
        texts = [chunker.split(t, b)[0].embed_text for t, b in docs[:n]]
        for t in texts[:5]:
            embedder.encode([t], 1)
        model_ms = []
        for t in texts:
            s = time.perf_counter()
            embedder.encode([t], 1)
            model_ms.append((time.perf_counter() - s) * 1000)
        m50, m99 = pct(model_ms, 50), pct(model_ms, 99)
        emit("latency", "model_one_chunk", runtime=args.runtime, n=len(model_ms), p50_ms=round(m50, 2),
             p95_ms=round(pct(model_ms, 95), 2), p99_ms=round(m99, 2))
        env = {"PGSYNAPSE_TORCH_THREADS": str(args.threads), "PGSYNAPSE_ONNX_THREADS": str(args.threads)}
        worker = spawn_worker(url, env)
        try:
            idle_latency(url, docs[n : n + 10])  # warm the worker's paths
            lat = idle_latency(url, docs[:n])
            l50, l95, l99 = pct(lat, 50), pct(lat, 95), pct(lat, 99)
            emit("latency", "idle_insert_to_embedding", runtime=args.runtime, n=len(lat), p50_ms=round(l50, 2),
                 p95_ms=round(l95, 2), p99_ms=round(l99, 2), model_p50_ms=round(m50, 2),
                 p50_over_model_ms=round(l50 - m50, 2), p99_over_model_ms=round(l99 - m50, 2),
                 passed=(l50 <= m50 + 30 and l99 <= m50 + 100))
            rest = docs[n + 10 :]
            bulk = bulk_rate(url, rest[:n_stream])
            stream = stream_rate(url, rest[n_stream : 2 * n_stream])
            emit("latency", "stream_vs_bulk", runtime=args.runtime, docs=n_stream, clients=8, bulk_docs_per_s=round(bulk, 2),
                 stream_docs_per_s=round(stream, 2), ratio=round(stream / bulk, 3), target=0.7, passed=stream / bulk >= 0.7)
        finally:
            stop(worker)
    table()


if __name__ == "__main__":
    run_benchmark(main)
