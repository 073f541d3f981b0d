"""``pgsynapse demo``: ingest real text with plain INSERTs, let the worker embed it, search it."""

from __future__ import annotations

import secrets
import sys
import textwrap
import time

import anyio
import psycopg
from psycopg.rows import tuple_row
from tqdm import tqdm

from pgsynapse.answerers.local_models import preset_not_installed
from pgsynapse.client import Client, DataResult, format_result
from pgsynapse.config import Settings
from pgsynapse.corpus import demo_pages
from pgsynapse.db import Database, next_notifies
from pgsynapse.listener.wakeup import lone_error
from pgsynapse.listener.worker import Worker
from pgsynapse.logs import get_logger
from pgsynapse.migrate import migrate
from pgsynapse.models import ModelCache
from pgsynapse.queries import q
from pgsynapse.search import search, search_order
from pgsynapse.textsql.cli import format_data_result
from pgsynapse.textsql.execute import Result, same_result

log = get_logger(__name__)
FILE = "demo.sql"

QUERIES = [
    "how do I make a column unique so duplicates are rejected",
    "undo changes made inside a transaction",
    "store and query JSON documents",
    "reclaim space from dead rows",
    "back up a single database to a file",
]

QUESTIONS = [
    ("How do I roll back part of a transaction?", "demo-1"),
    ("and how do I release that savepoint?", "demo-1"),
    ("Which index type supports JSON containment queries?", "demo-2"),
]

SHOP_SQL = q("demo_shop", FILE)  # the data question's table (demo.sql)
DATA_QUESTION = "How many orders has each region shipped, most first?"
# its answer written by hand: the demo says whether the model's result has these rows
DATA_CHECK = q("demo_data_check", FILE)


async def check_data_answer(conn: psycopg.AsyncConnection, data: DataResult) -> str:
    """Whether the model's result has the rows of :data:`DATA_CHECK` (columns in any order), and if not what to do
    about it: a small local model's SQL is often wrong, and a result alone does not show it."""
    cur = await conn.cursor(row_factory=tuple_row).execute(DATA_CHECK)
    want = Result([{"name": d.name} for d in cur.description], [list(r) for r in await cur.fetchall()])
    if data.status == "answered" and same_result(want, Result(data.columns, data.rows), ordered=False):
        return f"checked: the rows of a query written by hand ({DATA_CHECK})"
    rows = ", ".join(" ".join(map(str, r)) for r in want.rows)
    return (f"checked: NOT the rows of a query written by hand ({DATA_CHECK}: {rows}). Small local SQL models are "
            "often wrong (the default gets about 4 in 10 of Spider's held-out questions right: BENCHMARKS.md, "
            "text-to-SQL): read the SQL before trusting a result, and record the right one with `pgsynapse "
            f"sql-correct {data.id} --sql \"...\"` (corrections train the next SQL model: docs/text-to-sql.md).")


def run_demo(settings: Settings, *, limit: int = 55, out=None) -> int:
    """The demo; it prints to ``out``, else to the ``sys.stdout`` of the call (a default bound at import printed past
    a ``contextlib.redirect_stdout`` around it, and past pytest's capture of an in-process ``pgsynapse demo``)."""
    with Database(settings) as db:
        migrate(db.url)
        return anyio.run(_demo, settings, db, limit, out or sys.stdout)


def model_line(version: dict) -> str:
    """``model: NAME on RUNTIME`` with what the start-up export measured (see docs/performance.md)."""
    line = f"model: {version['name']} on {version['runtime']}"
    record = (version.get("metrics") or {}).get("runtime_export") or {}
    accepted = [t for t in record.get("tried", []) if t.get("accepted")]
    if accepted and record.get("runtime") == version["runtime"]:
        t = accepted[-1]
        scheme = f" {t['scheme']}" if t.get("scheme") else ""
        line += (f" ({version['runtime']}{scheme} exported once in {record['seconds']:.0f}s;"
                 f" top-10 neighbour agreement with torch {t['overlap_at_10']:.3f})")
    elif record.get("error") or record.get("tried"):
        line += f" (export to {record['requested']} not used: {record.get('error') or 'agreement below 0.95'})"
    return line


async def answer_data_question(settings: Settings, url: str, models: ModelCache) -> DataResult:
    """The data question, answered by a worker of its own (kind ``sql_answer``, sharing ``models``: the text model
    narrows the schema) started here, when the demo gets to it: a worker loads its SQL model before it says it
    started (SqlAnswerHandler.warm_up: 45 s for the default on 2 cores), which in the demo's one worker came before
    the first document was embedded. A model that cannot load stops the demo with its error, raised bare."""
    worker = Worker(settings.model_copy(update={"kinds": ("sql_answer",)}), url, models=models, rollout=False)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: worker.run(task_status=task_status, handle_signals=False))
            try:
                async with Client(url) as client:
                    return await client.ask_data(DATA_QUESTION, schema="demo_shop", timeout=600)
            finally:
                worker.request_stop()
    except BaseExceptionGroup as group:
        if (only := lone_error(group)) is None:
            raise
        raise only from None


