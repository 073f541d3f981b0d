"""Benchmark `generative_worker`: how many answers a generative worker writes per minute with questions queued at
once, against the raw generate() of the same prompts in the same process. For each ``--model`` (a preset, a .gguf
file or a model directory; the ``transformers`` answerer), ``--questions`` dev questions are INSERTed into
pgsynapse.questions in one statement (one transaction: all queued at once) on a clone of the docs corpus
(bench/corpusdb.py), and a real worker (``kinds = answer``, in this process, streaming on) answers them. Figures:
answers/minute (the first question asked to the last answer written), queue wait (asked to its job claimed, the
server's clock), end-to-end latency (the row's ``latency_ms``) p50 / p95, time to first token as the asker sees it
(asked to the first ``streaming`` NOTIFY) and inside generate() (the answerer's own), generated tokens/s (all new
tokens over the wall time) and decode tokens/s p50 (after the first piece). The ceiling, measured in the same run
on the very prompts the worker built: the model's ``generate()`` called on them one after another in a worker
thread as the handler's (tokenizer, generate, the answerer's streamer; no queue, retrieval, prompt fitting,
database or citation check), and with
``--batched`` all of them in one padded batch (what batching the questions could give; the worker does not).

    python -m bench.generative_worker --model qwen2.5-coder-0.5b --model smollm2-135m --questions 8 \\
        --context 512 --max-new-tokens 64 --threads 2 [--batched] [--pages 300]
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
import torch
from psycopg.rows import dict_row

from bench.common import emit, machine, parser, pct, questions, run_benchmark, table
from bench.corpusdb import DEFAULT_DIR, corpus_clone
from pgsynapse.answerers import Answer, Request, TransformersAnswerer
from pgsynapse.answerers.generative import _streamer
from pgsynapse.config import load_settings
from pgsynapse.listener.worker import Worker

BENCH = "generative_worker"

QUESTIONS_SQL = """
SELECT q.id, q.status, q.latency_ms, extract(epoch FROM coalesce(q.asked_at, q.created_at)) AS asked,
       extract(epoch FROM q.answered_at) AS answered, extract(epoch FROM j.started_at) AS started
FROM pgsynapse.questions q
JOIN pgsynapse.jobs j ON j.kind = 'answer' AND j.ref_id = q.id AND j.status = 'done'
WHERE q.id = ANY(%s) ORDER BY q.id"""


class RecordingAnswerer(TransformersAnswerer):
    """The product's answerer, each generation's prompt and stats kept (keyed by question) for the ceiling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generated: dict[str, tuple[str, dict[str, float]]] = {}

    def answer(self, req: Request, on_delta=None) -> Answer:
        self.last_stats = {}
        out = super().answer(req, on_delta)
        if self.last_stats:  # none when it had no passages (the not-found answer, nothing generated)
            assert self.last_prompt is not None
            self.generated[req.question] = (self.last_prompt, dict(self.last_stats))
        return out


async def queue_and_wait(settings, url: str, answerer: RecordingAnswerer, texts: list[str],
                         timeout: float) -> tuple[list[int], dict[int, float]]:
    """Start a worker with ``answerer``, INSERT ``texts`` in one statement, wait for every final answer NOTIFY;
    returns the question ids and, per id, when (epoch seconds) its first ``streaming`` NOTIFY arrived."""
    worker = Worker(settings, url)
    worker.handlers["answer"]._generative = answerer  # loaded by the benchmark (its load is timed apart)
    first_piece: dict[int, float] = {}
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: worker.run(task_status=task_status, handle_signals=False))
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("LISTEN pgsynapse_answers")
            ids = [r[0] for r in await (await conn.execute(
                "INSERT INTO pgsynapse.questions (text) SELECT unnest(%s::text[]) RETURNING id", (texts,))).fetchall()]
            pending = set(ids)
            with anyio.fail_after(timeout):
                async for n in conn.notifies():
                    payload = json.loads(n.payload)
                    if payload["id"] not in pending:
                        continue
                    if payload["status"] == "streaming":
                        first_piece.setdefault(payload["id"], time.time())
                    else:
                        pending.discard(payload["id"])
                        if not pending:
                            break
        worker.request_stop()
    return ids, first_piece


