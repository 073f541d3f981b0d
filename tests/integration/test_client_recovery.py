"""The Python Client on a long-lived application's terms: lost connections (terminated backends stand in for a
PostgreSQL restart), a first streamed piece read from the row before its NOTIFY, timeouts that bound the INSERT,
statements never waiting behind a waiting ask, a deleted question, a Client entered twice, fetching an answer
later. No worker: the test answers the rows itself (UPDATE, then the worker's NOTIFY), so each step waits on rows
and NOTIFYs, never on time."""

from __future__ import annotations

import json

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgsynapse import client as client_module
from pgsynapse.client import AnswerTimeout, Client
from pgsynapse.config import Settings
from pgsynapse.errors import ConfigError, DatabaseError, InputError, PgsynapseError
from tests.helpers import aconn, wait_until, with_db

pytestmark = pytest.mark.anyio

SAFETY = 30.0  # seconds: a safety net only

# every backend of this database but the test's own: the Client's (no worker runs here)
TERMINATE = ("SELECT count(pg_terminate_backend(pid, 10000)) AS n FROM pg_stat_activity WHERE datname = "
             "current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'")


async def _answer(conn, qid: int, answer: str = "an answer", *, table: str = "questions") -> None:
    """What the worker does: the row answered, then its NOTIFY, in one transaction."""
    async with conn.transaction():
        if table == "questions":
            await conn.execute("UPDATE pgsynapse.questions SET status = 'answered', answer = %s WHERE id = %s",
                               (answer, qid))
            await conn.execute("SELECT pg_notify('pgsynapse_answers', %s)",
                               (json.dumps({"id": qid, "status": "answered"}),))
        else:
            await conn.execute("UPDATE pgsynapse.data_questions SET status = 'answered', sql = 'SELECT 1', "
                               "result = '{\"columns\": [], \"rows\": [[1]]}', row_count = 1 WHERE id = %s", (qid,))
            await conn.execute("SELECT pg_notify('pgsynapse_data_answers', %s)",
                               (json.dumps({"id": qid, "status": "answered"}),))


async def _asked(conn, n: int = 1, *, table: str = "questions") -> list[int]:
    """The ids of the first ``n`` questions, once their rows are there."""
    await wait_until(conn, f"SELECT count(*) >= %s FROM pgsynapse.{table}", (n,), channel="pgsynapse_jobs")
    rows = await (await conn.execute(f"SELECT id FROM pgsynapse.{table} ORDER BY id LIMIT %s", (n,))).fetchall()
    return [r["id"] for r in rows]


def _waiting_for_a_notify(client: Client) -> anyio.Event:
    """Set once a call on ``client`` waits for a NOTIFY (its row read, the answer still to come). It replaces
    anyio.wait_all_tasks_blocked, which flaked under load: psycopg's wait for a NOTIFY wakes every 0.1 s, and
    anyio's check of every task, every 0.1 s too, could find that task awake each time until the safety net."""
    waiting, wait_one = anyio.Event(), client._wait_one

    async def wait_one_signalled(key: tuple[str, int]) -> bool:
        waiting.set()
        return await wait_one(key)

    client._wait_one = wait_one_signalled  # type: ignore[method-assign]
    return waiting


async def _collect(results: list, call) -> None:
    results.append(await call)


async def _ask_answered(conn, client: Client, text: str) -> list:
    """``client.ask(text)`` while this test answers the question once its row is there: the asks' results."""
    results: list = []
    with anyio.fail_after(SAFETY):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: _collect(results, client.ask(text)))
            (qid,) = await _asked(conn)
            await _answer(conn, qid)
    return results


async def test_an_idle_client_connects_again_after_its_connections_are_lost(db_url):
    conn = await aconn(db_url)
    async with Client(db_url) as client:
        client.recheck_seconds = 3600  # only an announcement (or a reconnection) wakes an ask
        assert (await (await conn.execute(TERMINATE)).fetchone())["n"] >= 1  # its statements and its LISTEN
        results = await _ask_answered(conn, client, "how do I create an index?")
    await conn.close()
    assert [(r.status, r.answer) for r in results] == [("answered", "an answer")]


