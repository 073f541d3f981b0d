"""Benchmark `text-to-sql` (issue 19): execution accuracy of the SQL models on held-out Spider databases.

The Spider dev databases are built in Postgres by bench/spider.py (schemas, synthetic rows, gold SQL translated to
PostgreSQL); the split by database is fixed in bench/data/spider_split.json. For each ``--model``
(``RUNTIME:PATH``, e.g. ``llama-cpp:/work/llm/qwen.gguf``) every question of ``--part`` (default ``report``;
``choose`` is the half for picking settings) whose gold query runs goes through the product's path: the schema
context read from the catalog (textsql.context), the generator (textsql.generate), the safety check
(textsql.safety) and the read-only run (textsql.execute) on the reader's own login as the worker runs it
(textsql/reader.py: the embedded server's, or ``PGSYNAPSE_SQL_READER_URL`` with ``--database-url``, on the
benchmark's database), and is compared with the gold result (same_result, ordered
when the gold query has an ORDER BY). Per model: execution accuracy, the share refused by the safety layer by
reason, the share that failed (the statement errored or timed out), p50/p95 seconds per question (generation +
check + run). An audit checks at the end that no table of the benchmark's schemas changed (row counts and a hash
of every table), so "zero unsafe statements executed" is measured, not assumed.

``--finetune``: each model is also fine-tuned (the trainer's entry point, textsql.train.fine_tune: full, or
``--lora``; ``--epochs``, ``--budget`` seconds) on the train databases' questions with their gold SQL as the
corrected statements (``--train-limit``: a seeded sample of them), and the fine-tuned model (a transformers
directory, the ``transformers`` runtime) is evaluated on the same questions. A ``.gguf`` base is fine-tuned as
it is (the trainer dequantises it and detaches transformers' GGUF quantizer before saving). ``--train-only``
saves the fine-tuned model and evaluates nothing: export it with ``python -m pgsynapse.textsql.gguf_export`` and
evaluate the export beside its base on llama-cpp (two ``--model``), the same runtime and questions for both.

``--notify N``: p50/p95 INSERT -> ``pgsynapse_data_answers`` NOTIFY through the real worker flow
(``pgsynapse.data_questions`` rows, the ``sql_answer`` handler) for the first model on N questions.

    python -m bench.text_to_sql --model llama-cpp:/work/llm/qwen.gguf --limit 40
    python -m bench.text_to_sql --model llama-cpp:/work/llm/qwen.gguf \
        --model llama-cpp:/work/llm/SmolLM2-135M-Instruct.Q4_1.gguf --notify 30 --outputs /tmp/tsbench.jsonl
    python -m bench.text_to_sql --model llama-cpp:/work/llm/SmolLM2-135M-Instruct.Q4_1.gguf --finetune --epochs 2
    python -m bench.text_to_sql --model llama-cpp:qwen2.5-coder-0.5b --finetune --lora --train-only --out-dir /work/ft
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import sys
import time
from collections import Counter
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench.common import database, emit, machine, parser, pct, run_benchmark, spawn_worker, stop, table
from bench.spider import build, ident, split
from pgsynapse.config import load_settings
from pgsynapse.handlers.sql_answer import answer
from pgsynapse.textsql import reader
from pgsynapse.textsql.context import schema_context
from pgsynapse.textsql.execute import Limits, QueryFailed, run_readonly, same_result
from pgsynapse.textsql.generate import SqlPrompt, make_generator
from pgsynapse.textsql.safety import UnsafeSQL, check_sql
from pgsynapse.textsql.train import Pair, fine_tune

_ORDERED = re.compile(r"\border\s+by\b", re.I)


def audit(conn: psycopg.Connection, schemas: list[str]) -> str:
    """A hash of every row of every table of ``schemas``: equal before and after means nothing was written."""
    h = hashlib.sha256()
    for schema, rel in conn.execute("SELECT table_schema, table_name FROM information_schema.tables WHERE "
                                    "table_schema = ANY(%s) ORDER BY 1, 2", (schemas,)).fetchall():
        h.update(f"{schema}.{rel}".encode())
        for (row,) in conn.execute(f"SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM "
                                   f"{ident(schema)}.{ident(rel)} t").fetchall():
            h.update(str(row).encode())
    return h.hexdigest()


def statement_settings(settings: Any, url: str, database_url: str | None,
                       environ: dict[str, str] | None = None) -> Any:
    """The settings the questions' statements run under (:func:`reader.for_command`), on the benchmark's database
    at ``url``: on the embedded server (no ``database_url``) the reader role's login there; on a server of
    ``--database-url`` the login of ``PGSYNAPSE_SQL_READER_URL`` (from ``environ``) on that database, else the
    benchmark's own connection (the worker's warning says so)."""
    if database_url is None:
        return settings
    given = (os.environ if environ is None else environ).get("PGSYNAPSE_SQL_READER_URL")
    login = make_conninfo(given, dbname=conninfo_to_dict(url)["dbname"]) if given else None
    return settings.model_copy(update={"database_url": url, "sql_reader_url": login})


def spider_context(conn: psycopg.Connection, item: dict[str, Any], contexts: dict[str, Any],
                   s: Any) -> tuple[str, Any]:
    """A Spider item's schema and its schema context as the handler builds it (sample values, table cap, reader
    role from the settings), built once per schema into ``contexts``."""
    schema = f"spider_{item['db_id'].lower()}"
    if schema not in contexts:
        contexts[schema] = schema_context(conn, schema, None, samples=s.sql_sample_values,
                                          max_tables=s.sql_max_tables, role=s.sql_reader_role)
    return schema, contexts[schema]


def evaluate(conn: psycopg.Connection, gen: Any, items: list[dict[str, Any]], settings: Any, *,
             outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Execution accuracy of ``gen`` on ``items`` (questions with a runnable gold ``sql``) as the ``sql_answer``
    handler answers them: its schema context (sample values and table limit from ``settings``), then the
    handler's own ``answer`` (candidates, safety check, read-only run, vote, fix turns)."""
    s = settings
    limits = Limits.of(s)
    contexts: dict[str, Any] = {}
    right, failed, refused, seconds, first_seconds = 0, 0, Counter(), [], []
    fix_tried, fix_ran, fix_right = 0, 0, 0
    gold_refused = 0
    for it in items:
        schema, ctx = spider_context(conn, it, contexts, s)
        try:
            gold = run_readonly(conn, check_sql(it["sql"], allowed=ctx.allowed, search_path=(schema,)), limits,
                                role=s.sql_reader_role, search_path=(schema,))
        except (UnsafeSQL, QueryFailed) as e:
            gold_refused += 1  # the product refuses (or cannot run) a gold statement: counted, the question skipped
            if outputs is not None:
                outputs.append({"i": it["i"], "db_id": it["db_id"], "gold": it["sql"], "outcome": "gold_refused",
                                "error": str(e)[:300]})
            continue
        ans = answer(conn, gen, SqlPrompt(it["question"], ctx.text), ctx, schema, s)
        best = ans.best
        seconds.append(ans.seconds)
        first_seconds.append(ans.first_seconds)
        fix_tried += bool(ans.fixes)
        fix_ran += bool(ans.fixes) and best.result is not None
        if best.result is not None:
            ok = same_result(gold, best.result, ordered=bool(_ORDERED.search(it["sql"])))
            outcome = "right" if ok else "wrong"
            right += ok
            fix_right += ok and bool(ans.fixes)
        elif best.refused:
            outcome = "refused"
            refused[best.reason or "empty"] += 1
        else:
            outcome = "failed"
            failed += 1
        if outputs is not None:
            outputs.append({"i": it["i"], "db_id": it["db_id"], "question": it["question"], "gold": it["sql"],
                            # said: the statement as the model wrote it (sql: as checked and run), for offline
                            # re-scoring of rewrites without generating again
                            "said": best.said, "sql": best.sql, "outcome": outcome, "error": best.error,
                            "seconds": round(seconds[-1], 3), "first_seconds": round(ans.first_seconds, 3),
                            "candidates": ans.candidates,
                            "fixes": [a.sql for a in ans.fixes], "fix_errors": [a.error for a in ans.fixes],
                            "first_error": ans.first.error if ans.first else None,
                            **{k: v for k, v in getattr(gen, "last_stats", {}).items() if k != "seconds"}})
    n = len(seconds)
    return {"n": n, "exec_acc": round(right / n, 4) if n else None,
            "refused": round(sum(refused.values()) / n, 4) if n else None,
            "refused_by": dict(refused), "failed": round(failed / n, 4) if n else None,
            "p50_s": round(pct(seconds, 50), 2), "p95_s": round(pct(seconds, 95), 2), "gold_refused": gold_refused,
            "fix_tried": fix_tried, "fix_ran": fix_ran, "fix_right": fix_right,
            # the same questions as sql_fix_attempts = 0 answers them: the first statements are the same (greedy)
            "before_fix": {"exec_acc": round((right - fix_right) / n, 4) if n else None,
                           "failed": round((failed + fix_ran) / n, 4) if n else None,
                           "p50_s": round(pct(first_seconds, 50), 2), "p95_s": round(pct(first_seconds, 95), 2)}}


