"""Asks in flight at once on one ``Client``: each one's latency, beside the same kind of questions asked one at a time.

An application that shares one ``Client`` between its requests (documented: several tasks may ask on one client at
once) has several questions in flight. The worker answers them in batches and commits a batch's answers in one
transaction, so their NOTIFYs reach the client together, often in one packet. Figures: per-ask latency (the ask
call, INSERT to Result) p50 / p95 / max; how long each answer took to reach its caller once the worker had written
it (the ask's latency less the row's ``latency_ms``, asked to written, both on the server's clock: milliseconds when
its NOTIFY wakes it) and how many asks it took over ``--stall-ms`` (stalled: woken by the client's safety re-read,
``recheck_seconds`` = 5 s, not by their NOTIFY; a slow answer on a busy machine is not one), for ``--concurrency``
asks at once in ``--rounds`` rounds, beside the ceiling measured in the same run: as many questions asked one at a
time on the same client (no ask waits on another).

    python -m bench.concurrent_asks [--quick] [--concurrency 8] [--rounds 10] [--stall-ms 1000] [--runtime onnx-int8]
"""

from __future__ import annotations

import time

import anyio
import psycopg

from bench.common import (
    DATA, add_runtime_option, corpus, database, emit, machine, parser, pct, questions, run_benchmark, set_runtime,
    spawn_worker, stop, table)
from pgsynapse.client import Client



def load_corpus(url: str, pages: list[dict[str, str]]) -> None:
    """INSERT the pages and wait (on NOTIFY) until the worker has embedded every one."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("LISTEN pgsynapse_documents")
        conn.execute("INSERT INTO pgsynapse.documents (source, title, body) SELECT * FROM unnest(%s::text[], %s::text[],"
                     " %s::text[])", ([p["id"] for p in pages], [p["title"] for p in pages], [p["text"] for p in pages]))
        pending = "SELECT count(*) FROM pgsynapse.documents WHERE status = 'pending'"
        while conn.execute(pending).fetchone()[0]:
            for _ in conn.notifies(timeout=5.0, stop_after=1):
                pass


def summary(asks: list[tuple[float, float]], *, stall_ms: float) -> dict[str, float]:
    """``asks``: (the ask's ms, its row's ``latency_ms``) each; stalled: its answer reached it over ``stall_ms`` after
    it was written."""
    lat = [a for a, _ in asks]
    after = [a - written for a, written in asks]
    return {"n": len(lat), "p50_ms": round(pct(lat, 50), 1), "p95_ms": round(pct(lat, 95), 1),
            "max_ms": round(max(lat), 1), "after_answer_p50_ms": round(pct(after, 50), 1),
            "after_answer_max_ms": round(max(after), 1), "stalled": sum(x > stall_ms for x in after)}


async def measure(url: str, texts: list[str], concurrency: int,
                  rounds: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(one at a time, ``concurrency`` at once) asks: each one's latency in ms and its row's ``latency_ms`` (asked to
    answer written, on the server); each question is asked once (distinct texts: no answer cache in play)."""
    one, together = [], []
    async with Client(url) as client:

        async def ask(text: str, out: list[tuple[float, float]]) -> None:
            started = time.perf_counter()
            result = await client.ask(text)
            if result.status != "answered" or result.latency_ms is None:
                raise RuntimeError(f"question not answered: {result.status} {result.error}")
            out.append(((time.perf_counter() - started) * 1000, result.latency_ms))

        n = concurrency * rounds
        for text in texts[:n]:
            await ask(text, one)
        for r in range(rounds):
            batch = texts[n + r * concurrency : n + (r + 1) * concurrency]
            async with anyio.create_task_group() as tg:
                for text in batch:
                    tg.start_soon(ask, text, together)
    return one, together


def main() -> None:
    p = parser(__doc__ or "")
    add_runtime_option(p)
    p.add_argument("--concurrency", type=int, default=8, help="asks in flight at once (default 8)")
    p.add_argument("--rounds", type=int, default=0, help="rounds of them (default 10, --quick 3)")
    p.add_argument("--stall-ms", type=float, default=1000.0,
                   help="an ask whose answer reached it this long after the worker wrote it is stalled (default 1000: "
                   "a NOTIFY takes milliseconds, the client's safety re-read comes up to 5 s later)")
    args = p.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    need = 2 * args.concurrency * rounds
    texts = list(dict.fromkeys(q["q"] for name in ("pg_docs_train.jsonl", "pg_docs_dev.jsonl")
                               for q in questions(name)))
    if len(texts) < need:
        raise SystemExit(f"{need} distinct questions needed, {len(texts)} found in {DATA} (pg_docs_train.jsonl, "
                         "pg_docs_dev.jsonl): set PGSYNAPSE_BENCH_DATA to the folder that holds the full question "
                         "sets, or ask fewer (--concurrency, --rounds)")
    emit("concurrent_asks", "machine", **machine())
    with database(args.database_url) as url:
        set_runtime(url, args.runtime)
        env = {"PGSYNAPSE_TORCH_THREADS": str(args.threads), "PGSYNAPSE_ONNX_THREADS": str(args.threads)}
        worker = spawn_worker(url, env)
        try:
            load_corpus(url, corpus(200 if args.quick else None))
            one, together = anyio.run(measure, url, texts, args.concurrency, rounds)
        finally:
            stop(worker)
    a, b = summary(one, stall_ms=args.stall_ms), summary(together, stall_ms=args.stall_ms)
    emit("concurrent_asks", "one_at_a_time", runtime=args.runtime, **a)
    emit("concurrent_asks", "at_once", runtime=args.runtime, concurrency=args.concurrency, **b)
    emit("concurrent_asks", "ratio", runtime=args.runtime, concurrency=args.concurrency,
         p50_ratio=round(b["p50_ms"] / a["p50_ms"], 2), p95_ratio=round(b["p95_ms"] / a["p95_ms"], 2),
         stalled=b["stalled"], stall_ms=args.stall_ms)
    table()


if __name__ == "__main__":
    run_benchmark(main)
