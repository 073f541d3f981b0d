"""Dump the embedded corpus (chunks, pages, titles, bodies, v1 vectors) and the encoded train/dev questions to
$RANKER_EXP_DIR (default /tmp/pgsynapse-ranker-exp)/cache.npz + cache.json, once. Run from the repository root as python -m bench.ranker_explore.<name>."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import psycopg
from psycopg.rows import dict_row

from bench.common import questions
from bench.corpusdb import corpus_clone
from pgsynapse.models import ModelCache

OUT = Path(os.environ.get("RANKER_EXP_DIR", "/tmp/pgsynapse-ranker-exp"))


def main() -> None:
    t0 = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    with corpus_clone() as (url, info):
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            rows = conn.execute(
                "SELECT c.id, d.id AS doc, d.title, c.text, d.source, e.embedding::text AS emb FROM pgsynapse.chunks c"
                " JOIN pgsynapse.documents d ON d.id = c.document_id JOIN pgsynapse.embeddings e ON e.chunk_id = c.id"
                " AND e.model_version_id = 1 ORDER BY c.id").fetchall()
            docs = conn.execute("SELECT id, source, coalesce(title,'') AS title, coalesce(body,'') AS body"
                                " FROM pgsynapse.documents").fetchall()
            v1 = conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = 1").fetchone()
        print("chunks", len(rows), "docs", len(docs), "v1", v1["name"], v1["runtime"], v1["artifact_path"])
        emb = ModelCache(threads=2).get(v1)
        train = questions("pg_docs_train.jsonl")
        dev = questions("pg_docs_dev.jsonl")
        qv_train = np.asarray(emb.encode([q["q"] for q in train]), dtype=np.float32)
        qv_dev = np.asarray(emb.encode([q["q"] for q in dev]), dtype=np.float32)
    vecs = np.array([json.loads(r["emb"]) for r in rows], dtype=np.float32)
    np.savez(OUT / "cache.npz", vecs=vecs, qv_train=qv_train, qv_dev=qv_dev)
    meta = {"chunks": [{"id": r["id"], "doc": r["doc"], "title": r["title"], "text": r["text"], "source": r["source"]}
                       for r in rows],
            "docs": [dict(d) for d in docs], "train": train, "dev": dev,
            "v1": {k: (str(v) if not isinstance(v, (int, float, str, type(None))) else v) for k, v in v1.items()},
            "info": info}
    (OUT / "cache.json").write_text(json.dumps(meta))
    print("done", round(time.time() - t0, 1), "s; norms", np.linalg.norm(vecs[:3], axis=1), np.linalg.norm(qv_dev[:3], axis=1))


if __name__ == "__main__":
    main()
