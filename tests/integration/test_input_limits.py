"""Oversized input is refused from its length, read in SQL, before its text is fetched: a body over
``max_document_chars``, a title over ``max_title_chars``, a question over ``max_question_chars``. The row gets
the clear error at once (one attempt) and its batch-mates are untouched."""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
import pytest
from psycopg.rows import dict_row

from pgsynapse.handlers.base import Job
from pgsynapse.handlers.embed import EmbedHandler
from pgsynapse.status import render, snapshot
from tests.helpers import aconn, fast_settings, insert_docs, pgsynapse, running_worker, wait_until

pytestmark = pytest.mark.anyio

ALL_DONE = "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'"
ALL_ANSWERED = "SELECT count(*) = 0 FROM pgsynapse.questions WHERE status = 'pending'"


def _job(kind: str, ref_id: int) -> Job:
    return Job(ref_id, kind, ref_id, {}, 1, datetime.now(timezone.utc))


async def test_oversized_body_is_refused_at_load_and_its_text_is_never_fetched(db_url, models):
    settings = fast_settings(db_url, max_document_chars=1000)
    big, fine = insert_docs(db_url, [("Big", "x " * 600), ("Fine", "Small and fine.")])
    handler = EmbedHandler(settings, models)
    conn = await aconn(db_url)
    work, known = await handler.load(conn, [_job("embed", big), _job("embed", fine)])
    await conn.close()
    # the oversized row never becomes work: its body stays in the database
    assert [w.job.ref_id for w in work] == [fine]
    assert [(o.job.ref_id, o.error, o.retry) for o in known] == [
        (big, "InputError: body has 1,200 characters, over max_document_chars=1,000", False)]


async def test_oversized_title_and_body_fail_at_once_beside_healthy_neighbours(db_url, models):
    settings = fast_settings(db_url, max_document_chars=1000, max_title_chars=100)
    conn = await aconn(db_url)
    async with running_worker(settings, models):
        # one statement: the bad rows share their batch with the good ones
        ids = insert_docs(db_url, [("Fine 1", "Healthy text about checkpoints."), ("T" * 150, "A short body."),
                                   ("Big", "x " * 600), ("Fine 2", "Healthy text about vacuum.")])
        await wait_until(conn, ALL_DONE)
    rows = await (await conn.execute(
        "SELECT d.status, d.error, j.attempts, j.status AS job_status FROM pgsynapse.documents d"
        " JOIN pgsynapse.jobs j ON j.kind = 'embed' AND j.ref_id = d.id WHERE d.id = ANY(%s) ORDER BY d.id",
        (ids,))).fetchall()
    await conn.close()
    assert rows[1] == {"status": "failed", "attempts": 1, "job_status": "failed",
                       "error": "InputError: title has 150 characters, over max_title_chars=100"}
    assert rows[2] == {"status": "failed", "attempts": 1, "job_status": "failed",
                       "error": "InputError: body has 1,200 characters, over max_document_chars=1,000"}
    assert [(r["status"], r["error"], r["attempts"]) for r in (rows[0], rows[3])] == [("embedded", None, 1)] * 2


async def test_oversized_question_fails_at_once_and_never_enters_its_sessions_history(db_url, models):
    settings = fast_settings(db_url, max_question_chars=200)
    long_text = "why " * 100
    conn = await aconn(db_url)
    async with running_worker(settings, models):
        # both turns in one statement: the long one is still pending when the follow-up is loaded
        cur = await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('s', %s),"
                                 " ('s', 'how do I create a unique index?') RETURNING id", (long_text,))
        long_q, follow = [r["id"] for r in await cur.fetchall()]
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
    rows = {r["id"]: r for r in await (await conn.execute(
        "SELECT q.id, q.status, q.error, q.retrieval_query, j.attempts FROM pgsynapse.questions q"
        " JOIN pgsynapse.jobs j ON j.kind = 'answer' AND j.ref_id = q.id")).fetchall()}
    await conn.close()
    assert (rows[long_q]["status"], rows[long_q]["attempts"]) == ("failed", 1)
    assert rows[long_q]["error"] == "InputError: question has 400 characters, over max_question_chars=200"
    assert rows[follow]["status"] == "answered"
    assert rows[follow]["retrieval_query"] == "how do I create a unique index?"


async def test_a_body_the_model_cannot_read_fails_at_once_and_a_dump_inside_a_page_is_left_out(db_url, models):
    # a hex dump is one unknown token to the model's tokenizer: alone it is nothing to embed; inside a page, in no
    # chunk (it was one chunk holding all of it)
    dump = "deadbeef" * 20_000
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url), models):
        ids = insert_docs(db_url, [("Dump", dump), ("Page", f"Bytea prints in hex. {dump} That was one value."),
                                   ("Fine", "Healthy text about vacuum.")])
        await wait_until(conn, ALL_DONE)
    rows = await (await conn.execute(
        "SELECT d.status, d.error, j.attempts, array(SELECT c.text FROM pgsynapse.chunks c WHERE c.document_id = d.id"
        " ORDER BY c.ord) AS chunks FROM pgsynapse.documents d JOIN pgsynapse.jobs j ON j.kind = 'embed'"
        " AND j.ref_id = d.id WHERE d.id = ANY(%s) ORDER BY d.id", (ids,))).fetchall()
    await conn.close()
    assert rows[0] == {"status": "failed", "attempts": 1, "chunks": [], "error": (
        "InputError: the body has no text the model reads: 1 run(s) of over 100 characters without a space or "
        "punctuation, each one unknown token to its tokenizer")}
    assert rows[1] == {"status": "embedded", "error": None, "attempts": 1,
                       "chunks": ["Bytea prints in hex.", "That was one value."]}
    assert rows[2]["status"] == "embedded"
    with psycopg.connect(db_url, row_factory=dict_row) as sync:  # `pgsynapse status` says why it failed
        shown = render(snapshot(sync))
    assert ("failed, why    : (the commonest errors; `pgsynapse retry-failed` puts the jobs back once fixed)\n"
            "                 embed     1      InputError: the body has no text the model reads: 1 run(s) of over 100"
            " characters without a ...") in shown