async def test_an_ask_in_flight_survives_its_connections_lost_and_reads_the_answer_written_meanwhile(db_url):
    conn = await aconn(db_url)
    results = []
    async with Client(db_url) as client:
        client.recheck_seconds = 3600
        waiting = _waiting_for_a_notify(client)
        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _collect(results, client.ask("how do I create an index?")))
                (qid,) = await _asked(conn)
                await waiting.wait()  # the ask waits for its NOTIFY
                assert (await (await conn.execute(TERMINATE)).fetchone())["n"] >= 1
                await _answer(conn, qid)  # its NOTIFY may reach no LISTEN: the row is read again
    await conn.close()
    assert [(r.id, r.status) for r in results] == [(qid, "answered")]


async def test_an_insert_whose_connection_is_lost_is_not_sent_again_and_says_so(db_url):
    conn, locker = await aconn(db_url), await aconn(db_url)
    async with Client(db_url) as client:
        await locker.execute("BEGIN")
        await locker.execute("LOCK TABLE pgsynapse.questions IN SHARE MODE")  # the INSERT waits on it
        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                async def ask() -> None:
                    with pytest.raises(client_module.OutcomeUnknown, match="may or may not have been saved"):
                        await client.ask("how do I create an index?")
                tg.start_soon(ask)
                await wait_until(conn, "SELECT count(*) = 1 FROM pg_stat_activity WHERE datname = current_database()"
                                 " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO pgsynapse.questions%%'")
                await conn.execute(TERMINATE.replace("'client backend'", "'client backend' AND pid <> %s"),
                                   (locker.info.backend_pid,))
        await locker.execute("ROLLBACK")
        # the next call connects again
        results = await _ask_answered(conn, client, "what does VACUUM do?")
    await conn.close()
    await locker.close()
    assert [r.status for r in results] == ["answered"]


async def test_a_first_piece_read_from_the_row_before_its_notify_is_not_taken_for_a_restart(db_url):
    """The first piece is committed with the question (a trigger stands in for a worker that wrote it before the
    Client's first read): the read yields it, then its seq 1 NOTIFY arrives, a piece already received."""
    conn = await aconn(db_url)
    await conn.execute("""
        CREATE FUNCTION public.first_piece() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.answer := 'Use';
            PERFORM pg_notify('pgsynapse_answers', json_build_object('id', NEW.id, 'status', 'streaming', 'seq', 1,
                                                                     'offset', 0, 'delta', 'Use')::text);
            RETURN NEW;
        END $$;
        CREATE TRIGGER first_piece BEFORE INSERT ON pgsynapse.questions FOR EACH ROW EXECUTE FUNCTION public.first_piece();
    """)

    async def piece(qid: int, seq: int, text: str, delta: str) -> None:
        async with conn.transaction():
            await conn.execute("UPDATE pgsynapse.questions SET answer = %s WHERE id = %s", (text, qid))
            await conn.execute("SELECT pg_notify('pgsynapse_answers', %s)", (json.dumps(
                {"id": qid, "status": "streaming", "seq": seq, "offset": len(text) - len(delta), "delta": delta}),))

    items = []
    async with Client(db_url) as client:
        client.recheck_seconds = 3600
        with anyio.fail_after(SAFETY):
            async for item in client.stream("how do I roll back part of a transaction?"):
                items.append(item)
                (qid,) = await _asked(conn)
                if item == "Use":
                    await piece(qid, 2, "Use ROLLBACK", " ROLLBACK")
                elif item == " ROLLBACK":
                    await piece(qid, 3, "Use ROLLBACK TO", " TO")
                elif item == " TO":
                    await _answer(conn, qid, "Use ROLLBACK TO SAVEPOINT.")
    await conn.close()
    assert items[:-1] == ["Use", " ROLLBACK", " TO", " SAVEPOINT."]
    assert items[-1].answer == "Use ROLLBACK TO SAVEPOINT."