def notify_latency(url: str, items: list[dict[str, Any]], runtime: str, path: str,
                   reader_url: str | None) -> list[float]:
    """INSERT each question into pgsynapse.data_questions and wait for its ``pgsynapse_data_answers`` NOTIFY
    before the next, with a worker (``pgsynapse run``) using ``runtime``/``path`` as its SQL model and
    ``reader_url`` as its sql_reader_url (None: none): ms per question. Returns also the statuses."""
    worker = spawn_worker(url, {"PGSYNAPSE_SQL_RUNTIME": runtime, "PGSYNAPSE_SQL_MODEL_PATH": path,
                                **({"PGSYNAPSE_SQL_READER_URL": reader_url} if reader_url else {})})
    lat: list[float] = []
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("LISTEN pgsynapse_data_answers")
            for i, it in enumerate(items):
                s = time.perf_counter()
                qid = conn.execute("INSERT INTO pgsynapse.data_questions (session_id, text, target_schema) VALUES "
                                   "(%s, %s, %s) RETURNING id", (f"bench-{i}", it["question"],
                                                                 f"spider_{it['db_id'].lower()}")).fetchone()[0]
                for n in conn.notifies(timeout=300):
                    if str(qid) == n.payload.strip() or str(qid) == str(json.loads(n.payload).get("id", "")):
                        break
                lat.append((time.perf_counter() - s) * 1000)
            statuses = dict(conn.execute("SELECT status, count(*) FROM pgsynapse.data_questions GROUP BY 1"))
    finally:
        stop(worker)
    emit("text-to-sql", "notify-statuses", **statuses)
    return lat


