"""The inference cache: query embeddings (and other outputs, e.g. answers) keyed by model version and a hash
of the normalised input, in ``pgsynapse.inference_cache`` with a small in-process LRU in front.

A hit never serves another version's result: the version id is part of every key, and the runtime is
part of the hashed input. Database hits are counted in ``hit_count``; LRU hits in :attr:`CacheStats`.
TTL and size bound are enforced by :func:`cleanup`, run from the worker's maintenance loop.

Use :func:`embed_query` (async connection) or :func:`embed_query_sync` (sync connection) to embed a
question; both take ``None`` as the connection to use the in-process LRU only.
"""

from __future__ import annotations

import hashlib
import json
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import psycopg

from pgsynapse import metrics
from pgsynapse.models import Embedder
from pgsynapse.queries import q

QUERY_EMBEDDING = "query_embedding"


def normalise(text: str) -> str:
    """Unicode NFC and collapsed whitespace: inputs that differ only so share a cache entry."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def input_hash(runtime: str, text: str) -> bytes:
    return hashlib.sha256(f"{runtime}\x1e{normalise(text)}".encode()).digest()


@dataclass
class CacheStats:
    memory_hits: int = 0
    db_hits: int = 0
    misses: int = 0


class LRU:
    """A small thread-safe LRU of ``(version, op, hash) -> value``."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._d: OrderedDict[tuple[int, str, bytes], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get(self, key: tuple[int, str, bytes]) -> Any | None:
        with self._lock:
            value = self._d.get(key)
            if value is not None:
                self._d.move_to_end(key)
            return value

    def put(self, key: tuple[int, str, bytes], value: Any) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


# the process-wide LRU; its size follows the settings when the worker configures it
default_lru = LRU()


def _key(embedder: Embedder, op: str, text: str) -> tuple[int, str, bytes]:
    return (embedder.spec.version_id, op, input_hash(embedder.spec.runtime, text))


def _encode_one(embedder: Embedder, text: str) -> np.ndarray:
    return embedder.encode([normalise(text)], 1)[0]


async def embed_queries(
    conn: psycopg.AsyncConnection | None, embedder: Embedder, texts: list[str], *, lru: LRU | None = None
) -> np.ndarray:
    """The embeddings of queries, one row per text: from the LRU, else the database cache (hits counted),
    else the model, in ONE forward pass for all the misses (then stored in both).

    ``conn`` is an async connection in autocommit mode or inside the caller's transaction; the vector type must be
    registered on it (``pgvector.psycopg.register_vector_async``). ``None`` skips the database cache.
    """
    lru = default_lru if lru is None else lru
    version = embedder.spec.version_id
    keys = [_key(embedder, QUERY_EMBEDDING, t) for t in texts]
    found: dict[bytes, np.ndarray] = {}
    for k in keys:
        hit = lru.get(k)
        if hit is not None and k[2] not in found:
            found[k[2]] = hit
            lru.stats.memory_hits += 1
    wanted = list(dict.fromkeys(k[2] for k in keys if k[2] not in found))
    if conn is not None and wanted:
        rows = await (await conn.execute(q("cache_hit_embeddings", "cache.sql"),
                                         {"version": version, "op": QUERY_EMBEDDING, "hashes": wanted})).fetchall()
        for row in rows:
            h = bytes(row["input_hash"] if isinstance(row, dict) else row[0])
            found[h] = _as_array({"embedding": row["embedding"] if isinstance(row, dict) else row[1]})
            lru.stats.db_hits += 1
            lru.put((version, QUERY_EMBEDDING, h), found[h])
    missing = {k[2]: normalise(t) for k, t in zip(keys, texts, strict=True) if k[2] not in found}
    hits = len(texts) - sum(1 for k in keys if k[2] in missing)
    if missing:
        lru.stats.misses += len(missing)
        vectors = await anyio.to_thread.run_sync(embedder.encode, list(missing.values()))
        for h, v in zip(missing, vectors, strict=True):
            found[h] = v
            lru.put((version, QUERY_EMBEDDING, h), v)
        if conn is not None:
            await conn.execute(q("cache_put_embeddings", "cache.sql"), {
                "version": version, "op": QUERY_EMBEDDING, "hashes": list(missing), "embeddings": list(vectors)})
        metrics.cache_miss(version, len(texts) - hits)
    if hits:
        metrics.cache_hit(version, hits)
    return np.stack([found[k[2]] for k in keys]) if keys else np.zeros((0, embedder.spec.dim), dtype=np.float32)


async def embed_query(
    conn: psycopg.AsyncConnection | None, embedder: Embedder, text: str, *, lru: LRU | None = None
) -> np.ndarray:
    """The embedding of one query (see :func:`embed_queries`)."""
    return (await embed_queries(conn, embedder, [text], lru=lru))[0]


def embed_query_sync(conn: psycopg.Connection | None, embedder: Embedder, text: str, *, lru: LRU | None = None) -> np.ndarray:
    """:func:`embed_query` for a sync connection (``pgvector.psycopg.register_vector`` on it)."""
    lru = default_lru if lru is None else lru
    key = _key(embedder, QUERY_EMBEDDING, text)
    hit = lru.get(key)
    if hit is not None:
        lru.stats.memory_hits += 1
        metrics.cache_hit(key[0])
        return hit
    params = {"version": key[0], "op": QUERY_EMBEDDING, "hash": key[2]}
    if conn is not None:
        row = conn.execute(q("cache_hit_embedding", "cache.sql"), params).fetchone()
        if row is not None:
            vector = _as_array(row)
            lru.stats.db_hits += 1
            metrics.cache_hit(key[0])
            lru.put(key, vector)
            return vector
    lru.stats.misses += 1
    metrics.cache_miss(key[0])
    vector = _encode_one(embedder, text)
    if conn is not None:
        conn.execute(q("cache_put", "cache.sql"), {**params, "embedding": vector, "output": None})
    lru.put(key, vector)
    return vector


def _as_array(row: Any) -> np.ndarray:
    value = row["embedding"] if isinstance(row, dict) else row[0]
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    return np.asarray(value, dtype=np.float32)


async def get_output(conn: psycopg.AsyncConnection, version_id: int, op: str, text: str) -> Any | None:
    """A cached JSON output (e.g. an answer) of ``op`` for ``text`` under ``version_id``; counts the hit."""
    row = await (await conn.execute(
        q("cache_hit_embedding", "cache.sql"), {"version": version_id, "op": op, "hash": input_hash(op, text)}
    )).fetchone()
    if row is None:
        return None
    return row["output"] if isinstance(row, dict) else row[1]


async def put_output(conn: psycopg.AsyncConnection, version_id: int, op: str, text: str, output: Any) -> None:
    await conn.execute(
        q("cache_put", "cache.sql"),
        {"version": version_id, "op": op, "hash": input_hash(op, text), "embedding": None, "output": json.dumps(output)},
    )


async def cleanup(conn: psycopg.AsyncConnection, *, ttl_seconds: float, max_rows: int) -> int:
    """Delete rows unused for ``ttl_seconds``, then the least recently hit beyond ``max_rows``. Returns rows removed."""
    expired = await conn.execute(q("cache_expire", "cache.sql"), {"ttl": ttl_seconds})
    bounded = await conn.execute(q("cache_bound", "cache.sql"), {"max_rows": max_rows})
    return (expired.rowcount or 0) + (bounded.rowcount or 0)
