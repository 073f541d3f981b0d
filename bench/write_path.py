"""Benchmark `write_path`: the embed writer's chunk and vector inserts against binary COPY of the same rows.

The worker writes a batch's chunks and vectors with one ``INSERT ... SELECT FROM unnest(...)`` each (queries.sql
``insert_chunks``, ``insert_embeddings``), every array bound in binary: never COPY FROM STDIN, inside which a worker
cut off from the database would keep its locks (docs/reliability.md). The ceiling, measured in the same run on the
same rows and schema (the partitioned embeddings with their HNSW index), is what it did before: text COPY of the
chunks and binary COPY of the vectors. Medians of alternating rounds, each in its own transaction.

    python -m bench.write_path [--quick] [--chunks 32,256,2048] [--rounds 30]
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async

from bench.common import database, emit, machine, parser, run_benchmark, table
from pgsynapse.queries import q

B = "write_path"
COPY_CHUNKS = ("COPY pgsynapse.chunks (id, document_id, ord, text, token_count, char_start, char_end, content_hash)"
               " FROM STDIN")
COPY_VECTORS = "COPY pgsynapse.embeddings (chunk_id, model_version_id, embedding) FROM STDIN (FORMAT BINARY)"


async def _round(conn: psycopg.AsyncConnection, how: str, doc: int, ids: list[int], texts: list[str],
                 vectors: list[np.ndarray]) -> float:
    n = len(ids)
    started = time.perf_counter()
    async with conn.transaction():
        if how == "copy":
            async with conn.cursor() as cur:
                async with cur.copy(COPY_CHUNKS) as copy:
                    for i, cid in enumerate(ids):
                        await copy.write_row((cid, doc, i, texts[i], 200, 0, len(texts[i]), "hash"))
                async with cur.copy(COPY_VECTORS) as copy:
                    copy.set_types(["int8", "int4", "vector"])
                    for cid, v in zip(ids, vectors, strict=True):
                        await copy.write_row((cid, 1, v))
        else:
            await conn.execute(q("insert_chunks"), {
                "ids": ids, "documents": [doc] * n, "ords": list(range(n)), "texts": texts, "tokens": [200] * n,
                "starts": [0] * n, "ends": [len(t) for t in texts], "hashes": ["hash"] * n})
            await conn.execute(q("insert_embeddings"), {"chunks": ids, "versions": [1] * n, "embeddings": vectors})
    return (time.perf_counter() - started) * 1000


async def _measure(url: str, sizes: list[int], rounds: int) -> None:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await register_vector_async(conn)
    dim = (await (await conn.execute("SELECT dim FROM pgsynapse.model_versions WHERE id = 1")).fetchone())[0]
    rng = np.random.default_rng(0)
    words = "the index scan reads the table rows in the order of the index and checks their visibility".split()
    for n in sizes:
        texts = [" ".join(rng.choice(words, 150)) for _ in range(n)]
        vectors = [v / np.linalg.norm(v) for v in rng.standard_normal((n, dim)).astype(np.float32)]
        times: dict[str, list[float]] = {"copy": [], "insert": []}
        for r in range(rounds + 3):
            for how in (("copy", "insert") if r % 2 else ("insert", "copy")):
                doc = (await (await conn.execute(
                    "INSERT INTO pgsynapse.documents (title, body) VALUES ('bench', 'write path') RETURNING id"
                )).fetchone())[0]
                ids = [r[0] for r in await (await conn.execute(q("next_chunk_ids"), {"n": n})).fetchall()]
                ms = await _round(conn, how, doc, ids, texts, vectors)
                if r >= 3:  # the first rounds warm the caches
                    times[how].append(ms)
        product, ceiling = statistics.median(times["insert"]), statistics.median(times["copy"])
        emit(B, f"chunks_{n}", chunks=n, insert_ms=round(product, 2), copy_ms=round(ceiling, 2),
             ratio=round(product / ceiling, 2), insert_min_ms=round(min(times["insert"]), 2),
             copy_min_ms=round(min(times["copy"]), 2), rounds=rounds)
    await conn.close()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--chunks", default="32,256,2048", help="chunks per batch, comma-separated")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    sizes = [32, 256] if args.quick else [int(x) for x in args.chunks.split(",")]
    emit(B, "machine", **machine())
    with database(args.database_url) as url:
        asyncio.run(_measure(url, sizes, 10 if args.quick else args.rounds))
    table()


if __name__ == "__main__":
    run_benchmark(main)