async def test_deleting_a_row_closes_its_failed_jobs_and_retry_failed_requeues_the_others(db_url, models):
    """Deleting a row that can never succeed is the natural fix; its failed job stayed failed, and `status` listed it
    ("embed 1 InputError: ...") until retry-failed closed it. The DELETE closes it (and a pending one is left to the
    worker, which finds its row gone); retry-failed requeues only the failed jobs of rows still there."""
    settings = fast_settings(db_url, max_document_chars=1000, max_question_chars=200)
    conn = await aconn(db_url)
    async with running_worker(settings, models):
        gone, kept = insert_docs(db_url, [("Big", "x " * 600), ("Bigger", "y " * 600)])
        cur = await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (%s) RETURNING id", ("why " * 60,))
        question = (await cur.fetchone())["id"]
        await wait_until(conn, ALL_DONE)
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
    await conn.execute("DELETE FROM pgsynapse.documents WHERE id = %s", (gone,))
    await conn.execute("DELETE FROM pgsynapse.questions WHERE id = %s", (question,))
    jobs = await (await conn.execute("SELECT kind, ref_id, status, skip_reason FROM pgsynapse.jobs ORDER BY id")).fetchall()
    assert jobs == [{"kind": "embed", "ref_id": gone, "status": "done", "skip_reason": "its row was deleted"},
                    {"kind": "embed", "ref_id": kept, "status": "failed", "skip_reason": None},
                    {"kind": "answer", "ref_id": question, "status": "done", "skip_reason": "its row was deleted"}]
    with psycopg.connect(db_url, row_factory=dict_row) as sync:  # only the row still there is listed as failed
        shown = render(snapshot(sync))
    [failed] = [line for line in shown.splitlines() if "InputError" in line]
    assert failed.split()[:2] == ["embed", "1"], shown
    # its row unchanged, it would fail again the same way: --skip-input-errors leaves it failed, and says so
    retried = pgsynapse("retry-failed", "--skip-input-errors", url=db_url)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout == ("left 1 failed job(s) that failed on their input (embed: 1), such as: InputError: body "
                              "has 1,200 characters, over max_document_chars=1,000\n"), retried.stdout
    jobs = await (await conn.execute("SELECT status FROM pgsynapse.jobs ORDER BY id")).fetchall()
    assert [j["status"] for j in jobs] == ["done", "failed", "done"]
    # requeued (after a limit is raised, say), it is said that it fails again unless its row or the limit changed:
    # it was requeued without a word
    retried = pgsynapse("retry-failed", url=db_url)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout == (
        "requeued embed: 1\n1 of them failed on their input, such as: InputError: body has 1,200 characters, over "
        "max_document_chars=1,000: they fail the same way again unless their row, or what the error names (a limit, "
        "a table), changed since (--skip-input-errors leaves them failed)\n"), retried.stdout
    jobs = await (await conn.execute("SELECT kind, ref_id, status, skip_reason FROM pgsynapse.jobs ORDER BY id")).fetchall()
    await conn.close()
    assert [j["status"] for j in jobs] == ["done", "pending", "done"]


async def test_truncating_a_table_closes_its_failed_jobs_as_a_delete_does(db_url, models):
    """A TRUNCATE fires no DELETE trigger: the failed jobs of the truncated rows stayed failed, and `status` listed
    them ("embed 1 InputError: ...") until retry-failed closed them. The TRUNCATE closes them (a cascade's tables
    too); a pending job is left to the worker, as after a DELETE."""
    settings = fast_settings(db_url, max_document_chars=1000, max_question_chars=200)
    conn = await aconn(db_url)
    async with running_worker(settings, models):
        insert_docs(db_url, [("Big", "x " * 600)])
        await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (%s)", ("why " * 60,))
        await wait_until(conn, ALL_DONE)
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
    insert_docs(db_url, [("Later", "Queued while no worker runs.")])
    await conn.execute("TRUNCATE pgsynapse.documents CASCADE")
    await conn.execute("TRUNCATE pgsynapse.questions CASCADE")
    jobs = await (await conn.execute("SELECT kind, status, skip_reason FROM pgsynapse.jobs ORDER BY id")).fetchall()
    await conn.close()
    assert jobs == [{"kind": "embed", "status": "done", "skip_reason": "its row was deleted"},
                    {"kind": "answer", "status": "done", "skip_reason": "its row was deleted"},
                    {"kind": "embed", "status": "pending", "skip_reason": None}]
    with psycopg.connect(db_url, row_factory=dict_row) as sync:
        shown = render(snapshot(sync))
    assert "InputError" not in shown, shown
    retried = pgsynapse("retry-failed", url=db_url)
    assert (retried.returncode, retried.stdout) == (0, "no failed jobs\n"), retried.stderr