def finetune(conn: psycopg.Connection, items: list[dict[str, Any]], path: str, out_dir: str, settings: Any, *,
             lora: bool, epochs: int, budget_seconds: float) -> tuple[str, dict[str, Any]]:
    """Fine-tunes ``path`` on ``items`` (training questions, their gold SQL as the corrected statement) with the
    trainer's Python entry point (:func:`pgsynapse.textsql.train.fine_tune`: the prompt exactly as the generator
    builds it, from the schema context the sql_answer handler would give). Returns the transformers directory and
    the fit report."""
    from dataclasses import asdict

    s = settings
    contexts: dict[str, Any] = {}
    pairs = []
    for it in items:
        schema, ctx = spider_context(conn, it, contexts, s)
        pairs.append(Pair(it["question"], ctx.text, it["sql"], schema, ctx.allowed))
    report = fine_tune(pairs, path, out_dir, lora=lora, epochs=epochs, lr=s.sql_retrain_lr,
                       context_tokens=s.sql_context_tokens, max_new_tokens=s.sql_max_new_tokens,
                       budget_seconds=budget_seconds, threads=s.torch_threads,
                       cache_dir=s.data_dir / "models" / "gguf",
                       on_step=lambda ev: print(json.dumps({**ev, "t": round(time.perf_counter())}), file=sys.stderr,
                                                flush=True))
    return out_dir, asdict(report)


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--model", action="append", required=True, help="RUNTIME:PATH (llama-cpp, transformers)")
    p.add_argument("--part", choices=["report", "choose", "train"], default="report")
    p.add_argument("--limit", type=int, default=0, help="questions at most (a seeded sample; 0 = all)")
    p.add_argument("--candidates", type=int, default=1, help="sql_candidates (self-consistency)")
    p.add_argument("--fix-attempts", type=int, default=None, help="sql_fix_attempts (fix turns with the "
                   "database's error when no candidate ran; default: the setting's default)")
    p.add_argument("--context-tokens", type=int, default=None, help="sql_context_tokens (prompt plus statement; "
                   "default: the setting's default)")
    p.add_argument("--notify", type=int, default=0, help="INSERT -> NOTIFY latency on this many questions")
    p.add_argument("--outputs", default=None, help="write each generated statement (JSON lines) here")
    p.add_argument("--finetune", action="store_true", help="also fine-tune each model on the train databases' "
                   "questions (gold SQL as the corrections) with the trainer, and evaluate the result")
    p.add_argument("--train-limit", type=int, default=0, help="training pairs at most (a seeded sample; 0 = all)")
    p.add_argument("--lora", action="store_true", help="LoRA (sql_retrain_lora) instead of a full fine-tune")
    p.add_argument("--epochs", type=int, default=1, help="epochs of the fine-tune")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: sql_retrain_lr)")
    p.add_argument("--budget", type=float, default=1800.0, help="training seconds at most (the trainer stops)")
    p.add_argument("--only-tuned", action="store_true", help="with --finetune: evaluate the fine-tuned models only")
    p.add_argument("--train-only", action="store_true", help="with --finetune: save the fine-tuned models, "
                   "evaluate none (evaluate them later with --model, e.g. after a GGUF export)")
    p.add_argument("--out-dir", default="/tmp/tsbench-models", help="where fine-tuned models are saved")
    args = p.parse_args()
    emit("text-to-sql", "machine", **machine())
    settings = load_settings(environ={"PGSYNAPSE_SQL_CANDIDATES": str(args.candidates),
                                      **({"PGSYNAPSE_SQL_FIX_ATTEMPTS": str(args.fix_attempts)}
                                         if args.fix_attempts is not None else {}),
                                      **({"PGSYNAPSE_SQL_RETRAIN_LR": str(args.lr)} if args.lr else {}),
                                      **({"PGSYNAPSE_SQL_CONTEXT_TOKENS": str(args.context_tokens)}
                                         if args.context_tokens is not None else {})})
    parts = split()
    db_ids = parts[args.part] + (parts["train"] if args.finetune else [])
    rows, outputs = [], []
    with database(args.database_url) as url:
        _, items = build(url, db_ids)
        train = [it for it in items if it["status"] == "ok" and it["db_id"] in parts["train"]]
        if args.train_limit and args.train_limit < len(train):
            train = sorted(random.Random(19).sample(train, args.train_limit), key=lambda it: it["i"])
        items = [it for it in items if it["db_id"] in parts[args.part]]
        dropped = Counter(it["status"] for it in items if it["status"] != "ok")
        items = [it for it in items if it["status"] == "ok"]
        if args.limit and args.limit < len(items):
            items = sorted(random.Random(19).sample(items, args.limit), key=lambda it: it["i"])
        emit("text-to-sql", "data", part=args.part, databases=len(parts[args.part]), questions=len(items),
             gold_dropped=dict(dropped))
        schemas = [f"spider_{d.lower()}" for d in parts[args.part]]
        specs: list[tuple[str, str, str]] = [(spec, *spec.split(":", 1)) for spec in args.model]  # type: ignore[misc]
        if args.finetune:
            with psycopg.connect(url, autocommit=True) as conn:
                for spec, runtime, path in list(specs):
                    started = time.perf_counter()
                    out_dir = f"{args.out_dir}/{path.rsplit('/', 1)[-1]}-{'lora' if args.lora else 'full'}"
                    tuned, report = finetune(conn, train, path, out_dir, settings, lora=args.lora, epochs=args.epochs,
                                             budget_seconds=args.budget)
                    rows.append(emit("text-to-sql", f"finetune {path.rsplit('/', 1)[-1]}", **{
                        "pairs": len(train), "lr": settings.sql_retrain_lr, **report,
                        "wall_s": round(time.perf_counter() - started),
                        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
                    specs.append((f"{spec} fine-tuned", "transformers", tuned))
            if args.train_only:
                specs = []
            elif args.only_tuned:
                specs = [sp for sp in specs if sp[0].endswith(" fine-tuned")]
        run_as = statement_settings(settings, url, args.database_url)
        with psycopg.connect(url, autocommit=True) as admin, reader.for_command(url, run_as, one_off=False) as conn:
            before = audit(admin, schemas)
            for spec, runtime, path in specs:
                started = time.perf_counter()
                gen = make_generator(runtime, path, settings.model_copy(update={"sql_runtime": runtime,
                                                                              "sql_model_path": path}))
                load_s = time.perf_counter() - started
                out: list[dict[str, Any]] = []
                r = evaluate(conn, gen, items, settings, outputs=out)
                for o in out:
                    o["model"] = spec
                outputs.extend(out)
                rows.append(emit("text-to-sql", spec, part=args.part,
                                 candidates=args.candidates, fix_attempts=settings.sql_fix_attempts,
                                 load_s=round(load_s, 1), **r))
                del gen
            after = audit(admin, schemas)
        rows.append(emit("text-to-sql", "audit", tables_unchanged=before == after))
        if args.notify:
            runtime, path = args.model[0].split(":", 1)
            lat = notify_latency(url, items[: args.notify], runtime, path, reader.reader_url(url, run_as))
            rows.append(emit("text-to-sql", f"insert->notify {path.rsplit('/', 1)[-1]}/{runtime}", n=len(lat),
                             p50_ms=round(pct(lat, 50)), p95_ms=round(pct(lat, 95))))
    if args.outputs:
        with open(args.outputs, "w") as f:
            for o in outputs:
                f.write(json.dumps(o, default=str) + "\n")
    table(rows)


if __name__ == "__main__":
    run_benchmark(main)