async def test_a_waiting_ask_never_holds_up_another_tasks_statements(db_url):
    conn = await aconn(db_url)
    results = []
    async with Client(db_url) as client:
        client.recheck_seconds = 3600  # the first ask waits an hour for a NOTIFY
        waiting = _waiting_for_a_notify(client)
        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _collect(results, client.ask("how do I create an index?")))
                (first,) = await _asked(conn)
                await waiting.wait()  # it waits for its NOTIFY
                answered = anyio.Event()

                async def second_ask() -> None:
                    results.append(await client.ask("what does VACUUM do?"))
                    answered.set()
                tg.start_soon(second_ask)
                _, second = await _asked(conn, 2)  # inserted while the first waits
                await _answer(conn, second, "second")
                await answered.wait()  # read while the first waits
                assert [r.id for r in results] == [second]
                fb = await client.feedback(second, helpful=True)  # neither does a statement wait
                assert fb.question_id == second
                await _answer(conn, first, "first")
    await conn.close()
    assert [r.answer for r in results] == ["second", "first"]


async def test_a_timeout_bounds_the_insert_and_cancels_it(db_url):
    conn, locker = await aconn(db_url), await aconn(db_url)
    async with Client(db_url) as client:
        await locker.execute("BEGIN")
        await locker.execute("LOCK TABLE pgsynapse.questions, pgsynapse.data_questions IN SHARE MODE")  # an index built
        with anyio.fail_after(SAFETY), pytest.raises(AnswerTimeout, match="was not asked") as raised:
            await client.ask("how do I create an index?", timeout=0.5)
        assert raised.value.question_id is None
        with anyio.fail_after(SAFETY), pytest.raises(AnswerTimeout, match="was not asked"):
            await client.ask_data("how many orders?", timeout=0.5)
        await locker.execute("ROLLBACK")
        for table in ("questions", "data_questions"):  # cancelled, not inserted once the lock went
            assert (await (await conn.execute(f"SELECT count(*) AS n FROM pgsynapse.{table}")).fetchone())["n"] == 0
        qid = (await (await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('what is VACUUM?') "
                                         "RETURNING id")).fetchone())["id"]
        await _answer(conn, qid)
        await locker.execute("BEGIN")
        await locker.execute("LOCK TABLE pgsynapse.feedback IN SHARE MODE")
        with anyio.fail_after(SAFETY), pytest.raises(client_module.ClientTimeout, match="was not written"):
            await client.feedback(qid, helpful=True, timeout=0.5)
        await locker.execute("ROLLBACK")
        assert (await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.feedback")).fetchone())["n"] == 0
        # no lock: a timeout too short to write anything says so (it blamed "a lock on pgsynapse.feedback?")
        with anyio.fail_after(SAFETY), pytest.raises(client_module.ClientTimeout) as raised:
            await client.feedback(qid, helpful=True, timeout=0.001)
        assert str(raised.value).startswith(f"the feedback on question {qid} was not written within 0.001s: the "
                                            "timeout was too short to even insert it ("), raised.value
        assert "give a longer timeout" in str(raised.value) and "lock" not in str(raised.value), raised.value
        assert (await client.feedback(qid, helpful=True)).question_id == qid  # the same connection, still usable
    await conn.close()
    await locker.close()


async def test_a_question_deleted_while_its_asker_waits_says_so(db_url):
    conn = await aconn(db_url)
    async with Client(db_url) as client:
        client.recheck_seconds = 3600
        for method, table, channel in (("ask", "questions", "pgsynapse_answers"),
                                       ("ask_data", "data_questions", "pgsynapse_data_answers")):
            with anyio.fail_after(SAFETY):
                async with anyio.create_task_group() as tg:
                    async def ask() -> None:
                        with pytest.raises(PgsynapseError, match="was deleted while waiting for its answer"):
                            await getattr(client, method)("how many orders?")
                    tg.start_soon(ask)
                    (qid,) = await _asked(conn, table=table)
                    async with conn.transaction():
                        await conn.execute(f"DELETE FROM pgsynapse.{table} WHERE id = %s", (qid,))
                        await conn.execute("SELECT pg_notify(%s, %s)", (channel, json.dumps({"id": qid})))
    await conn.close()


async def test_a_client_entered_again_listens_again_and_refuses_calls_when_closed(db_url):
    conn = await aconn(db_url)
    client = Client(db_url)
    async with client:
        pass
    with pytest.raises(PgsynapseError, match="use `async with Client"):
        await client.ask("how do I create an index?")
    results = []
    async with client:
        client.recheck_seconds = 3600  # only the data answer's NOTIFY wakes it
        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _collect(results, client.ask_data("how many orders?")))
                (qid,) = await _asked(conn, table="data_questions")
                await _answer(conn, qid, table="data_questions")
    await conn.close()
    assert [(r.status, r.rows) for r in results] == [("answered", [[1]])]


