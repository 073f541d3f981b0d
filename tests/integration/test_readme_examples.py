"""The Python examples of the README, run as they are written there, in order, in one namespace (as a reader
would paste them), against a real database and a running worker: an example that stops working fails here, not
in the application of someone who copied it. The text-to-SQL example needs an SQL model; its own tests cover
``Client.ask_data``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import anyio
import pytest

from pgsynapse.client import Result
from tests.helpers import aconn, fast_settings, insert_docs, running_worker, wait_until

pytestmark = pytest.mark.anyio

README = Path(__file__).resolve().parents[2] / "README.md"

DOCS = [
    ("5.4. Constraints", "The UNIQUE constraint ensures that the data contained in a column, or a group of columns, "
     "is unique among all the rows in the table. To make a column unique, add UNIQUE after its type in CREATE "
     "TABLE, or add a unique constraint later with ALTER TABLE ... ADD CONSTRAINT ... UNIQUE."),
    ("SAVEPOINT", "SAVEPOINT establishes a new savepoint within the current transaction. A savepoint is a special "
     "mark inside a transaction that allows all commands that are executed after it was established to be rolled "
     "back, restoring the transaction state to what it was at the time of the savepoint. Use ROLLBACK TO "
     "SAVEPOINT to roll back part of a transaction."),
]
VACUUM = "VACUUM reclaims storage occupied by dead tuples. Tuples that are deleted are not removed until a vacuum."


def examples() -> list[str]:
    """The README's ```python blocks, in order, but the text-to-SQL one."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return [b for b in blocks if "ask_data" not in b]


def test_the_readme_has_the_examples_this_test_runs():
    found = examples()
    assert len(found) == 4
    assert [("psycopg.connect" in b, "client.ask(" in b, "client.stream(" in b, "client.feedback(" in b)
            for b in found] == [(True, False, False, False), (False, True, False, False),
                                (False, True, True, False), (False, True, False, True)]


async def test_the_readme_python_examples_run_as_written(db_url, models):
    ids = insert_docs(db_url, DOCS)
    printed: list[str] = []

    def record(*args, sep=" ", end="\n", **_) -> None:  # what the examples print (the worker logs to stdout too)
        printed.append(sep.join(map(str, args)) + end)

    namespace: dict = {"url": db_url, "text": VACUUM, "print": record}
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url, kinds=("embed", "answer")), models):
        await wait_until(conn, "SELECT bool_and(status = 'embedded') FROM pgsynapse.documents WHERE id = ANY(%s)",
                         (ids,))
        for block in examples():
            code = compile(block, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            if code.co_flags & 0x80:  # CO_COROUTINE: the example awaits, as in an async application
                await eval(code, namespace)
            else:  # a blocking example (psycopg, waiting on notifies): its own thread, the worker goes on
                await anyio.to_thread.run_sync(exec, code, namespace)
    out = "".join(printed)
    assert out.splitlines()[0] == "embedded"  # the first example waited for its document's NOTIFY
    r = namespace["r"]
    assert isinstance(r, Result) and r.status == "answered" and "UNIQUE" in r.answer
    assert r.answer in out
    assert isinstance(namespace["result"], Result) and namespace["result"].status == "answered"
    try:
        rows = await (await conn.execute(
            "SELECT f.question_id, f.helpful, c.document_id, d.title FROM pgsynapse.feedback f"
            " JOIN pgsynapse.chunks c ON c.id = f.chunk_id JOIN pgsynapse.documents d ON d.id = c.document_id"
        )).fetchall()
        embedded = await (await conn.execute(
            "SELECT status FROM pgsynapse.documents WHERE id = %s", (namespace["doc_id"],))).fetchone()
    finally:
        await conn.close()
    assert embedded["status"] == "embedded"
    assert [(x["question_id"], x["helpful"], x["title"]) for x in rows] == [(r.id, True, "5.4. Constraints")]
