"""Another model (all-mpnet-base-v2, 768-d) brought into the embedded docs corpus, and a student distilled from it
(issue 20, goal 2).

    python -m bench.teacher                  # A: model add + backfill; B: distill a 6-layer student from it
    python -m bench.teacher --part a         # A only
    python -m bench.teacher --chunks 0       # the whole corpus (7,087 chunks: hours of mpnet on 2 busy cores)

A. ``add_model`` registers mpnet (:func:`bench.mpnet.mpnet_path`) on a clone of the corpus template (version 1 =
   the default model, onnx-int8) and a real worker, product defaults, backfills it (exporting it to the serving
   runtime meanwhile, as it does for any torch candidate). Reported: backfill wall time and chunks/s, each
   version's partition size, dev page recall@5 / MRR@10 on the REPORT half (each version's questions encoded by
   its own model, searching its own stored vectors through the answer handler's retrieval), question-encode p50
   per runtime.
B. ``distill`` (teacher = the mpnet version, student = 6 layers of the default MiniLM, PCA of the teacher's vectors
   to 384-d), force-registered, backfilled and exported by the worker; the same figures plus encode throughput of
   each version on its serving runtime.

``--chunks N`` (default 600) measures on a subset of the docs so that mpnet's backfill fits in a session (mpnet on
torch encodes about 0.4 chunks/s on two busy cores): every page a report-half dev question points to, then the other
pages in corpus order until N chunks (the default chunker's count), in a fresh database embedded by version 1 on
its default runtime (onnx-int8) by a real worker. ``--chunks 0`` takes ``corpus_clone()`` (all 7,087 chunks).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg.rows import dict_row

from bench.common import (
    corpus, database, emit, machine, parser, pct, questions, run_benchmark, run_worker_until, set_runtime, table)
from bench.corpusdb import corpus_clone
from bench.devsplit import split
from bench.mpnet import mpnet_path
from bench.retrieval import retrieve_pages, score
from pgsynapse.chunking import Chunker
from pgsynapse.config import load_settings
from pgsynapse.learning.distill import distill
from pgsynapse.learning.registry import add_model
from pgsynapse.models import ModelCache, default_model_path
from pgsynapse.queries import q
from pgsynapse.ranking.registry import REGISTRY
from pgsynapse.ranking.rescore import check_teacher, teacher_path

B = "teacher"
DATA_DIR = Path("/tmp/pgsynapse-bench-teacher")  # the worker's exports and the distilled student


def _version(url: str, vid: int) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = %s", (vid,)).fetchone()


def pick_pages(target: int, report_pages: set[str]) -> list[dict[str, str]]:
    """Every page a report-half question points to, then the other pages in corpus order, until the default
    chunker's count reaches ``target`` chunks."""
    from transformers import AutoTokenizer

    chunker = Chunker(AutoTokenizer.from_pretrained(str(default_model_path())), 256, 0)
    pages = corpus()
    keep = [p for p in pages if p["id"] in report_pages]
    n = sum(len(chunker.split(p["title"], p["text"])) for p in keep)
    for p in pages:
        if n >= target:
            break
        if p["id"] not in report_pages:
            keep.append(p)
            n += len(chunker.split(p["title"], p["text"]))
    return keep


@contextlib.contextmanager
def subset_corpus(database_url: str | None, target: int, report_pages: set[str]) -> Iterator[tuple[str, dict]]:
    """A fresh database holding a subset of the docs (:func:`pick_pages`) embedded by version 1 on the default
    runtime (onnx-int8, the cached start-up export of ``bench.common.artifact``), by a real worker."""
    pages = pick_pages(target, report_pages)
    with database(database_url) as url:
        set_runtime(url, "onnx-int8")
        started = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO pgsynapse.documents (source, title, body)"
                         " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])",
                         ([p["id"] for p in pages], [p["title"] for p in pages], [p["text"] for p in pages]))
        run_worker_until(load_settings(environ={}, database_url=url, kinds=("embed",), data_dir=DATA_DIR), url,
                         "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'",
                         ("pgsynapse_documents",), poll=10)
        yield url, {"pages": len(pages), "embed_seconds": round(time.perf_counter() - started, 1)}


def quality(url: str, version: dict[str, Any], qs: list[dict[str, Any]], models: ModelCache) -> dict[str, float]:
    ranked = anyio.run(lambda: retrieve_pages(url, [q["q"] for q in qs], version=version, hybrid=False, models=models))
    return score(ranked, [set(q["relevant"]) for q in qs])


def encode_p50(models: ModelCache, row: dict[str, Any], texts: list[str]) -> float:
    """Milliseconds to encode one question (median over ``texts``, after two warm-ups)."""
    emb = models.get(row)
    emb.encode(texts[:2])
    lat = []
    for t in texts:
        s = time.perf_counter()
        emb.encode([t])
        lat.append((time.perf_counter() - s) * 1000)
    return round(pct(lat, 50), 1)


