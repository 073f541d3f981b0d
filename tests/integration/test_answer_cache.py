"""The semantic answer cache: a paraphrase is answered from the earlier answer, marked with its id; what must not be
served from it is not; an edit or delete of a cited document invalidates it. Real worker, Postgres, model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import anyio
import psycopg
import pytest
from pgvector.psycopg import register_vector_async
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.client import Client, format_result
from pgsynapse.handlers.answer import AnswerHandler
from pgsynapse.handlers.base import Job
from pgsynapse.listener.housekeeping import cleanup_caches
from pgsynapse.metrics import ANSWER_CACHE
from pgsynapse.status import render, snapshot, status_snapshot
from tests.helpers import V1_TORCH, aconn, fast_settings, running_worker, wait_until
from tests.integration.test_answers import _corpus

pytestmark = pytest.mark.anyio

DOCS = [
    ("Savepoints", "SAVEPOINT establishes a new savepoint within the current transaction. A savepoint is a special "
                   "mark inside a transaction that allows all commands executed after it to be rolled back. "
                   "ROLLBACK TO SAVEPOINT undoes the commands since the savepoint. RELEASE SAVEPOINT destroys it."),
    ("Vacuum", "VACUUM reclaims storage occupied by dead tuples. Deleted or obsoleted rows are not physically "
               "removed until a VACUUM is done. Run VACUUM periodically on frequently updated tables."),
    ("Creating indexes", "CREATE INDEX constructs an index on the specified column of a table. Indexes are primarily "
                         "used to enhance database performance. A unique index rejects duplicate values."),
]
ASK = "How do I roll back to a savepoint inside a transaction?"
PARAPHRASE = "how can I roll back to a savepoint in a transaction"
ROW = "SELECT id, answer, sources, answerer, cached_from FROM pgsynapse.questions WHERE id = %s"


async def _setup(url: str) -> list[int]:
    return await _corpus(url, DOCS)


async def _row(conn, qid: int) -> dict:
    return await (await conn.execute(ROW, (qid,))).fetchone()


def _settings(url: str, **kw):
    return fast_settings(url, answer_cache=True, answer_cache_threshold=0.9, **kw)


async def test_a_paraphrase_is_answered_from_the_earlier_answer_marked_with_its_id(db_url, models):
    hits_before = ANSWER_CACHE.labels("1", "hit")._value.get()
    async with running_worker(_settings(db_url), models):
        ids = await _setup(db_url)
        conn = await aconn(db_url)
        async with Client(db_url) as client:
            first = await client.ask(ASK)
            with capture_logs() as logs:
                again = await client.ask(PARAPHRASE)
            other = await client.ask("how do I reclaim the storage of dead tuples?")
        a, b, c = await _row(conn, first.id), await _row(conn, again.id), await _row(conn, other.id)
        entry = await (await conn.execute(
            "SELECT f.hit_count, f.question, c.document_ids FROM pgsynapse.frequent_questions f"
            " JOIN pgsynapse.answer_cache c USING (question_id) WHERE question_id = %s",
            (first.id,))).fetchone()
        await conn.close()
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
            snap = snapshot(sync)
    assert first.sources[0]["document_id"] == ids[0] and a["answerer"] == "extractive" and a["cached_from"] is None
    assert b["answerer"] == "cache" and b["cached_from"] == first.id == again.cached_from
    # it read "from the answer cache (question 1) (question 3)": which question is which
    assert (f"from the answer cache (the answer of question {first.id}) (question {again.id})" in format_result(again)
            and first.cached_from is None)
    assert b["answer"] == a["answer"] and b["sources"] == a["sources"] and again.status == "answered"
    assert entry["hit_count"] == 1 and entry["question"] == ASK and ids[0] in entry["document_ids"]
    [hit] = [e for e in logs if e["event"] == "answer_cache_hit"]
    assert hit["question"] == again.id and hit["cached_from"] == first.id and 0.9 <= hit["similarity"] <= 1
    assert ANSWER_CACHE.labels("1", "hit")._value.get() == hits_before + 1
    # `pgsynapse status` counts the questions and those the cache answered
    assert snap["questions"] == {"pending": 0, "answered": 3, "blocked": 0, "failed": 0, "cached": 1}
    assert "questions      : 3 (0 pending, 3 answered, 0 blocked, 0 failed), 1 from the answer cache" in render(snap)
    # a dissimilar question is answered afresh, from its own document
    assert c["answerer"] == "extractive" and c["cached_from"] is None and other.sources[0]["document_id"] == ids[1]


CASTS = ("Type casts", "A type cast converts a value of one data type to another. Text is cast to integer with "
                     "CAST(x AS integer) or x::integer. An integer is cast to text with x::text.")


@pytest.mark.parametrize(("asked", "turned", "paraphrase"), [
    # a negation
    ("Which tables should I run VACUUM on?", "Which tables should I not run VACUUM on?",
     "which tables should I run vacuum on"),
    # what "to" marks, swapped: a bag of the same words
    ("How do I cast text to integer?", "How do I cast integer to text?", "how can I cast text to an integer"),
], ids=["negation", "swapped-roles"])
async def test_a_question_that_asks_the_opposite_or_the_reverse_is_not_served_the_answer_it_looks_like(
        db_url, models, asked, turned, paraphrase):
    vecs = models.get(V1_TORCH).encode([asked, turned])
    assert float(vecs[0] @ vecs[1]) >= 0.95  # similar enough to be served: only the words' roles tell them apart
    async with running_worker(_settings(db_url), models):
        await _corpus(db_url, [*DOCS, CASTS])
        conn = await aconn(db_url)
        async with Client(db_url) as client:
            answers = [await client.ask(text) for text in (asked, turned, paraphrase)]
        rows = [await _row(conn, a.id) for a in answers]
        await conn.close()
    assert [r["answerer"] for r in rows] == ["extractive", "extractive", "cache"], rows
    assert rows[1]["cached_from"] is None and rows[2]["cached_from"] == answers[0].id  # the paraphrase is served


async def test_flagged_questions_and_follow_ups_with_history_are_neither_served_nor_stored(db_url, models):
    async with running_worker(_settings(db_url), models):
        await _setup(db_url)
        conn = await aconn(db_url)
        async with Client(db_url) as client:
            first = await client.ask(ASK, session_id="alice")  # a session's first turn has no history: cacheable
            follow = await client.ask(PARAPHRASE, session_id="alice")  # same words, but a follow-up with history
            await conn.execute("INSERT INTO pgsynapse.guardrail_rules (text, action, threshold)"
                               " VALUES ('roll back to a savepoint', 'flag', 0.5)")
            flagged = await client.ask(PARAPHRASE)  # another guardrail outcome (and rules): answered afresh
            flagged_again = await client.ask(PARAPHRASE)  # the flagged answer was not stored either
        rows = [await _row(conn, q.id) for q in (first, follow, flagged, flagged_again)]
        entries = [r["question_id"] for r in await (await conn.execute(
            "SELECT question_id FROM pgsynapse.answer_cache ORDER BY 1")).fetchall()]
        await conn.close()
    assert [r["answerer"] for r in rows] == ["extractive"] * 4
    assert [r["cached_from"] for r in rows] == [None] * 4
    assert flagged.guardrail["action"] == "flag" and flagged_again.guardrail["action"] == "flag"
    assert entries == [first.id]


async def test_another_answerer_setting_does_not_serve_the_entry(db_url, models):
    async with running_worker(_settings(db_url), models):
        await _setup(db_url)
        async with Client(db_url) as client:
            first = await client.ask(ASK)
    async with running_worker(_settings(db_url, answer_top_k=2), models):
        async with Client(db_url) as client:
            other = await client.ask(ASK)
            same = await client.ask(PARAPHRASE)
        conn = await aconn(db_url)
        rows = [await _row(conn, q.id) for q in (other, same)]
        await conn.close()
    assert rows[0]["answerer"] == "extractive" and rows[0]["cached_from"] is None
    # the second question hits the entry written under top_k=2, never the first one's
    assert rows[1]["answerer"] == "cache" and rows[1]["cached_from"] == other.id != first.id


@pytest.mark.parametrize("change", ["update", "delete"])
async def test_a_change_to_a_cited_document_invalidates_its_entries(db_url, models, change):
    async with running_worker(_settings(db_url), models):
        ids = await _setup(db_url)
        conn = await aconn(db_url)
        async with Client(db_url) as client:
            first = await client.ask(ASK)
            assert (await _row(conn, (await client.ask(PARAPHRASE)).id))["cached_from"] == first.id
            if change == "update":
                await conn.execute("UPDATE pgsynapse.documents SET body = body || ' SAVEPOINT names may be reused.'"
                                   " WHERE id = %s", (ids[0],))
            else:
                await conn.execute("DELETE FROM pgsynapse.documents WHERE id = %s", (ids[0],))
            # the trigger removed the entry in the same statement
            left = await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.answer_cache")).fetchone()
            assert left["n"] == 0
            await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'")
            fresh = await client.ask(PARAPHRASE)
        row = await _row(conn, fresh.id)
        await conn.close()
    assert row["answerer"] == "extractive" and row["cached_from"] is None
    if change == "update":
        assert "names may be reused" in " ".join(s["passage"] for s in row["sources"])
    else:
        assert ids[0] not in {s["document_id"] for s in row["sources"]}


async def test_an_entry_whose_document_changed_unseen_is_not_served(db_url, models):
    """The lookup's own check: an entry written from content that has changed since (its trigger ran before the
    entry was committed) holds another content_hash than the document, and is never served."""
    async with running_worker(_settings(db_url), models):
        await _setup(db_url)
        conn = await aconn(db_url)
        async with Client(db_url) as client:
            first = await client.ask(ASK)
            await conn.execute("UPDATE pgsynapse.answer_cache SET document_hashes ="
                               " array_fill('0'::text, ARRAY[cardinality(document_ids)]) WHERE question_id = %s",
                               (first.id,))
            fresh = await client.ask(PARAPHRASE)
        row = await _row(conn, fresh.id)
        await conn.close()
    assert row["answerer"] == "extractive" and row["cached_from"] is None


async def test_an_entry_past_its_max_age_is_not_served_and_the_housekeeping_deletes_it(db_url, models):
    async with running_worker(_settings(db_url), models) as worker:
        await _setup(db_url)
        conn = await aconn(db_url)
        async with Client(db_url) as client:
            first = await client.ask(ASK)
            await conn.execute("UPDATE pgsynapse.answer_cache SET created_at = now() - interval '8 days'"
                               " WHERE question_id = %s", (first.id,))
            again = await client.ask(PARAPHRASE)  # a week is the default max age: answered afresh
        with capture_logs() as logs:
            await cleanup_caches(worker.pool, worker.settings)
        left = [r["question_id"] for r in await (await conn.execute(
            "SELECT question_id FROM pgsynapse.answer_cache ORDER BY question_id")).fetchall()]
        await conn.close()
    assert worker.settings.answer_cache_max_age_seconds == 7 * 86400
    assert again.status == "answered" and again.cached_from is None
    assert left == [again.id]  # the old entry deleted, the fresh answer of the paraphrase kept
    assert [e["removed"] for e in logs if e["event"] == "answer_cache_expired"] == [1]


async def test_a_question_edited_into_a_paraphrase_of_itself_is_answered_afresh_not_from_its_own_entry(db_url, models):
    """A typo fixed: the edited question was looked up while its own entry was still there, and served its old answer,
    answerer 'cache' and cached_from its own id."""
    async with running_worker(_settings(db_url), models):
        await _setup(db_url)
        conn = await aconn(db_url)
        async with Client(db_url) as client:
            first = await client.ask(ASK)
        await conn.execute("UPDATE pgsynapse.questions SET text = %s WHERE id = %s", (PARAPHRASE, first.id))
        await wait_until(conn, "SELECT status = 'answered' FROM pgsynapse.questions WHERE id = %s", (first.id,),
                         channel="pgsynapse_answers")
        row = await _row(conn, first.id)
        await conn.close()
    assert row["answerer"] == "extractive" and row["cached_from"] is None


@pytest.mark.parametrize("edit", ["failed", "pending"])
async def test_an_entry_whose_question_was_edited_since_is_not_served(db_url, models, edit):
    """An edit of the question asks it again (its answer cleared), but its entry stayed until the new text was
    answered: meanwhile (pending), or for ever when the new text failed, a paraphrase was served the old answer,
    cached_from naming a question that now asks something else and has no answer."""
    async with running_worker(_settings(db_url, max_question_chars=300), models):
        await _setup(db_url)
        conn = await aconn(db_url)
        async with Client(db_url) as client:
            first = await client.ask(ASK)
            if edit == "failed":
                await conn.execute("UPDATE pgsynapse.questions SET text = repeat('x ', 200) WHERE id = %s", (first.id,))
                await wait_until(conn, "SELECT status = 'failed' FROM pgsynapse.questions WHERE id = %s", (first.id,),
                                 channel="pgsynapse_answers")
            else:
                async with conn.transaction():  # its new job waits (another worker's batch, a backoff)
                    await conn.execute("UPDATE pgsynapse.questions SET text = 'How do I vacuum a table?' WHERE id = %s",
                                       (first.id,))
                    await conn.execute("UPDATE pgsynapse.jobs SET run_after = now() + interval '1 hour'"
                                       " WHERE kind = 'answer' AND ref_id = %s AND status = 'pending'", (first.id,))
            again = await client.ask(PARAPHRASE)
        row = await _row(conn, again.id)
        await conn.close()
    assert row["answerer"] == "extractive" and row["cached_from"] is None


async def test_an_answer_is_stored_under_the_rules_it_was_checked_under_not_those_a_later_batch_read(db_url, models):
    """The worker's loops share one handler: a batch loaded (its question checked) under the old rules, written
    after another batch read a new rule, was stored under the new rules' key, and served under rules its question
    was never checked against."""
    async with running_worker(_settings(db_url), models):
        await _setup(db_url)
    conn = await aconn(db_url)
    await register_vector_async(conn)
    handler = AnswerHandler(_settings(db_url), models)

    async def ask(text: str) -> Job:
        qid = (await (await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (%s) RETURNING id",
                                         (text,))).fetchone())["id"]
        return Job(qid, "answer", qid, {}, 1, datetime.now(timezone.utc))

    first = await ask(ASK)
    work, _ = await handler.load(conn, [first])  # no rules yet
    await conn.execute("INSERT INTO pgsynapse.guardrail_rules (text, action, threshold)"
                       " VALUES ('how to make a bomb or explosives', 'block', 0.6)")
    await handler.load(conn, [await ask("How do I reclaim storage from dead tuples?")])  # another loop's batch
    outcomes = handler.compute(work)
    async with conn.transaction():
        await handler.write(conn, outcomes)
    await conn.execute("DELETE FROM pgsynapse.jobs WHERE kind = 'answer'")  # the second batch is another loop's
    async with running_worker(_settings(db_url), models):
        async with Client(db_url) as client:
            again = await client.ask(PARAPHRASE)  # matches no rule: looked up under the new rules
    row = await _row(conn, again.id)
    await conn.close()
    assert row["answerer"] == "extractive" and row["cached_from"] is None


async def test_two_workers_counting_hits_on_the_same_entries_do_not_deadlock(db_url, models):
    """Each hit adds to its entry's count (a row lock on the entry) as its answer is written, in the batch's order: a
    batch hitting entries Y then X, written beside one hitting X then Y, waited each for the other, and PostgreSQL
    aborted one as a deadlock (the writer wrote it again a second later). The entries are locked in one order
    first."""
    vacuum = "How do I reclaim the storage of dead tuples?"
    async with running_worker(_settings(db_url), models):
        await _setup(db_url)
        async with Client(db_url) as client:
            x, y = await client.ask(ASK), await client.ask(vacuum)
    conn = await aconn(db_url)
    await register_vector_async(conn)
    entries = "SELECT question_id, hit_count FROM pgsynapse.answer_cache ORDER BY question_id"
    assert await (await conn.execute(entries)).fetchall() == [{"question_id": x.id, "hit_count": 0},
                                                               {"question_id": y.id, "hit_count": 0}]

    async def batch(handler: AnswerHandler, texts: list[str]):
        jobs = []
        for text in texts:
            qid = (await (await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (%s) RETURNING id",
                                             (text,))).fetchone())["id"]
            jobs.append(Job(qid, "answer", qid, {}, 1, datetime.now(timezone.utc)))
        work, _ = await handler.load(conn, jobs)
        assert all(w.cached for w in work)
        return jobs, handler.compute(work)

    first, second = AnswerHandler(_settings(db_url), models), AnswerHandler(_settings(db_url), models)
    first_jobs, first_out = await batch(first, [vacuum, ASK])  # hits y, then x
    second_jobs, second_out = await batch(second, [ASK, vacuum])  # hits x, then y
    await conn.execute("DELETE FROM pgsynapse.jobs WHERE kind = 'answer'")
    paused, release = anyio.Event(), anyio.Event()
    written = first.cache.written

    async def held(*args, **kw):  # the first holds what its first answer's write locked until the second waits
        await written(*args, **kw)
        if not paused.is_set():
            paused.set()
            await release.wait()

    first.cache.written = held  # type: ignore[method-assign]

    async def write(handler: AnswerHandler, jobs: list[Job], outcomes) -> None:
        async with await aconn(db_url) as c, c.transaction():  # as the writer does: the questions, then the write
            await handler.lock_rows(c, [j.ref_id for j in jobs])
            await handler.write(c, outcomes)

    async with anyio.create_task_group() as tg:
        tg.start_soon(write, first, first_jobs, first_out)
        await paused.wait()
        tg.start_soon(write, second, second_jobs, second_out)
        await wait_until(conn, "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database()"
                               " AND wait_event_type = 'Lock'", channel="pgsynapse_answers")
        release.set()
    assert await (await conn.execute(entries)).fetchall() == [{"question_id": x.id, "hit_count": 2},
                                                               {"question_id": y.id, "hit_count": 2}]
    await conn.close()


def test_status_says_whether_the_cache_is_on_and_how_many_entries_it_holds(db_url):
    """`pgsynapse status` said neither whether the answer cache was on nor what it held (only how many questions it
    had answered). On/off and its threshold and max age are the settings status reads (like read_url); the entries
    and their hits are the database's."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        assert render(status_snapshot(conn, settings=fast_settings(db_url))).splitlines().count(
            "answer cache   : off (PGSYNAPSE_ANSWER_CACHE=true turns it on), 0 entries") == 1
        for text, hits in (("how do I vacuum?", 3), ("what is a savepoint?", 1)):
            qid = conn.execute("INSERT INTO pgsynapse.questions (text, status, answer) VALUES (%s, 'answered', 'x') "
                               "RETURNING id", (text,)).fetchone()["id"]
            conn.execute("INSERT INTO pgsynapse.answer_cache (question_id, model_version_id, settings_key, rules_key, "
                         "question, embedding, answer, sources, document_ids, document_hashes, hit_count) VALUES "
                         "(%s, 1, 's', 'r', %s, %s, 'x', '[]', '{}', '{}', %s)", (qid, text, str([1.0] * 384), hits))
        snap = status_snapshot(conn, settings=_settings(db_url, answer_cache_max_age_seconds=86400))
    assert snap["answer_cache"] == {"enabled": True, "threshold": 0.9, "max_age_seconds": 86400.0, "entries": 2,
                                    "hits": 4}
    assert "answer cache   : on (threshold 0.9, max age 1 day), 2 entries, served 4 times" in render(snap).splitlines()
    r = subprocess.run([sys.executable, "-m", "pgsynapse", "--database-url", db_url, "status", "--json"],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                       env={**os.environ, "PGSYNAPSE_ANSWER_CACHE": "true"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["answer_cache"] == {"enabled": True, "threshold": 0.9, "max_age_seconds": 604800.0,
                                                    "entries": 2, "hits": 4}
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:  # one entry served once
        conn.execute("DELETE FROM pgsynapse.answer_cache WHERE hit_count = 3")
        one = render(status_snapshot(conn, settings=_settings(db_url, answer_cache_max_age_seconds=86400)))
    assert "answer cache   : on (threshold 0.9, max age 1 day), 1 entry, served 1 time" in one.splitlines(), one