async def test_an_answer_that_came_after_the_timeout_is_fetched_by_its_question_id(db_url):
    conn = await aconn(db_url)
    async with Client(db_url) as client:
        with anyio.fail_after(SAFETY), pytest.raises(InputError, match="timeout=0"):
            await client.ask("how do I create an index?", timeout=0)
        with anyio.fail_after(SAFETY), pytest.raises(AnswerTimeout, match="no running worker takes") as raised:
            await client.ask("how do I create an index?", timeout=0.2)
        qid = raised.value.question_id
        assert (await client.result(qid, timeout=0)).status == "pending"  # no waiting
        results = []
        waiting = _waiting_for_a_notify(client)
        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _collect(results, client.result(qid, timeout=None)))
                await waiting.wait()  # it read the row, still pending, and waits for its NOTIFY
                await _answer(conn, qid)
    await conn.close()
    assert [(r.id, r.status, r.answer) for r in results] == [(qid, "answered", "an answer")]


async def test_the_client_uses_the_keepalive_settings_the_worker_honours(db_url, monkeypatch):
    # the Client connected with the settings' defaults whatever PGSYNAPSE_KEEPALIVES_* said: an application beside a
    # worker tuned for its network noticed a cut one later (or sooner) than the worker
    for name, value in (("KEEPALIVES_IDLE_SECONDS", "7"), ("KEEPALIVES_INTERVAL_SECONDS", "2"),
                        ("KEEPALIVES_COUNT", "4"), ("TCP_USER_TIMEOUT_MS", "9000")):
        monkeypatch.setenv(f"PGSYNAPSE_{name}", value)

    def tcp(conn) -> tuple[str, ...]:
        p = conn.info.get_parameters()
        return tuple(p.get(k) for k in ("keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
                                        "tcp_user_timeout"))

    async with Client(db_url) as client:
        assert tcp(client._conn) == tcp(client._listen) == ("1", "7", "2", "4", "9000")
    # the settings given (the CLI's, config file included) win over the environment, and the URL over both
    settings = Settings(keepalives_idle_seconds=11, keepalives_count=5)
    async with Client(db_url, settings=settings) as client:
        assert tcp(client._conn) == ("1", "11", "5", "5", "30000")
    async with Client(make_conninfo(db_url, keepalives_idle=3), settings=settings) as client:
        assert tcp(client._conn)[1] == "3"
    monkeypatch.setenv("PGSYNAPSE_KEEPALIVES_COUNT", "0")
    with pytest.raises(ConfigError, match=r"keepalives_count \[PGSYNAPSE_KEEPALIVES_COUNT\]: .*greater than or equal"):
        Client(db_url)


