"""Runtimes side by side: torch fp32 vs onnx fp32 vs onnx-int8.

Each runtime runs in its own process (load time and RSS are its own): texts/s at batch 1, 32 and 64 on
256-token chunks of the PostgreSQL docs, model size, load time, RSS. Then, over the same chunk pool, mean
top-10 neighbour agreement with torch (train + dev questions as queries, mean cosine too) and page-level
recall@5 / MRR@10 on the dev questions (``pg_docs_dev.jsonl``).

    python -m bench.runtimes [--quick] [--pages N] [--chunks N] [--questions N]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import artifact, corpus, emit, machine, parser, questions, run_benchmark, table
from pgsynapse.chunking import Chunker
from pgsynapse.export import SCHEMES
from pgsynapse.models import ModelSpec, ONNX_FILES, default_model_path, load_embedder, rss_bytes
from pgsynapse.tokens import load_tokenizer

# runtime[:int8 scheme]: every scheme, in the order the export tries them
RUNTIMES = ["torch", "onnx", *(f"onnx-int8:{scheme}" for scheme in SCHEMES)]


def pool(n_pages: int) -> tuple[list[str], list[str]]:
    """Chunk texts and their page ids: the dev questions' pages first, then the corpus in order."""
    pages = corpus()
    relevant = {p for d in questions("pg_docs_dev.jsonl") for p in d["relevant"]}
    pages = [p for p in pages if p["id"] in relevant] + [p for p in pages if p["id"] not in relevant]
    pages = pages[:n_pages] if n_pages else pages
    chunker = Chunker(load_tokenizer(default_model_path()), 256, 32)
    texts, ids = [], []
    for p in pages:
        for c in chunker.split(p["title"], p["text"]):
            texts.append(c.embed_text)
            ids.append(p["id"])
    return texts, ids


def one(runtime: str, work: Path, threads: int) -> None:
    """In a child process: load, time, encode the pool and the queries."""
    data = json.loads((work / "texts.json").read_text())
    path = Path(data["artifacts"].get(runtime) or default_model_path())
    label, runtime = runtime, runtime.split(":")[0]
    rss0 = rss_bytes()
    started = time.perf_counter()
    e = load_embedder(ModelSpec(1, "m", path, runtime, 384), threads=threads, onnx_threads=threads)
    load_s = time.perf_counter() - started
    rss_loaded = rss_bytes()
    chunks = data["chunks"]
    bench = chunks[: data["n_speed"]]
    speeds = {}
    for batch in (1, 32, 64):
        texts = bench[: data["n_batch1"]] if batch == 1 else bench
        e.encode(texts[: max(batch, 2)], batch)  # warm
        s = time.perf_counter()
        e.encode(texts, batch)
        speeds[f"texts_per_s_b{batch}"] = round(len(texts) / (time.perf_counter() - s), 2)
    vecs = e.encode(chunks, 32)
    qv = e.encode(data["queries"], 32)
    np.savez(work / f"{label}.npz", chunks=vecs, queries=qv)
    (work / f"{label}.json").write_text(json.dumps({
        "load_s": round(load_s, 3), "rss_mb": round(rss_bytes() / 2**20, 1),
        "rss_model_mb": round((rss_loaded - rss0) / 2**20, 1), **speeds}))


