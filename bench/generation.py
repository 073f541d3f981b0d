"""Benchmark `generation` (issue 18, item 3): how fast the local generators answer, and what the prompt budget
costs. For each ``--model`` (a preset, a .gguf file or a model directory) and each ``--context`` budget
(``answer_context_tokens``), the report half of the dev questions (bench/devsplit.py) is retrieved through the
product's path on the docs corpus (bench/corpusdb.py) and answered by the ``transformers`` answerer with streaming
(``on_delta``): time to first token (first streamed piece) p50/p95 (llama-cpp: with the prompt prefix kept from
the question before, and with ``--no-reuse`` also without), decode tokens/s (new tokens after the first,
over the time after the first), prompt tokens, passages kept by the budget, and answers flagged for citations.
Answer quality (first citation, groundedness) is bench/answer_quality.py's job.

    python -m bench.generation --model qwen2.5-coder-0.5b --model smollm2-135m --context 1024 --context 2048 --limit 8
"""

from __future__ import annotations

import json
import time

import anyio
import psycopg
import torch
from psycopg.rows import dict_row

from bench.answer_quality import retrieve
from bench.common import emit, machine, parser, pct, questions, run_benchmark, table
from bench.corpusdb import corpus_clone
from bench.devsplit import split
from pgsynapse.answerers import NOT_FOUND, Request, TransformersAnswerer
from pgsynapse.answerers.llamacpp import LlamaCppAnswerer
from pgsynapse.config import load_settings
from pgsynapse.models import ModelCache


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--model", action="append", required=True, help="preset, .gguf file or model directory")
    p.add_argument("--context", action="append", type=int, default=None, help="answer_context_tokens (repeatable)")
    p.add_argument("--runtime", action="append", choices=["transformers", "llama-cpp"], default=None,
                   help="answerer runtime (repeatable; default transformers)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--limit", type=int, default=8, help="report-half questions")
    p.add_argument("--answers", default=None, help="write each answer (JSON lines) here")
    p.add_argument("--no-reuse", action="store_true", help="llama-cpp: also run each configuration with every prompt"
                   " read whole (no state kept between questions), for the comparison")
    args = p.parse_args()
    if args.threads:  # the product's torch_threads (0: all cores)
        torch.set_num_threads(args.threads)
    emit("generation", "machine", **machine(), threads=torch.get_num_threads())
    items = split(questions("pg_docs_dev.jsonl"))["report"][: args.limit]
    settings = load_settings(environ={})
    models = ModelCache()
    rows, answers = [], []
    with corpus_clone(database_url=args.database_url) as (url, _info):
        with psycopg.connect(url, row_factory=dict_row) as conn:
            version = conn.execute("SELECT id, name, artifact_path, runtime, dim, status FROM pgsynapse.model_versions"
                                   " WHERE status = 'active'").fetchone()
        retrieved = anyio.run(retrieve, url, [it["q"] for it in items], version, models)
    runs = [(m, r, c, reuse) for m in args.model for r in args.runtime or ["transformers"]
            for c in args.context or [settings.answer_context_tokens]
            for reuse in ([True, False] if args.no_reuse and r == "llama-cpp" else [True])]
    for spec, runtime, context, reuse in runs:
        started = time.perf_counter()
        if runtime == "llama-cpp":
            gen = LlamaCppAnswerer(spec, max_new_tokens=args.max_new_tokens, context_tokens=context,
                                   threads=args.threads, cache_dir=settings.data_dir / "models" / "gguf")
        else:
            gen = TransformersAnswerer(spec, max_new_tokens=args.max_new_tokens, context_tokens=context,
                                       cache_dir=settings.data_dir / "models" / "gguf")
        load_s = time.perf_counter() - started
        if not reuse:
            gen.reuse_prefix = False
        gen.answer(Request("warm up", retrieved[0][0][:1]))
        stats = []
        for it, (passages, vec) in zip(items, retrieved, strict=True):
            ans = gen.answer(Request(it["q"], passages, [], vec), on_delta=lambda piece: None)
            st = dict(gen.last_stats)
            st["flagged"] = bool(ans.flags)
            st["not_found"] = ans.text == NOT_FOUND
            decode_s = st["seconds"] - st["first_token_s"]
            st["tok_s"] = (st["new_tokens"] - 1) / decode_s if st["new_tokens"] > 1 and decode_s > 0 else 0.0
            stats.append(st)
            answers.append({"model": spec, "runtime": runtime, "context": context, "q": it["q"], "answer": ans.text, "flags": ans.flags})
        ttft = [s["first_token_s"] * 1000 for s in stats]
        rows.append(emit(
            "generation", f"{spec}/{runtime}/ctx{context}" + ("" if reuse else "/no-reuse"), n=len(stats),
            load_s=round(load_s, 1), prefix_reused_p50=pct([s.get("prefix_tokens_reused", 0) for s in stats], 50),
            ttft_p50_ms=round(pct(ttft, 50)), ttft_p95_ms=round(pct(ttft, 95)),
            tok_s_p50=round(pct([s["tok_s"] for s in stats], 50), 1),
            prompt_tokens_p50=round(pct([s["prompt_tokens"] for s in stats], 50)),
            passages_p50=pct([s["passages"] for s in stats], 50),
            flagged=sum(s["flagged"] for s in stats), not_found=sum(s["not_found"] for s in stats)))
        del gen
    if args.answers:
        with open(args.answers, "w") as f:
            for a in answers:
                f.write(json.dumps(a) + "\n")
    table(rows)


if __name__ == "__main__":
    run_benchmark(main)
