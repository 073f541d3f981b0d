"""What an application may pass the Client by mistake: each refused with an InputError that says what is wrong,
before any row is written (a bytes question was stored as its hex text and answered; an int, a NUL or a lone
surrogate raised Python's or psycopg's own errors), an id that was never asked, a database not migrated."""

from __future__ import annotations

import hashlib

import anyio
import pytest

from pgsynapse.client import AnswerTimeout, Client, UnknownQuestion
from pgsynapse.errors import DatabaseError, InputError
from tests.helpers import aconn

pytestmark = pytest.mark.anyio

SAFETY = 30.0  # seconds: a safety net only


@pytest.mark.parametrize(("text", "says"), [
    (b"how do I vacuum", r"the question must be text \(str\), not bytes: decode it first"),
    (42, r"the question must be text \(str\), not int"),
    ("how do I\x00 vacuum", r"the question holds a NUL character \(\\x00, at 8\): PostgreSQL text cannot store it"),
    ("x \ud800", r"the question is not valid Unicode: a lone surrogate \(\\ud800, at 2\)"),
])
async def test_a_question_that_is_not_text_is_refused_before_its_row(db_url, text, says):
    conn = await aconn(db_url)
    async with Client(db_url) as client:
        for ask in (client.ask, client.ask_data):
            with anyio.fail_after(SAFETY), pytest.raises(InputError, match=says):
                await ask(text, timeout=1)
    for table in ("questions", "data_questions"):
        assert (await (await conn.execute(f"SELECT count(*) AS n FROM pgsynapse.{table}")).fetchone())["n"] == 0
    await conn.close()


@pytest.mark.parametrize(("session", "says"), [
    (5, r"session_id must be text \(str\) or None, not int"),  # it was stored as '5'
    (b"alice", r"session_id must be text \(str\) or None, not bytes"),  # stored as '\\x616c696365'
    ("ali\x00ce", r"session_id holds a NUL character \(\\x00, at 3\): PostgreSQL text cannot store it"),
    # 3,200 characters that do not compress: "index row size 3224 exceeds btree version 4 maximum 2704 for index
    # questions_session", exit 69 (the database unreachable) from `pgsynapse ask --session`
    ("".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(50)),
     r"session_id is 3,200 bytes long \(UTF-8\): at most 1,000; a session id names a conversation"),
])
async def test_a_session_id_that_is_not_text_is_refused_before_its_row(db_url, session, says):
    conn = await aconn(db_url)
    async with Client(db_url) as client:
        for ask in (client.ask, client.ask_data):
            with anyio.fail_after(SAFETY), pytest.raises(InputError, match=says):
                await ask("how do I vacuum?", session_id=session, timeout=1)
    for table in ("questions", "data_questions"):
        assert (await (await conn.execute(f"SELECT count(*) AS n FROM pgsynapse.{table}")).fetchone())["n"] == 0
    await conn.close()


@pytest.mark.parametrize(("target", "says"), [
    # psycopg's InvalidTextRepresentation: 'malformed array literal: "orders"' (a str, a tuple)
    ({"tables": "orders"}, r"tables must be a list of table names, not str: tables=\['orders'\]"),
    ({"tables": ["orders", 3]}, r"tables\[1\] must be a table name \(str\), not int"),
    ({"tables": ["orders", " "]}, r"tables\[1\] is empty: name a table"),
    ({"schema": None}, r"schema must be a schema name \(str\), not NoneType"),  # NotNullViolation
    ({"schema": 5}, r"schema must be a schema name \(str\), not int"),  # stored as '5'
    ({"schema": ""}, r"schema is empty: name the schema of the tables"),
])
async def test_a_data_question_target_that_is_not_names_is_refused_before_its_row(db_url, target, says):
    conn = await aconn(db_url)
    async with Client(db_url) as client:
        with anyio.fail_after(SAFETY), pytest.raises(InputError, match=says):
            await client.ask_data("how many orders?", timeout=1, **target)
    assert (await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.data_questions")).fetchone())["n"] == 0
    await conn.close()


async def test_a_tuple_of_tables_is_asked_as_a_list(db_url):
    conn = await aconn(db_url)
    async with Client(db_url) as client:
        with anyio.fail_after(SAFETY), pytest.raises(AnswerTimeout):  # no worker: the row is what this looks at
            await client.ask_data("how many orders?", schema="shop", tables=("orders", "regions"), timeout=0.2)
    row = await (await conn.execute("SELECT target_schema, allowed_tables FROM pgsynapse.data_questions")).fetchone()
    assert (row["target_schema"], row["allowed_tables"]) == ("shop", ["orders", "regions"])
    await conn.close()


async def test_a_question_id_that_is_not_an_int_is_refused(db_url):
    # "x" raised psycopg's InvalidTextRepresentation ('invalid input syntax for type bigint: "x"')
    async with Client(db_url) as client:
        not_an_int = r"question_id must be an int, not (str|bool)"
        for call in (lambda: client.result("x", timeout=0), lambda: client.data_result("x", timeout=1),
                     lambda: client.feedback("x", helpful=True), lambda: client.result(True, timeout=0)):
            with anyio.fail_after(SAFETY), pytest.raises(InputError, match=not_an_int):
                await call()


async def test_a_timeout_that_is_not_a_number_is_refused(db_url):
    async with Client(db_url) as client:
        for timeout in ("5", True):
            with anyio.fail_after(SAFETY), pytest.raises(InputError, match=r"timeout=.*: give a number of seconds"):
                await client.ask("how do I vacuum?", timeout=timeout)


async def test_an_id_never_asked_is_not_said_to_be_deleted(db_url):
    async with Client(db_url) as client:
        for get, what in ((client.result, "question"), (client.data_result, "data question")):
            for timeout in (0, 1):
                with anyio.fail_after(SAFETY), pytest.raises(UnknownQuestion, match=f"there is no {what} 999999"):
                    await get(999999, timeout=timeout)


async def test_a_database_not_migrated_says_to_migrate(new_db):
    url = new_db()  # empty: no pgsynapse schema
    async with Client(url) as client:
        with anyio.fail_after(SAFETY), pytest.raises(DatabaseError, match="run `pgsynapse migrate`"):
            await client.ask("how do I vacuum?", timeout=1)