async def test_a_call_while_postgresql_refuses_connections_ends_in_its_timeout_and_says_why(db_url):
    # with its connections lost and none to be had, result(timeout=0) ("no waiting") waited for ever, and a timed call
    # ran past its timeout (by WRITE_GRACE) to blame a lock ("its INSERT waited (a lock ...?)") or a slow worker
    conn = await aconn(db_url)
    qid = (await (await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('what is VACUUM?') "
                                     "RETURNING id")).fetchone())["id"]
    admin = await aconn(with_db(db_url, "postgres"))  # a database's own sessions may not close it
    dbname = conn.info.dbname
    refused = r"cannot connect to PostgreSQL: .*not currently accepting connections"
    async with Client(db_url) as client:
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')  # a server restarting, say
        try:
            assert (await (await conn.execute(TERMINATE)).fetchone())["n"] >= 1
            for get in (client.result, client.data_result):
                with anyio.fail_after(SAFETY), pytest.raises(DatabaseError, match=refused):
                    await get(qid, timeout=0)
            calls = (("ask", lambda: client.ask("how do I create an index?", timeout=1), None,
                      r"the question was not asked within 1s: "),
                     ("ask_data", lambda: client.ask_data("how many orders?", timeout=1), None,
                      r"the data question was not asked within 1s: "),
                     ("result", lambda: client.result(qid, timeout=1), qid,
                      rf"no answer to question {qid} within 1s: "),
                     ("feedback", lambda: client.feedback(qid, helpful=True, timeout=1), None,
                      rf"the feedback on question {qid} was not written within 1s: "))
            for name, call, question_id, says in calls:
                started = anyio.current_time()
                with (anyio.fail_after(SAFETY),
                      pytest.raises(client_module.ClientTimeout, match=says + refused) as raised):
                    await call()
                assert getattr(raised.value, "question_id", None) == question_id, name
                assert anyio.current_time() - started < client_module.WRITE_GRACE, name  # not the INSERT's grace too
        finally:
            await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        assert (await client.result(qid, timeout=0)).status == "pending"  # connected again
    await conn.close()
    await admin.close()


async def test_a_timeout_says_when_no_running_worker_takes_the_question(db_url):
    # it said "the worker may be slower than that ..., or none is running (`pgsynapse run`)" whether a worker ran or
    # not, and so beside a worker that never takes the kind (PGSYNAPSE_KINDS=embed): the asker could not tell which
    conn = await aconn(db_url)
    none_takes = r"no running worker takes {} jobs on this database"
    async with Client(db_url) as client:
        with anyio.fail_after(SAFETY), pytest.raises(AnswerTimeout, match=none_takes.format("answer")) as raised:
            await client.ask("how do I create an index?", timeout=0.2)
        qid = raised.value.question_id
        assert "`await client.result(" in str(raised.value)  # it is answered once one runs
        with anyio.fail_after(SAFETY), pytest.raises(AnswerTimeout, match=none_takes.format("sql_answer")):
            await client.ask_data("how many orders?", timeout=0.2)
        # a worker listening (its LISTEN connection) and registered with other kinds only
        listener = await psycopg.AsyncConnection.connect(db_url, autocommit=True,
                                                         application_name="pgsynapse-listener")
        await conn.execute("INSERT INTO pgsynapse.workers (worker_id, host, pid, kinds) VALUES ('w1', 'h', 1, '{embed}')")
        with anyio.fail_after(SAFETY), pytest.raises(AnswerTimeout, match=none_takes.format("answer")):
            await client.result(qid, timeout=0.2)
        await conn.execute("UPDATE pgsynapse.workers SET kinds = '{embed,answer}'")  # one that takes it: just slower
        with anyio.fail_after(SAFETY), pytest.raises(AnswerTimeout, match="the worker may be slower than that"):
            await client.result(qid, timeout=0.2)
    await listener.close()
    await conn.close()


async def test_an_async_on_delta_is_awaited_for_each_piece(db_url):
    # an `async def` on_delta (a websocket's send) was called and its coroutine dropped: "coroutine ... was never
    # awaited", no piece delivered
    conn = await aconn(db_url)
    pieces, got = [], anyio.Event()

    async def on_delta(piece: str) -> None:
        await anyio.sleep(0)  # an awaiting callback
        pieces.append(piece)
        got.set()

    results = []
    async with Client(db_url) as client:
        client.recheck_seconds = 3600
        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: _collect(results, client.ask("how do I roll back?", on_delta=on_delta)))
                (qid,) = await _asked(conn)
                async with conn.transaction():
                    await conn.execute("UPDATE pgsynapse.questions SET answer = 'Use' WHERE id = %s", (qid,))
                    await conn.execute("SELECT pg_notify('pgsynapse_answers', %s)", (json.dumps(
                        {"id": qid, "status": "streaming", "seq": 1, "offset": 0, "delta": "Use"}),))
                await got.wait()
                await _answer(conn, qid, "Use ROLLBACK TO SAVEPOINT.")
    await conn.close()
    assert pieces == ["Use", " ROLLBACK TO SAVEPOINT."]
    assert [r.answer for r in results] == ["Use ROLLBACK TO SAVEPOINT."]