async def _demo(settings: Settings, db: Database, limit: int, out) -> int:
    what, pages = demo_pages(limit)
    print(f"pgsynapse demo: {len(pages)} pages of the {what}", file=out)
    print(f"database: {'embedded PostgreSQL in ' + str(settings.data_dir) if settings.embedded else 'DATABASE_URL'}", file=out)
    # the data question's kind gets a worker of its own when the demo gets there (answer_data_question)
    sql = "sql_answer" in settings.kinds
    worker = Worker(settings.model_copy(update={"kinds": tuple(k for k in settings.kinds if k != "sql_answer")})
                    if sql and len(settings.kinds) > 1 else settings, db.url)
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: worker.run(task_status=task_status, handle_signals=False))
        async with db.aconnect(autocommit=True) as conn:
            await conn.execute("LISTEN pgsynapse_documents")
            print(model_line(await (await conn.execute(q("demo_active_model", FILE))).fetchone()), file=out)
            started = time.perf_counter()
            async with conn.transaction():
                for p in pages:
                    await conn.execute(q("demo_insert_document", FILE), {"source": p.source, "title": p.title, "body": p.text})
            sources = [p.source for p in pages]
            row = await (await conn.execute(q("demo_embedded", FILE), {"sources": sources})).fetchone()
            with tqdm(total=row["total"], desc="embedding", unit="doc", file=out, disable=None) as bar:
                bar.update(row["done"])
                while row["done"] < row["total"]:
                    await next_notifies(conn, settings.poll_interval)
                    row = await (await conn.execute(q("demo_embedded", FILE), {"sources": sources})).fetchone()
                    bar.update(row["done"] - bar.n)
            took = time.perf_counter() - started
            stats = await (await conn.execute(q("demo_chunks", FILE), {"sources": sources})).fetchone()
            print(f"\nembedded {row['total']} documents ({stats['chunks']} chunks) in {took:.1f}s"
                  + (f", {row['failed']} failed" if row["failed"] else ""), file=out)
            print("\nquestions (INSERT INTO pgsynapse.questions, answer announced by NOTIFY):", file=out)
            # each run's conversations are new ones: a run that reused last run's session ids would ask its first
            # question as a follow-up of last run's last one (retrieved with it)
            run = secrets.token_hex(3)
            async with Client(db.url) as client:
                for text, session in QUESTIONS:
                    result = await client.ask(text, session_id=f"{session}-{run}", timeout=120)
                    print(f"\nQ ({session}-{run}): {text}", file=out)
                    print(textwrap.indent(format_result(result), "  "), file=out)
            for query in QUERIES:
                hits = await search(conn, worker.models, query, k=3, hybrid=settings.hybrid,
                                    text_weight=settings.hybrid_text_weight,
                                    text_max_rows=settings.hybrid_text_max_rows)
                print(f"\nsearch: {query!r} ({search_order(settings.hybrid)} order, cosine scores)", file=out)
                for h in hits:
                    snippet = textwrap.shorten(" ".join(h.text.split()), 110)
                    print(f"  {h.score:.3f}  {h.title}  [{h.source} #{h.ord}]\n         {snippet}", file=out)
            install = preset_not_installed(settings.sql_model_path)
            if sql and install:
                print(f"\na question about the data: skipped, the SQL model {settings.sql_model_path} is not "
                      f"installed: {install}", file=out)
            elif sql:
                await conn.execute(SHOP_SQL)
                print("\na question about the data (INSERT INTO pgsynapse.data_questions; table demo_shop.orders, "
                      f"model {settings.sql_model_path}):\n\nQ: {DATA_QUESTION}", file=out)
                data = await answer_data_question(settings, db.url, worker.models)
                print(textwrap.indent(format_data_result(data), "  "), file=out)
                check = await check_data_answer(conn, data)
                print(textwrap.indent(textwrap.fill(check, 110, break_on_hyphens=False), "  "), file=out)
        worker.request_stop()
    where = f"the embedded PostgreSQL in {settings.data_dir}" if settings.embedded else "the database of DATABASE_URL"
    print(f"\nnext: the pages stay in {where}. Ask your own questions, or add your own files:\n"
          '  pgsynapse ask "How do I ...?"           (or INSERT INTO pgsynapse.questions: README, "Asking questions")\n'
          "  pgsynapse ingest DIR && pgsynapse run   (the worker embeds what is inserted, then waits for more)",
          file=out)
    return 0