def throughput(models: ModelCache, row: dict[str, Any], texts: list[str], batch: int = 32) -> float:
    """Chunks/s encoding ``texts`` (batches of ``batch``), after one warm-up batch of 4."""
    emb = models.get(row)
    emb.encode(texts[:4])
    s = time.perf_counter()
    emb.encode(texts, batch)
    return round(len(texts) / (time.perf_counter() - s), 2)


def chunk_texts(url: str, models: ModelCache, row: dict[str, Any], n: int) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT d.title, c.text FROM pgsynapse.chunks c JOIN pgsynapse.documents d"
                            " ON d.id = c.document_id ORDER BY c.id LIMIT %s", (n,)).fetchall()
    emb = models.get(row)
    chunker = Chunker(emb.tokenizer, min(256, emb.max_seq_length), 0)
    return [chunker.embed_text(t, x) for t, x in rows]


def partition_mb(url: str, vid: int) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        size = conn.execute("SELECT pg_total_relation_size(%s::regclass)", (f"pgsynapse.embeddings_v{vid}",)).fetchone()[0]
    return round(size / 2**20, 2)


def backfill(settings: Any, url: str, vid: int) -> dict[str, Any]:
    """Run a worker until version ``vid`` is backfilled and its runtime export is settled."""
    started = time.perf_counter()
    run_worker_until(settings, url, f"SELECT backfilled_at IS NOT NULL AND NOT runtime_pending FROM "
                     f"pgsynapse.model_versions WHERE id = {int(vid)}", ("pgsynapse_models",), poll=15)
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        r = conn.execute("SELECT extract(epoch FROM backfilled_at - created_at) AS backfill_s, runtime,"
                         " metrics->'runtime_export' AS export, (SELECT count(*) FROM pgsynapse.embeddings"
                         " WHERE model_version_id = %(v)s) AS vectors FROM pgsynapse.model_versions WHERE id = %(v)s",
                         {"v": vid}).fetchone()
    export = r["export"] or {}
    return {"backfill_s": round(float(r["backfill_s"]), 1), "vectors": r["vectors"],
            "chunks_per_s": round(r["vectors"] / float(r["backfill_s"]), 3), "worker_s": round(time.perf_counter() - started, 1),
            "runtime": r["runtime"], "export": {k: export.get(k) for k in ("requested", "runtime", "scheme", "seconds",
                                                                           "agreement", "error", "tried") if k in export}}


def preload(url: str, version: int, vectors_dir: Path) -> int:
    """Write version ``version``'s vectors computed elsewhere with the same model (bench/gpu_distill.py:
    ``mpnet_ids.npy`` and ``mpnet_vectors.npy``, chunk ids of a clone of the same template) with the backfill's own
    query, before a worker starts: its backfill then finds them (ON CONFLICT) and encodes only what is missing.
    Returns the vectors written."""
    ids = np.load(vectors_dir / "mpnet_ids.npy")
    vectors = np.load(vectors_dir / "mpnet_vectors.npy")
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        known = {r[0] for r in conn.execute("SELECT id FROM pgsynapse.chunks")}
        if known != {int(i) for i in ids}:
            raise SystemExit(f"{vectors_dir}: its {len(ids)} chunk ids are not this database's {len(known)} chunks "
                             "(another corpus template?)")
        conn.execute(q("insert_backfill_embeddings", "learning.sql"),
                     {"version": version, "chunks": [int(i) for i in ids], "embeddings": list(vectors)})
    return len(ids)