def recall(q: np.ndarray, d: np.ndarray, ids: list[str], relevant: list[list[str]], k: int = 5) -> tuple[float, float]:
    order = np.argsort(-(q @ d.T), axis=1)
    hits, rr = 0, 0.0
    for row, rel in zip(order, relevant, strict=True):
        pages: list[str] = []
        for i in row:
            if ids[i] not in pages:
                pages.append(ids[i])
                if len(pages) == 10:
                    break
        hits += any(p in rel for p in pages[:k])
        rr += next((1 / (r + 1) for r, p in enumerate(pages) if p in rel), 0.0)
    return hits / len(relevant), rr / len(relevant)


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--pages", type=int, default=0, help="corpus pages in the pool (default all; --quick 80)")
    p.add_argument("--chunks", type=int, default=0, help="at most this many chunks of those pages (default all)")
    p.add_argument("--questions", type=int, default=0,
                   help="at most this many dev and this many train questions as queries (default all)")
    p.add_argument("--interleaved-only", action="store_true", help="only the interleaved batch-32 speed comparison")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the interleaved comparison")
    p.add_argument("--runtimes", default=",".join(RUNTIMES),
                   help="comma-separated subset of %(default)s (torch, the reference, is always run)")
    p.add_argument("--one", help=argparse_hidden())
    p.add_argument("--work")
    args = p.parse_args()
    if args.one:
        one(args.one, Path(args.work), args.threads)
        return
    chosen = ["torch", *(rt for rt in RUNTIMES if rt != "torch" and rt in args.runtimes.split(","))]
    unknown = set(args.runtimes.split(",")) - set(RUNTIMES)
    if unknown:
        p.error(f"unknown runtimes {sorted(unknown)}: choose from {RUNTIMES}")
    emit("runtimes", "machine", **machine())
    if args.interleaved_only:
        texts, _ = pool(20)
        interleaved(texts[: 64 if args.quick else 128], args.rounds, args.threads, chosen)
        table()
        return
    texts, ids = pool(args.pages or (80 if args.quick else 0))
    if args.chunks:
        texts, ids = texts[: args.chunks], ids[: args.chunks]
    dev = questions("pg_docs_dev.jsonl")
    train = questions("pg_docs_train.jsonl")
    if args.questions:
        dev, train = dev[: args.questions], train[: args.questions]
    queries = [d["q"] for d in dev] + [d["q"] for d in train]
    arts = {rt: str(artifact(*rt.split(":"))) for rt in chosen if rt != "torch"}
    n_speed = 64 if args.quick else 256
    stats, vectors = {}, {}
    with tempfile.TemporaryDirectory(prefix="pgsynapse-runtimes-") as tmp:  # the children's texts and vectors
        work = Path(tmp)
        (work / "texts.json").write_text(json.dumps({"chunks": texts, "queries": queries, "artifacts": arts,
                                                     "n_speed": n_speed, "n_batch1": 32 if args.quick else 64}))
        for rt in chosen:
            subprocess.run([sys.executable, "-m", "bench.runtimes", "--one", rt, "--work", str(work), "--threads",
                            str(args.threads)], check=True, env={**os.environ, "PGSYNAPSE_LOG_LEVEL": "warning"})
            stats[rt] = json.loads((work / f"{rt}.json").read_text())
            with np.load(work / f"{rt}.npz") as z:
                vectors[rt] = {k: z[k] for k in z.files}
    ref = vectors["torch"]
    for rt in chosen:
        v = vectors[rt]
        size = (Path(arts[rt]) / ONNX_FILES[rt.split(":")[0]]).stat().st_size if rt in arts else (default_model_path() / "model.safetensors").stat().st_size
        top_ref = np.argsort(-(ref["queries"] @ ref["chunks"].T), axis=1)[:, :10]
        top = np.argsort(-(v["queries"] @ v["chunks"].T), axis=1)[:, :10]
        overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_ref, top, strict=True)]))
        cos = float((ref["chunks"] * v["chunks"]).sum(axis=1).mean())
        r5, mrr = recall(v["queries"][: len(dev)], v["chunks"], ids, [d["relevant"] for d in dev])
        emit("runtimes", rt, chunks=len(texts), **stats[rt], size_mb=round(size / 2**20, 1),
             overlap_at_10=round(overlap, 4), cosine=round(cos, 5), dev_recall_at_5=round(r5, 4), dev_mrr_at_10=round(mrr, 4),
             speedup_b32=round(stats[rt]["texts_per_s_b32"] / stats["torch"]["texts_per_s_b32"], 2))
    interleaved(texts[: 64 if args.quick else 128], args.rounds, args.threads, chosen)
    table()


def interleaved(texts: list[str], rounds: int, threads: int, runtimes: list[str]) -> None:
    """Batch-32 texts/s of every runtime in one process, alternating round by round, so a shared, busy
    machine's load hits them alike; median per runtime and its ratio to torch."""
    ems = {}
    for rt in runtimes:
        path = artifact(*rt.split(":")) or default_model_path()
        ems[rt] = load_embedder(ModelSpec(1, "m", Path(path), rt.split(":")[0], 384), threads=threads, onnx_threads=threads)
        ems[rt].encode(texts[:32], 32)
    speeds: dict[str, list[float]] = {rt: [] for rt in runtimes}
    for _ in range(rounds):
        for rt, e in ems.items():
            s = time.perf_counter()
            e.encode(texts, 32)
            speeds[rt].append(len(texts) / (time.perf_counter() - s))
    base = float(np.median(speeds["torch"]))
    for rt in runtimes:
        med = float(np.median(speeds[rt]))
        emit("runtimes", f"interleaved_b32:{rt}", texts=len(texts), rounds=rounds, texts_per_s=round(med, 2),
             all=[round(x, 1) for x in speeds[rt]], speedup_vs_torch=round(med / base, 2))


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    run_benchmark(main)