def ceiling(answerer: TransformersAnswerer, prompts: list[str]) -> list[dict[str, float]]:
    """generate() on each prompt, one after another, as the answerer calls it (its tokenizer call, greedy, its
    streamer): first piece and total seconds, new tokens."""
    tok, model = answerer.tokenizer, answerer.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt", add_special_tokens=not answerer.chat)
        enc.pop("token_type_ids", None)
        streamer = _streamer(tok, lambda piece: None)
        started = time.perf_counter()
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=answerer.max_new_tokens, do_sample=False, pad_token_id=pad,
                                 streamer=streamer)
        done = time.perf_counter()
        new = ids[0] if answerer.seq2seq else ids[0][enc["input_ids"].shape[1]:]
        out.append({"first_token_s": (streamer.first_at or done) - started, "seconds": done - started,
                    "new_tokens": int(len(new)), "prompt_tokens": int(enc["input_ids"].shape[1])})
    return out


def batched(answerer: TransformersAnswerer, prompts: list[str]) -> dict[str, float]:
    """generate() on all the prompts at once (left-padded, greedy): seconds and new tokens (up to each row's end
    token)."""
    tok, model = answerer.tokenizer, answerer.model
    if tok.pad_token is None:  # the answerer is done with (its worker stopped): set for the padding
        tok.pad_token = tok.eos_token
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not answerer.chat)
    finally:
        tok.padding_side = side
    enc.pop("token_type_ids", None)
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    started = time.perf_counter()
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=answerer.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    seconds = time.perf_counter() - started
    new = 0
    for row in ids[:, enc["input_ids"].shape[1]:].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        new += ends[0] + 1 if ends else len(row)
    return {"seconds": seconds, "new_tokens": new}