def add_teacher(settings: Any, url: str, vectors_dir: Path | None, model: Path | None = None,
                serving_runtime: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """all-mpnet-base-v2 (or ``model``: its ONNX export from an earlier run, which skips the worker's export) added
    as a model version (``model add``), its vectors preloaded from ``vectors_dir`` when given, then backfilled and
    exported by a real worker that embeds and backfills only; its row (after the backfill) and the backfill's
    figures."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        added = add_model(conn, model or mpnet_path(), name="all-mpnet-base-v2",
                          serving_runtime=serving_runtime or settings.runtime, chunk_tokens=settings.chunk_tokens)
    preloaded = preload(url, added["id"], vectors_dir) if vectors_dir else 0
    # embed too: a worker that serves (embed or answer) is the one that exports a torch version to the serving
    # runtime, which backfill() waits for; no retrain (a bench's training feedback would queue one)
    done = backfill(settings.model_copy(update={"kinds": ("embed", "backfill")}), url, added["id"])
    return _version(url, added["id"]), {"preloaded": preloaded, "warnings": added["warnings"], **done}


def teacher_ranker(settings: Any, url: str, vectors_dir: Path | None, model: Path | None = None,
                   status: str = "candidate") -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """:func:`add_teacher`, then the teacher as a ranker (``ranker add version:N``, registered with ``status``):
    its version row, its ranker row and the backfill's figures."""
    teacher, figures = add_teacher(settings, url, vectors_dir, model)
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        check_teacher(conn, teacher_path(teacher["id"]))
        ranker = REGISTRY.add_model(conn, "all-mpnet-base-v2 rescoring", teacher_path(teacher["id"]), "version",
                                    status=status)
    return teacher, ranker, figures


def report_row(name: str, url: str, row: dict[str, Any], report: list[dict[str, Any]], models: ModelCache,
               qtexts: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return emit(B, name, version=row["id"], dim=row["dim"], runtime=row["runtime"],
                **quality(url, row, report, models), partition_mb=partition_mb(url, row["id"]),
                encode_p50_ms=encode_p50(models, row, qtexts), **(extra or {}))


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--part", choices=("a", "ab"), default="ab")
    p.add_argument("--chunks", type=int, default=600, help="corpus subset (0: all)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--distill-budget", type=float, default=1200.0, help="distill_budget_seconds")
    p.add_argument("--backfill-batch", type=int, default=None, help="backfill_batch (default: the product's)")
    p.add_argument("--limit", type=int, default=None, help="template of the first N pages (development)")
    p.add_argument("--serving-runtime", default=None, help="mpnet's serving runtime (default: settings.runtime)")
    p.add_argument("--vectors", type=Path, help="mpnet's vectors of the corpus template's chunks, computed elsewhere "
                   "(bench/gpu_distill.py): written before the worker's backfill, which then encodes only the rest")
    args = p.parse_args()
    emit(B, "machine", **machine(), **({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
    model = mpnet_path()
    halves = split(questions("pg_docs_dev.jsonl"))
    report = halves["report"]
    qtexts = [q["q"] for q in halves["tune"] + halves["report"]]  # latency only
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    report_pages = {r for q in report for r in q["relevant"]}
    source = (subset_corpus(args.database_url, args.chunks, report_pages) if args.chunks
              else corpus_clone(limit=args.limit, database_url=args.database_url))
    with source as (url, info):
        # product defaults, but for the data dir (exports, the student) under /tmp
        extra = {"backfill_batch": args.backfill_batch} if args.backfill_batch else {}
        settings = load_settings(environ={}, database_url=url, data_dir=DATA_DIR, **extra)
        models = ModelCache(threads=args.threads)
        v1 = _version(url, 1)
        with psycopg.connect(url, autocommit=True) as conn:
            n = conn.execute("SELECT count(*) FROM pgsynapse.chunks").fetchone()[0]
        emit(B, "corpus", source="subset" if args.chunks else "corpus_clone", chunks=n, target_chunks=args.chunks,
             **info)
        mp, bf = add_teacher(settings, url, args.vectors, serving_runtime=args.serving_runtime)
        mid = mp["id"]
        emit(B, "mpnet-backfill", version=mid, load1=machine()["load1"],
             backfill_batch=settings.backfill_batch, batch_deadline_seconds=settings.batch_deadline_seconds, **bf)
        rows = [report_row("v1", url, v1, report, models, qtexts),
                report_row("mpnet", url, mp, report, models, qtexts)]
        # the other runtime of each: torch for v1 (onnx-int8 serves), onnx-int8 for mpnet if it was exported
        emit(B, "v1-torch", encode_p50_ms=encode_p50(models, {**v1, "id": -1, "runtime": "torch", "artifact_path": None},
                                                     qtexts))
        if mp["runtime"] != "torch":
            emit(B, "mpnet-torch", encode_p50_ms=encode_p50(
                models, {**mp, "id": -2, "runtime": "torch", "artifact_path": str(model)}, qtexts))
        texts = chunk_texts(url, models, v1, 32)
        for name, row in (("v1", v1), ("mpnet", mp)):
            emit(B, f"{name}-throughput", runtime=row["runtime"], chunks_per_s=throughput(models, row, texts))
        if args.part == "ab":
            settings = load_settings(environ={}, database_url=url, data_dir=DATA_DIR, **extra,
                                     distill_budget_seconds=args.distill_budget)
            started = time.perf_counter()
            with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
                done = distill(conn, settings, url, teacher=mid, layers=args.layers, epochs=args.epochs, force=True)
            m = done.metrics
            emit(B, "distill", seconds=round(time.perf_counter() - started, 1), gate=done.gate.get("passed"),
                 **{k: m.get(k) for k in ("layers", "dim", "teacher_projection", "steps", "planned_steps",
                                          "stopped_at_budget", "final_loss", "train_seconds", "heldout_cosine_mean",
                                          "peak_rss_mb")})
            sid = done.row["id"]
            emit(B, "student-backfill", version=sid, **backfill(settings, url, sid))
            st = _version(url, sid)
            rows.append(report_row(f"student-{args.layers}l", url, st, report, models, qtexts))
            for name, row in (("v1", v1), ("mpnet", mp), (f"student-{args.layers}l", st)):
                emit(B, f"{name}-throughput-b", runtime=row["runtime"], chunks_per_s=throughput(models, row, texts))
        emit(B, "end", load1=machine()["load1"])
    table()


if __name__ == "__main__":
    run_benchmark(main)
