"""Chunking: retrieval quality and embedding cost of chunk size and overlap, on the real corpus.

The pool is every page a dev or train question points to (291 pages of the PostgreSQL docs, each the others'
distractors), plus ``--distractors`` more pages. Each configuration ``TOKENS/OVERLAP`` chunks the pool with
the worker's own :class:`~pgsynapse.chunking.Chunker` and embeds every chunk with one runtime (``onnx`` fp32 by
default: the same vectors as torch, faster); the questions are embedded once. Reported per configuration:
chunks, tokens embedded per page, embedding seconds and pages/s (same runtime, same process, so the cost of
a configuration is comparable), and page-level recall@5 / MRR@10 for the 60 dev questions and, as a larger
second sample, the 340 train questions (none of this trains anything).

    python -m bench.chunking [--configs 256/32,128/16] [--runtime onnx] [--distractors N]
"""

from __future__ import annotations

import time

from bench.common import artifact, corpus, emit, machine, parser, questions, run_benchmark, table
from bench.runtimes import recall
from pgsynapse.chunking import Chunker
from pgsynapse.models import ModelSpec, default_model_path, load_embedder


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--configs", default="256/32,256/0,192/16,128/16,128/0", help="TOKENS/OVERLAP, comma-separated")
    p.add_argument("--runtime", default="onnx", help="torch, onnx or onnx-int8[:scheme] (default onnx: torch's vectors)")
    p.add_argument("--distractors", type=int, default=0, help="pages beyond the questions' pages")
    args = p.parse_args()
    emit("chunking", "machine", **machine())
    dev = questions("pg_docs_dev.jsonl")
    train = questions("pg_docs_train.jsonl")
    wanted = {p for d in dev for p in d["relevant"]} | {d["page"] for d in train}
    pages = corpus()
    pool = [p for p in pages if p["id"] in wanted] + [p for p in pages if p["id"] not in wanted][: args.distractors]
    if args.quick:
        keep = {p for d in dev for p in d["relevant"]}
        pool = [p for p in pool if p["id"] in keep]
        train = [d for d in train if d["page"] in keep]
    runtime, _, scheme = args.runtime.partition(":")
    path = artifact(runtime, scheme or None) or default_model_path()
    e = load_embedder(ModelSpec(1, "m", path, runtime, 384), threads=args.threads, onnx_threads=args.threads)
    qv = e.encode([d["q"] for d in dev] + [d["q"] for d in train], 32)
    dev_rel = [d["relevant"] for d in dev]
    train_rel = [[d["page"]] for d in train]
    for config in args.configs.split(","):
        tokens, overlap = (int(x) for x in config.split("/"))
        chunker = Chunker(e.tokenizer, tokens, overlap)
        texts, ids, n_tokens = [], [], 0
        for page in pool:
            for c in chunker.split(page["title"], page["text"]):
                texts.append(c.embed_text)
                ids.append(page["id"])
                n_tokens += c.token_count
        e.encode(texts[:32], 32)  # warm this shape
        started = time.perf_counter()
        vecs = e.encode(texts, 32)
        seconds = time.perf_counter() - started
        d5, dmrr = recall(qv[: len(dev)], vecs, ids, dev_rel)
        t5, tmrr = recall(qv[len(dev):], vecs, ids, train_rel)
        emit("chunking", config, runtime=args.runtime, pages=len(pool), chunks=len(texts),
             tokens_per_page=round(n_tokens / len(pool)), seconds=round(seconds, 1),
             pages_per_s=round(len(pool) / seconds, 3), chunks_per_s=round(len(texts) / seconds, 1),
             dev_recall_at_5=round(100 * d5, 1), dev_mrr_at_10=round(dmrr, 3),
             train_recall_at_5=round(100 * t5, 1), train_mrr_at_10=round(tmrr, 3))
    table()


if __name__ == "__main__":
    run_benchmark(main)