def decode_rate(st: dict[str, float]) -> float:
    """New tokens after the first over the time after the first piece."""
    decode_s = st["seconds"] - st["first_token_s"]
    return (st["new_tokens"] - 1) / decode_s if st["new_tokens"] > 1 and decode_s > 0 else 0.0


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--model", action="append", required=True, help="preset, .gguf file or model directory")
    p.add_argument("--questions", type=int, default=8, help="questions queued at once (dev set; default 8)")
    p.add_argument("--context", type=int, default=512, help="answer_context_tokens (default 512)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer_max_new_tokens (default 64)")
    p.add_argument("--batched", action="store_true", help="also generate() all the prompts in one padded batch")
    p.add_argument("--pages", type=int, default=0, help="the first N corpus pages only (0: all; a smaller "
                   "template embeds faster)")
    p.add_argument("--corpus-dir", type=Path, default=DEFAULT_DIR, help="the corpus's embedded server's folder")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the worker's answers")
    args = p.parse_args()
    if args.threads:  # the product's torch_threads (0: all cores)
        torch.set_num_threads(args.threads)
    emit(BENCH, "machine", **machine(), threads=torch.get_num_threads())
    texts = list(dict.fromkeys(it["q"] for it in questions("pg_docs_dev.jsonl")))[: args.questions]
    rows = []
    with corpus_clone(args.corpus_dir, args.pages or None, database_url=args.database_url) as (url, _info):
        for spec in args.model:
            settings = load_settings(environ={}, database_url=url, kinds=("answer",), answerer="transformers",
                                     answerer_model_path=spec, answer_max_new_tokens=args.max_new_tokens,
                                     answer_context_tokens=args.context, torch_threads=args.threads)
            started = time.perf_counter()
            gen = RecordingAnswerer(spec, max_new_tokens=args.max_new_tokens, context_tokens=args.context,
                                    cache_dir=settings.data_dir / "models" / "gguf")
            load_s = time.perf_counter() - started
            load1 = round(os.getloadavg()[0], 2)
            ids, first_piece = anyio.run(queue_and_wait, settings, url, gen, texts, args.timeout)
            with psycopg.connect(url, row_factory=dict_row) as conn:
                done = conn.execute(QUESTIONS_SQL, (ids,)).fetchall()
            if len(done) != len(ids) or any(r["status"] != "answered" for r in done):
                raise SystemExit(f"{BENCH}: not every question was answered: "
                                 f"{[(r['id'], r['status']) for r in done]} of {ids}")
            stats = [st for _, st in gen.generated.values()]
            wall = max(float(r["answered"]) for r in done) - min(float(r["asked"]) for r in done)
            wait = [(float(r["started"]) - float(r["asked"])) * 1000 for r in done]
            e2e = [float(r["latency_ms"]) for r in done]
            ttft_user = [(first_piece[r["id"]] - float(r["asked"])) * 1000 for r in done if r["id"] in first_piece]
            new_tokens = sum(int(s["new_tokens"]) for s in stats)
            rows.append(emit(
                BENCH, f"{spec}/worker", n=len(done), generated=len(stats), load_s=round(load_s, 1), load1=load1,
                answers_per_min=round(60 * len(done) / wall, 2), wall_s=round(wall, 1),
                queue_wait_p50_ms=round(pct(wait, 50)), queue_wait_p95_ms=round(pct(wait, 95)),
                e2e_p50_ms=round(pct(e2e, 50)), e2e_p95_ms=round(pct(e2e, 95)),
                ttft_asker_p50_ms=round(pct(ttft_user, 50)), ttft_asker_p95_ms=round(pct(ttft_user, 95)),
                ttft_generate_p50_ms=round(pct([s["first_token_s"] * 1000 for s in stats], 50)),
                ttft_generate_p95_ms=round(pct([s["first_token_s"] * 1000 for s in stats], 95)),
                gen_tok_s=round(new_tokens / wall, 2), decode_tok_s_p50=round(pct([decode_rate(s) for s in stats], 50), 2),
                new_tokens=new_tokens, prompt_tokens_p50=round(pct([s["prompt_tokens"] for s in stats], 50))))
            prompts = [prompt for prompt, _ in gen.generated.values()]
            load1 = round(os.getloadavg()[0], 2)
            # in a worker thread, as the handler's compute runs (anyio.to_thread): on a busy machine the same
            # generate() with 2 torch threads took up to 5x longer on the main thread than on another one
            raw = anyio.run(functools.partial(anyio.to_thread.run_sync, ceiling, gen, prompts))
            raw_s = sum(s["seconds"] for s in raw)
            raw_new = sum(s["new_tokens"] for s in raw)
            rows.append(emit(
                BENCH, f"{spec}/generate() one at a time", n=len(raw), load1=load1,
                answers_per_min=round(60 * len(raw) / raw_s, 2), wall_s=round(raw_s, 1),
                ttft_generate_p50_ms=round(pct([s["first_token_s"] * 1000 for s in raw], 50)),
                ttft_generate_p95_ms=round(pct([s["first_token_s"] * 1000 for s in raw], 95)),
                gen_tok_s=round(raw_new / raw_s, 2), decode_tok_s_p50=round(pct([decode_rate(s) for s in raw], 50), 2),
                new_tokens=raw_new, prompt_tokens_p50=round(pct([s["prompt_tokens"] for s in raw], 50)),
                worker_share=round(rows[-1]["answers_per_min"] / (60 * len(raw) / raw_s), 2)))
            if args.batched and prompts:
                load1 = round(os.getloadavg()[0], 2)
                b = anyio.run(functools.partial(anyio.to_thread.run_sync, batched, gen, prompts))
                rows.append(emit(BENCH, f"{spec}/generate() batch of {len(prompts)}", n=len(prompts), load1=load1,
                                 answers_per_min=round(60 * len(prompts) / b["seconds"], 2),
                                 wall_s=round(b["seconds"], 1), gen_tok_s=round(b["new_tokens"] / b["seconds"], 2),
                                 new_tokens=b["new_tokens"]))
            del gen
    table(rows)


if __name__ == "__main__":
    run_benchmark(main)
