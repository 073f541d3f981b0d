"""A question's latency_ms counts from when it was last asked (asked_at, migration 0024): its INSERT, an edit of
its text, or `pgsynapse retry-failed`. It counted from the row's created_at, so a question edited an hour later, or
put back after an outage, carried the hour into its latency and into the A/B report's p50 / p95. A job's age in
the queue and its insert -> result latency likewise count from when it was last queued (jobs.queued_at, 0027)."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.rows import dict_row

from pgsynapse.metrics import RESULT_LATENCY
from pgsynapse.queries import q
from pgsynapse.retry import retry_failed
from tests.helpers import aconn, fast_settings, insert_docs, running_worker, wait_until

pytestmark = pytest.mark.anyio

HOUR_MS = 3_600_000
DOCS = [("SAVEPOINT", "SAVEPOINT establishes a new savepoint within the current transaction. Use ROLLBACK TO "
         "SAVEPOINT to roll back part of a transaction.")]
ANSWERED = "SELECT bool_and(status IN ('answered', 'failed')) FROM pgsynapse.questions WHERE id = ANY(%s)"


def _an_hour_old(conn: psycopg.Connection, ids: list[int]) -> None:
    """The rows as an hour-old question's are (their answers, if any, aside)."""
    conn.execute("UPDATE pgsynapse.questions SET created_at = created_at - interval '1 hour', "
                 "asked_at = asked_at - interval '1 hour' WHERE id = ANY(%s)", (ids,))


async def test_an_edited_or_retried_question_is_timed_from_when_it_was_asked_again(db_url, models):
    insert_docs(db_url, DOCS)
    settings = fast_settings(db_url, kinds=("embed", "answer"))
    with psycopg.connect(db_url, autocommit=True) as conn:
        edited, retried, plain = (conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (%s) RETURNING id",
                                               (t,)).fetchone()[0]
                                  for t in ("what is a savepoint?", "how do I roll back part of it?", "what is SAVEPOINT?"))
        # the second one failed an hour ago, as a job that used all its attempts leaves it
        conn.execute("UPDATE pgsynapse.jobs SET status = 'failed', last_error = 'ModelError: down' "
                     "WHERE kind = 'answer' AND ref_id = %s", (retried,))
        conn.execute("UPDATE pgsynapse.questions SET status = 'failed', error = 'ModelError: down' WHERE id = %s",
                     (retried,))
        _an_hour_old(conn, [edited, retried, plain])
    watch = await aconn(db_url)
    async with running_worker(settings, models):
        await wait_until(watch, ANSWERED, ([edited, plain],), channel="pgsynapse_answers")
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
            conn.execute("UPDATE pgsynapse.questions SET text = 'what does SAVEPOINT do?' WHERE id = %s", (edited,))
            assert retry_failed(conn, "answer").requeued == {"answer": 1}
        await wait_until(watch, "SELECT bool_and(status = 'answered') FROM pgsynapse.questions WHERE id = ANY(%s)",
                         ([edited, retried],), channel="pgsynapse_answers")
    with psycopg.connect(db_url) as conn:
        latency = dict(conn.execute("SELECT id, latency_ms FROM pgsynapse.questions WHERE id = ANY(%s)",
                                    ([edited, retried, plain],)).fetchall())
        asked = dict(conn.execute("SELECT id, asked_at > created_at + interval '50 minutes' FROM pgsynapse.questions "
                                  "WHERE id = ANY(%s)", ([edited, retried, plain],)).fetchall())
    # asked an hour ago and answered now: the hour counts
    assert latency[plain] >= HOUR_MS and not asked[plain]
    # asked again now: the hour before does not
    assert latency[edited] < HOUR_MS / 2 and asked[edited], latency
    assert latency[retried] < HOUR_MS / 2 and asked[retried], latency


def test_an_edited_or_retried_data_question_is_asked_again_now(db_url):
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        edited, retried = (conn.execute("INSERT INTO pgsynapse.data_questions (text) VALUES (%s) RETURNING id",
                                        (t,)).fetchone()["id"] for t in ("how many orders?", "how many customers?"))
        conn.execute("UPDATE pgsynapse.data_questions SET created_at = created_at - interval '1 hour', "
                     "asked_at = asked_at - interval '1 hour' WHERE id = ANY(%s)", ([edited, retried],))
        conn.execute("UPDATE pgsynapse.jobs SET status = 'failed' WHERE kind = 'sql_answer' AND ref_id = %s",
                     (retried,))
        conn.execute("UPDATE pgsynapse.data_questions SET status = 'failed', error = 'x' WHERE id = %s", (retried,))
        conn.execute("UPDATE pgsynapse.data_questions SET text = 'how many orders shipped?' WHERE id = %s", (edited,))
        assert retry_failed(conn, "sql_answer").requeued == {"sql_answer": 1}
        rows = [tuple(r.values()) for r in conn.execute(
            "SELECT status, now() - asked_at < interval '1 minute' FROM pgsynapse.data_questions WHERE id = ANY(%s) "
            "ORDER BY id", ([edited, retried],)).fetchall()]
        conn.execute("DELETE FROM pgsynapse.jobs WHERE kind = 'sql_answer'")  # no worker of this test takes them
    assert rows == [("pending", True), ("pending", True)]


def _latency(kind: str) -> tuple[float, float]:
    """This process's pgsynapse_insert_to_result_seconds for ``kind``: (count, sum)."""
    samples = {s.name: s.value for m in RESULT_LATENCY.collect() for s in m.samples if s.labels.get("kind") == kind}
    return samples.get("pgsynapse_insert_to_result_seconds_count", 0.0), \
        samples.get("pgsynapse_insert_to_result_seconds_sum", 0.0)


async def test_a_job_put_back_by_retry_failed_is_as_old_as_its_retry(db_url, models):
    """A job that failed an hour ago and was put back counted as an hour old at once (the queue's age in `status`,
    pgsynapse_queue_oldest_pending_seconds and its alert at 600 s) and its result an hour late
    (pgsynapse_insert_to_result_seconds), though it waited for nothing since the retry."""
    [doc] = insert_docs(db_url, [("Old failure", "VACUUM reclaims storage occupied by dead tuples.")])
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("UPDATE pgsynapse.jobs SET status = 'failed', last_error = 'ModelError: down', "
                     "created_at = created_at - interval '1 hour' WHERE kind = 'embed' AND ref_id = %s", (doc,))
        conn.execute("UPDATE pgsynapse.documents SET status = 'failed', error = 'ModelError: down' WHERE id = %s",
                     (doc,))
        assert retry_failed(conn, "embed").requeued == {"embed": 1}
        [stats] = [r for r in conn.execute(q("queue_stats")) if r["kind"] == "embed"]
        [depth] = [r for r in conn.execute(q("queue_depth", "ops.sql")) if r["kind"] == "embed"]
    assert stats["pending"] == 1 and stats["oldest_pending_seconds"] < 60, stats
    assert depth["pending"] == 1 and depth["oldest_pending_seconds"] < 60, depth
    count, total = _latency("embed")
    watch = await aconn(db_url)
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await wait_until(watch, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,),
                         channel="pgsynapse_documents")
    await watch.close()
    new_count, new_total = _latency("embed")
    assert new_count == count + 1 and new_total - total < 600, (new_count - count, new_total - total)
