"""Questions in, cited answers out, announced by NOTIFY: real Postgres, real model, no sleeps."""

from __future__ import annotations

import json

import anyio
import pytest
import torch
from pgvector.psycopg import register_vector_async
from psycopg.rows import dict_row

from pgsynapse.answerers import NOT_FOUND, ExtractiveAnswerer
from pgsynapse.cache import default_lru
from pgsynapse.cli import main
from pgsynapse.client import Client, format_result
from pgsynapse.corpus import shipped_pages
from pgsynapse.errors import InputError
from pgsynapse.handlers.answer import AnswerHandler, AnswerWork, vector_sql
from pgsynapse.handlers.base import Job
from pgsynapse.handlers.embed import EmbedHandler
from pgsynapse.models import ModelCache
from pgsynapse.retrieval import fuse_full_text
from pgsynapse.results import Result
from pgsynapse.search import search, version_row
from tests.helpers import aconn, adopt_runtime, fast_settings, insert_docs, running_worker, wait_until

pytestmark = pytest.mark.anyio

DOCS = [
    ("Savepoints", "SAVEPOINT establishes a new savepoint within the current transaction. A savepoint is a special "
                   "mark inside a transaction that allows all commands executed after it to be rolled back. "
                   "ROLLBACK TO SAVEPOINT undoes the commands since the savepoint. RELEASE SAVEPOINT destroys it."),
    ("Vacuum", "VACUUM reclaims storage occupied by dead tuples. Deleted or obsoleted rows are not physically "
               "removed until a VACUUM is done. Run VACUUM periodically on frequently updated tables."),
    ("JSON types", "The jsonb data type stores JSON data in a decomposed binary format. GIN indexes can be used to "
                   "search efficiently for keys or key/value pairs occurring within a large number of jsonb documents."),
    ("Creating indexes", "CREATE INDEX constructs an index on the specified column of a table. Indexes are primarily "
                         "used to enhance database performance. A unique index rejects duplicate values."),
]
ALL_ANSWERED = "SELECT count(*) = 0 FROM pgsynapse.questions WHERE status = 'pending'"


async def _corpus(url: str, docs: list[tuple[str, str, str]] | None = None) -> list[int]:
    """Inserts ``docs`` (default: this file's DOCS) and waits until every document is embedded."""
    ids = insert_docs(url, DOCS if docs is None else docs)
    conn = await aconn(url)
    await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'")
    await conn.close()
    return ids


async def test_question_is_answered_with_its_document_cited_and_notify_follows_commit(db_url, models):
    async with running_worker(fast_settings(db_url), models):
        ids = await _corpus(db_url)
        listener = await aconn(db_url)
        await listener.execute("LISTEN pgsynapse_answers")
        row = await (await listener.execute(
            "INSERT INTO pgsynapse.questions (session_id, text) VALUES ('s1', 'how can I undo commands back to a savepoint?')"
            " RETURNING id")).fetchone()
        notice = None
        with anyio.fail_after(120):
            async for n in listener.notifies():
                notice = json.loads(n.payload)
                if notice["id"] == row["id"]:
                    break
        # when the NOTIFY arrives the row is already committed with its answer
        reader = await aconn(db_url)
        q = await (await reader.execute("SELECT * FROM pgsynapse.questions WHERE id = %s", (row["id"],))).fetchone()
        assert notice == {"id": row["id"], "status": "answered"}
        assert q["status"] == "answered" and q["answer"] and q["latency_ms"] > 0 and q["model_version_id"] == 1
        assert q["sources"][0]["document_id"] == ids[0]
        assert {"document_id", "chunk_id", "title", "score", "passage", "rank"} <= set(q["sources"][0])
        assert "[1]" in q["answer"] and "savepoint" in q["answer"].lower()
        # `pgsynapse ask` names the cited chunk by its id (search adds its place in the document): "chunk 1" read as
        # a place, beside search's "#0"
        shown = format_result(Result(q["id"], q["status"], q["answer"], q["sources"], 1, q["latency_ms"], None, None,
                                     "s1"))
        s = q["sources"][0]
        assert f"  [1] {s['score']:.3f}  {s['title']}  (document {ids[0]}, chunk id {s['chunk_id']})" in shown, shown
        await listener.close()
        await reader.close()


async def test_an_answer_only_worker_loads_its_model_before_it_says_it_started(db_url):
    """PGSYNAPSE_KINDS=answer (answer workers apart from the embedding ones, docs/operations.md): the routable
    versions' models load at start, as an embedding worker's do, so READY=1 and `status` mean the same for it and
    its first question does not wait for the load (it did: 31 s on a busy host, longer than a short lease)."""
    models = ModelCache()  # not the session's: this one has loaded nothing yet
    async with running_worker(fast_settings(db_url, kinds=("answer",)), models) as worker:
        assert [m.spec.version_id for m in worker.models.loaded()] == [1]
        conn = await aconn(db_url)
        row = await (await conn.execute("SELECT models FROM pgsynapse.workers WHERE worker_id = %s",
                                        (worker.worker_id,))).fetchone()
        await conn.close()
        assert [m["version"] for m in row["models"]] == [1], row


async def test_nothing_relevant_gets_the_clear_not_found_answer(db_url, models):
    async with running_worker(fast_settings(db_url), models):
        await _corpus(db_url)
        async with Client(db_url) as client:
            r = await client.ask("What is the best recipe for chocolate cake?")
    assert r.status == "answered" and r.answer == NOT_FOUND and r.sources == []


async def test_follow_up_in_a_session_retrieves_with_the_history(db_url, models):
    async with running_worker(fast_settings(db_url), models):
        ids = await _corpus(db_url)
        async with Client(db_url) as client:
            first = await client.ask("How do I mark a point inside a transaction with a savepoint?", session_id="alice")
            follow = await client.ask("and how do I undo it?", session_id="alice")
            alone = await client.ask("and how do I undo it?", session_id="bob")
            # a new topic in the same conversation is searched on its own, not with the last question's words
            new_topic = await client.ask("How do I make a column unique?", session_id="alice")
            # and a follow-up of a follow-up keeps the topic of the question that set it
            await client.ask("can it cover only some rows?", session_id="alice")
            chained = await client.ask("and how do I drop it?", session_id="alice")
        conn = await aconn(db_url)
        rq = {r["session_id"]: r["retrieval_query"] for r in await (await conn.execute(
            "SELECT session_id, retrieval_query FROM pgsynapse.questions WHERE id IN (%s, %s)", (follow.id, alone.id))).fetchall()}
        new_rq, chained_rq = [(await (await conn.execute(
            "SELECT retrieval_query FROM pgsynapse.questions WHERE id = %s", (r.id,))).fetchone())["retrieval_query"]
            for r in (new_topic, chained)]
        turns = await (await conn.execute("SELECT turns FROM pgsynapse.conversations WHERE session_id = 'alice'")).fetchone()
        await conn.close()
    assert first.sources[0]["document_id"] == ids[0]
    assert rq["alice"] == "How do I mark a point inside a transaction with a savepoint? and how do I undo it?"
    assert rq["bob"] == "and how do I undo it?"
    assert new_rq == "How do I make a column unique?"
    assert chained_rq == "How do I make a column unique? can it cover only some rows? and how do I drop it?"
    assert follow.sources and follow.sources[0]["document_id"] == ids[0]
    assert turns["turns"] == 5


async def test_a_blank_session_id_is_no_session_and_shares_no_history(db_url, models):
    # apps that write '' (or spaces) for "no session": each question stands alone, not a follow-up of everyone's
    async with running_worker(fast_settings(db_url), models):
        await _corpus(db_url)
        conn = await aconn(db_url)
        await conn.execute("LISTEN pgsynapse_answers")
        first = (await (await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('', %s)"
                                           " RETURNING id", ("How do I mark a point inside a transaction?",))).fetchone())
        async for n in conn.notifies(timeout=60):
            if json.loads(n.payload)["id"] == first["id"]:
                break
        later = (await (await conn.execute(
            "INSERT INTO pgsynapse.questions (session_id, text) VALUES ('', 'and how do I undo it?'),"
            " ('  ', 'and how do I undo it?') RETURNING id")).fetchall())
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.questions WHERE status = 'pending'",
                         channel="pgsynapse_answers")
        rows = await (await conn.execute("SELECT id, retrieval_query, text FROM pgsynapse.questions WHERE id = ANY(%s)",
                                         ([r["id"] for r in later],))).fetchall()
        conversations = await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.conversations")).fetchone()
        await conn.close()
    assert len(rows) == 2 and all(r["retrieval_query"] == r["text"] == "and how do I undo it?" for r in rows), rows
    assert conversations["n"] == 0  # and no "conversation" of every blank-session question (questions_v7.sql)


async def test_a_follow_up_asked_while_its_sessions_last_question_is_pending_keeps_its_context(db_url, models):
    """A chat app sends the follow-up before the first answer came: the first question is still pending (being
    answered by another batch, another worker, or waiting for a retry) when the follow-up is loaded. It was searched
    on its own ("and can it reject duplicates?") and, with no history, stored in the answer cache."""
    conn = await aconn(db_url)
    first = (await (await conn.execute(
        "INSERT INTO pgsynapse.questions (session_id, text) VALUES ('carol', 'How do I create an index on a column?')"
        " RETURNING id")).fetchone())["id"]
    # the first question's job is held elsewhere (another worker's batch): this worker cannot claim it
    await conn.execute("UPDATE pgsynapse.jobs SET run_after = now() + interval '1 hour' WHERE kind = 'answer'"
                       " AND ref_id = %s", (first,))
    async with running_worker(fast_settings(db_url, answer_cache=True), models):
        await _corpus(db_url)
        async with Client(db_url) as client:
            follow = await client.ask("and can it reject duplicates?", session_id="carol")
        row = await (await conn.execute(
            "SELECT retrieval_query, (SELECT count(*) FROM pgsynapse.answer_cache WHERE question_id = q.id) AS cached"
            " FROM pgsynapse.questions q WHERE id = %s", (follow.id,))).fetchone()
    await conn.close()
    assert row["retrieval_query"] == "How do I create an index on a column? and can it reject duplicates?"
    assert row["cached"] == 0  # a follow-up with history is never served again from the cache


async def test_a_session_id_with_spaces_around_it_keeps_its_own_history_and_reads_no_other(db_url, models):
    """'erin ' (a char(n) column pads it) is its own session: its follow-up was searched without its history, and
    ' alice' read the history of 'alice', another user's conversation."""
    async with running_worker(fast_settings(db_url), models):
        await _corpus(db_url)
        async with Client(db_url) as client:
            await client.ask("How do I mark a point inside a transaction with a savepoint?", session_id="erin ")
            padded = await client.ask("and how do I undo it?", session_id="erin ")
            await client.ask("How do I reclaim storage from dead tuples?", session_id="alice")
            other = await client.ask("and how do I undo it?", session_id=" alice")
        conn = await aconn(db_url)
        rq = {r["id"]: r["retrieval_query"] for r in await (await conn.execute(
            "SELECT id, retrieval_query FROM pgsynapse.questions WHERE id IN (%s, %s)", (padded.id, other.id))).fetchall()}
        await conn.close()
    assert rq[padded.id] == "How do I mark a point inside a transaction with a savepoint? and how do I undo it?"
    assert rq[other.id] == "and how do I undo it?"


class CountingAnswerer(ExtractiveAnswerer):
    """The real extractive answerer, counting the questions that reach it; raises on a marker."""

    seen: list[str] = []

    def answer(self, req):
        self.seen.append(req.question)
        if "EXPLODE" in req.question:
            raise RuntimeError("answerer exploded on this question")
        return super().answer(req)


class CountingHandler(AnswerHandler):
    def answerer_for(self, embedder):
        return CountingAnswerer(lambda texts: embedder.encode(texts), not_found_threshold=self.settings.not_found_threshold)


async def test_blocked_question_never_reaches_the_answerer_and_flags_are_recorded(db_url, models):
    settings = fast_settings(db_url)
    CountingAnswerer.seen = []
    async with running_worker(settings, models, handlers={"embed": _embed(settings, models),
                                                          "answer": CountingHandler(settings, models)}):
        await _corpus(db_url)
        conn = await aconn(db_url)
        await conn.execute("INSERT INTO pgsynapse.guardrail_rules (text, action, threshold) VALUES"
                           " ('how to make a bomb or explosives', 'block', 0.6),"
                           " ('reclaim disk space from dead rows', 'flag', 0.5)")
        async with Client(db_url) as client:
            blocked = await client.ask("how do I make a bomb with explosives")
            flagged = await client.ask("how can I reclaim disk space used by dead rows?")
        await conn.close()
    assert blocked.status == "blocked" and blocked.guardrail["action"] == "block" and blocked.guardrail["stage"] == "question"
    assert "how do I make a bomb with explosives" not in CountingAnswerer.seen
    assert flagged.status == "answered" and flagged.guardrail["action"] == "flag" and flagged.answer != NOT_FOUND
    assert CountingAnswerer.seen == ["how can I reclaim disk space used by dead rows?"]


def _embed(settings, models):
    return EmbedHandler(settings, models)


async def test_fifty_questions_in_one_statement_are_answered_in_batches_and_one_failure_stays_alone(db_url, models):
    settings = fast_settings(db_url, batch_size=16, max_attempts=2)
    CountingAnswerer.seen = []
    async with running_worker(settings, models, handlers={"embed": _embed(settings, models),
                                                          "answer": CountingHandler(settings, models)}):
        await _corpus(db_url)
        conn = await aconn(db_url)
        texts = [f"question {i}: how do I create a unique index?" for i in range(50)]
        texts[17] = "EXPLODE: how do I vacuum a table?"
        await conn.execute("INSERT INTO pgsynapse.questions (text) SELECT unnest(%s::text[])", (texts,))
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
        rows = await (await conn.execute(
            "SELECT q.text, q.status, q.error, j.attempts, j.started_at FROM pgsynapse.questions q"
            " JOIN pgsynapse.jobs j ON j.kind = 'answer' AND j.ref_id = q.id ORDER BY q.id")).fetchall()
        await conn.close()
    assert [r["status"] for r in rows].count("answered") == 49
    bad = rows[17]
    assert bad["status"] == "failed" and bad["error"] == "RuntimeError: answerer exploded on this question"
    assert bad["attempts"] == 2
    # several batches: 50 jobs at batch_size 16 cannot have been claimed at one instant
    assert len({r["started_at"] for r in rows}) >= 4


async def test_hybrid_retrieval_fuses_full_text_and_vectors(db_url, models):
    settings = fast_settings(db_url, hybrid=True)
    async with running_worker(settings, models):
        ids = await _corpus(db_url)
        async with Client(db_url) as client:
            r = await client.ask("GIN index jsonb keys")
    assert r.sources[0]["document_id"] == ids[2]


async def test_concurrent_asks_on_one_client_are_each_woken_by_their_own_notify(db_url, models):
    texts = ["how can I undo commands back to a savepoint?", "how do I reclaim storage from dead tuples?",
             "how are jsonb documents searched with GIN indexes?", "how do I make an index reject duplicates?"]
    async with running_worker(fast_settings(db_url, batch_size=1), models):
        ids = await _corpus(db_url)
        results = {}
        async with Client(db_url) as client:
            # no safety re-read: only an announcement can wake an ask, so one read by the wrong task would hang
            client.recheck_seconds = 3600

            async def one(text: str) -> None:
                results[text] = await client.ask(text, timeout=None)

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for t in texts:
                        tg.start_soon(one, t)
    assert [results[t].status for t in texts] == ["answered"] * 4
    assert [results[t].sources[0]["document_id"] for t in texts] == [ids[0], ids[1], ids[2], ids[3]]


async def test_two_answers_announced_in_one_packet_wake_both_asks(db_url):
    """Answers committed together reach the client in one packet; psycopg reads them together, and an ask that
    took the first and left the generator dropped the other: its asker slept until the safety re-read (5 s), or
    for ever without it. No worker here: the test answers both rows itself, in one transaction."""
    conn = await aconn(db_url)
    texts = ["how can I undo commands back to a savepoint?", "how do I reclaim storage from dead tuples?"]
    results = {}
    async with Client(db_url) as client:
        client.recheck_seconds = 3600  # only an announcement can wake an ask

        async def one(text: str) -> None:
            results[text] = await client.ask(text, timeout=None)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for t in texts:
                    tg.start_soon(one, t)
                await wait_until(conn, "SELECT count(*) = 2 FROM pgsynapse.questions", channel="pgsynapse_jobs")
                async with conn.transaction():
                    rows = await (await conn.execute(
                        "UPDATE pgsynapse.questions SET status = 'answered', answer = 'answer to ' || text"
                        " RETURNING id")).fetchall()
                    for r in rows:
                        await conn.execute("SELECT pg_notify('pgsynapse_answers', json_build_object('id', %s::bigint,"
                                           " 'status', 'answered')::text)", (r["id"],))
    await conn.close()
    assert [(results[t].status, results[t].answer) for t in texts] == [("answered", f"answer to {t}") for t in texts]


async def test_knn_query_uses_the_versions_partial_hnsw_index_even_as_a_generic_plan(db_url):
    conn = await aconn(db_url)
    version = {"id": 1, "dim": 384}
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    await conn.execute("SET enable_seqscan = off")  # no data: make any usable index win over a scan
    await conn.execute(f"PREPARE knn(vector, int) AS {vector_sql(version).replace('%(query)s', '$1').replace('%(k)s', '$2')}")
    plan = "\n".join(r["QUERY PLAN"] for r in await (await conn.execute(
        "EXPLAIN EXECUTE knn(array_fill(0.1, ARRAY[384])::vector, 5)")).fetchall())
    await conn.close()
    assert "embeddings_hnsw_v1" in plan, plan


async def test_follow_up_asked_in_the_same_statement_still_gets_the_previous_question_as_context(db_url, models):
    async with running_worker(fast_settings(db_url), models):
        ids = await _corpus(db_url)
        conn = await aconn(db_url)
        # both turns at once: the first is still pending when the follow-up is retrieved (same batch)
        await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES"
                           " ('carol', 'How do I mark a point inside a transaction with a savepoint?'),"
                           " ('carol', 'and how do I undo it?')")
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
        rows = await (await conn.execute(
            "SELECT retrieval_query, sources FROM pgsynapse.questions WHERE session_id = 'carol' ORDER BY id")).fetchall()
        await conn.close()
    assert rows[1]["retrieval_query"] == "How do I mark a point inside a transaction with a savepoint? and how do I undo it?"
    assert rows[1]["sources"][0]["document_id"] == ids[0]


async def test_hybrid_brings_in_passages_only_full_text_finds(db_url, models):
    """Vector ranks from one text, full-text ranks from a rare word only one passage has: with the full-text ranks
    weighted as the vector ranks, the fused list must include that passage, scored by its own stored vector. (At the
    default weight, 0.75, a hit of full text alone ranks after the vector candidates: test_rrf.py.)"""

    settings = fast_settings(db_url, hybrid=True, hybrid_text_weight=1.0, answer_top_k=2)
    async with running_worker(settings, models):
        await _corpus(db_url)
        insert_docs(db_url, [(f"Transactions {i}", f"Part {i}: BEGIN starts a transaction block; ROLLBACK undoes the "
                                                   f"commands back to a savepoint or the start.") for i in range(8)])
        [rare] = insert_docs(db_url, [("Glossary", "The term qwertzuiop names an obscure internal code path.")])
        conn = await aconn(db_url)
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (rare,))
    conn.row_factory = dict_row
    await register_vector_async(conn)
    handler = AnswerHandler(settings, models)
    version = {"id": 1, "name": "v1", "artifact_path": None, "runtime": "torch", "dim": 384, "status": "active"}
    vec = models.get(version).encode(["undo commands back to a savepoint in a transaction"])[0]
    w = AnswerWork(Job(0, "answer", 0, {}, 1, None), "q", None, version, [], "qwertzuiop", vec)
    passages = await handler._retrieve(conn, w)
    plain = AnswerHandler(fast_settings(db_url, hybrid=False, answer_top_k=6), models)
    vector_only = await plain._retrieve(conn, AnswerWork(Job(0, "answer", 0, {}, 1, None), "q", None, version, [],
                                                         "qwertzuiop", vec))
    await conn.close()
    assert rare not in [p.document_id for p in vector_only]
    assert rare in [p.document_id for p in passages]
    assert all(-1 <= p.score <= 1 for p in passages)


async def test_repeated_question_embedding_comes_from_the_cache_of_its_own_version(db_url, models):
    default_lru.clear()
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url), models):
        await _corpus(db_url)
        before = (default_lru.stats.misses, default_lru.stats.memory_hits)
        for text in ("How do I reclaim space from dead tuples?", "How do I  reclaim space from dead tuples?"):
            await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (%s)", (text,))
            await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
        # one miss (the model ran), then a hit: the same text once normalised
        assert (default_lru.stats.misses - before[0], default_lru.stats.memory_hits - before[1]) == (1, 1)
        # a candidate version taking all traffic never gets version 1's vector: its own miss, its own row
        await conn.execute(
            "INSERT INTO pgsynapse.model_versions"
            " (id, name, base_version_id, artifact_path, dim, status, traffic_percent, backfilled_at)"
            " SELECT 2, 'copy', 1, artifact_path, dim, 'candidate', 100, now() FROM pgsynapse.model_versions WHERE id = 1")
        await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('How do I reclaim space from dead tuples?')")
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
        assert default_lru.stats.misses - before[0] == 2
    rows = await (await conn.execute(
        "SELECT model_version_id AS v, count(*) AS n FROM pgsynapse.inference_cache WHERE op = 'query_embedding'"
        " GROUP BY 1 ORDER BY 1")).fetchall()
    assert [(r["v"], r["n"]) for r in rows] == [(1, 1), (2, 1)]
    served = await (await conn.execute(
        "SELECT model_version_id FROM pgsynapse.questions ORDER BY id")).fetchall()
    assert [r["model_version_id"] for r in served] == [1, 1, 2]
    await conn.close()


async def test_cache_max_rows_0_turns_the_table_of_the_inference_cache_off(db_url, models):
    """cache_max_rows = 0 was undocumented: the worker wrote a row per question and the housekeeping deleted them all
    later. 0 is off: no row is written or read; the in-process LRU (cache_lru_size) still serves repeats."""
    default_lru.clear()
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url, cache_max_rows=0), models):
        await _corpus(db_url)
        before = default_lru.stats.memory_hits
        for _ in range(2):
            await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('How do I reclaim space?')")
            await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
        assert default_lru.stats.memory_hits - before == 1
    row = await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.inference_cache")).fetchone()
    assert row["n"] == 0
    await conn.close()


# Of the 55 pages the demo ingests without postgresql-doc installed, those with a chunk in the question's 20 nearest on
# the INT8 runtime or its 20 best full-text matches, over all 55 (1,003 chunks; measured 2026-12-08). The answer
# handler fuses the 15 best of each side (answer_top_k 5 x CANDIDATES_FACTOR 3), and a subset that holds every chunk
# of both lists gives the same lists: the same 20 nearest with the same cosines (checked), and the same full-text
# ranks (ts_rank scores each chunk alone, and hybrid_text_max_rows is far above 1,003: every word selects; chunks of
# equal rank follow their ids, the order the worker wrote them, on the 55 too). The same passages and distractors
# (ROLLBACK's page holds the nearest chunk) as on the 55, with a third of the chunks to embed.
DEMO_QUESTION_PAGES = frozenset({
    "sql-rollback.html", "tutorial-transactions.html", "sql-prepare.html", "sql-truncate.html", "sql-commit.html",
    "sql-savepoint.html", "sql-update.html", "app-psql.html", "continuous-archiving.html", "rules-views.html",
    "sql-begin.html", "transaction-iso.html", "routine-vacuuming.html", "app-pgdump.html", "sql-listen.html",
    "backup-dump.html", "sql-createfunction.html"})


@pytest.mark.parametrize("runtime", ["torch", "onnx-int8"])
async def test_the_demo_question_through_the_product_is_answered_from_savepoints(db_url, models, runtime,
                                                                                 request):
    """Issue 18's demo case end to end at the default retrieval and answerer (full text fused with the vectors, a
    how-to question's sentences that tell how preferred), on the shipped pages about transactions, inserted as the
    demo inserts them (with their source): the answer starts from savepoints, not from ROLLBACK ("ROLLBACK rolls
    back the current transaction", or its notes: "The form ROLLBACK TRANSACTION is a PostgreSQL extension."). On the
    source model over the five pages about transactions, and as the demo runs it: the runtime that ships (INT8)
    over the demo's pages that the question's retrieval reaches, where only the how-to weight puts savepoints first
    (seen failing without it)."""
    pages = [p for p in shipped_pages() if p.source in ("sql-rollback.html", "sql-commit.html", "sql-begin.html",
                                                         "tutorial-transactions.html", "sql-savepoint.html")]
    settings = fast_settings(db_url)
    if runtime != "torch":
        pages = [p for p in list(shipped_pages())[:55] if p.source in DEMO_QUESTION_PAGES]
        assert len(pages) == len(DEMO_QUESTION_PAGES)
        shipped = request.getfixturevalue("default_runtime")
        adopt_runtime(db_url, shipped)
        # one ONNX Runtime thread: its pool spins, and beside xdist's other worker 2 threads oversubscribe 2 cores
        settings = fast_settings(db_url, runtime=runtime, data_dir=shipped["data_dir"], onnx_threads=1)
    async with running_worker(settings, models):
        conn = await aconn(db_url)
        async with conn.transaction():
            for p in pages:
                await conn.execute("INSERT INTO pgsynapse.documents (source, title, body) VALUES (%s, %s, %s)",
                                   (p.source, p.title, p.text))
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'")
        await conn.close()
        async with Client(db_url) as client:
            r = await client.ask("How do I roll back part of a transaction?")
    assert r.status == "answered"
    assert "PostgreSQL extension" not in r.answer and "rolls back the current transaction" not in r.answer, r.answer
    assert "savepoint" in r.answer.split("[")[0].lower(), r.answer


async def test_search_shows_the_passages_an_answer_is_written_from(db_url, models):
    """`search()` at its defaults (full text fused, as the setting's default) returns the answer handler's passages
    in its order, a hit of full text alone included (with its own cosine score)."""
    assert fast_settings(db_url).hybrid  # the default
    async with running_worker(fast_settings(db_url), models):
        await _corpus(db_url)
        [rare] = insert_docs(db_url, [("Glossary", "The term qwertzuiop names an obscure internal code path.")])
        conn = await aconn(db_url)
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (rare,))
    conn.row_factory = dict_row
    await register_vector_async(conn)
    version = await version_row(conn)
    # the last: its full-text hit (the rare page) moves up past a chunk of higher cosine
    for text, weight in (("how can I undo commands back to a savepoint?", 0.75), ("qwertzuiop", 1.0),
                         ("obscure internal index storage", 0.75)):
        settings = fast_settings(db_url, hybrid_text_weight=weight)
        vec = models.get(version).encode([text])[0]
        passages = await AnswerHandler(settings, models)._retrieve(
            conn, AnswerWork(Job(0, "answer", 0, {}, 1, None), text, None, version, [], text, vec))
        hits = await search(conn, models, text, k=settings.answer_top_k, text_weight=weight)  # hybrid: the default
        assert [(h.chunk_id, round(h.score, 4)) for h in hits] == [(p.chunk_id, round(p.score, 4)) for p in passages]
    assert rare in [h.document_id for h in hits]
    assert [h.score for h in hits] != sorted((h.score for h in hits), reverse=True)  # not the kNN's order
    plain = await search(conn, models, "how can I undo commands back to a savepoint?", k=5, hybrid=False)
    with pytest.raises(InputError, match="the search text is empty"):  # it returned 5 arbitrary passages
        await search(conn, models, " \n")
    await conn.close()
    assert [h.score for h in plain] == sorted((h.score for h in plain), reverse=True)  # kNN alone: by cosine


async def test_pgsynapse_search_shows_answer_top_k_passages_unless_told_otherwise(db_url, models, monkeypatch, capsys):
    """`pgsynapse search` lists "the passages an answer would use" (README): as many as answer_top_k, not always 5,
    in the answer handler's order; -k still chooses."""
    more = [(f"Transactions {i}", f"BEGIN starts transaction block {i}; COMMIT ends it and ROLLBACK "
             f"undoes its commands.") for i in range(4)]
    async with running_worker(fast_settings(db_url), models):
        await _corpus(db_url, DOCS + more)  # 8 passages: more than the 5 search listed whatever the setting
    monkeypatch.setenv("PGSYNAPSE_ANSWER_TOP_K", "3")
    text = "how can I undo commands back to a savepoint?"
    conn = await aconn(db_url)
    conn.row_factory = dict_row
    await register_vector_async(conn)
    version = await version_row(conn)
    passages = await AnswerHandler(fast_settings(db_url, answer_top_k=3), models)._retrieve(
        conn, AnswerWork(Job(0, "answer", 0, {}, 1, None), text, None, version, [], text,
                         models.get(version).encode([text])[0]))
    places = dict((r["id"], r["ord"]) for r in await (await conn.execute("SELECT id, ord FROM pgsynapse.chunks")).fetchall())
    await conn.close()
    capsys.readouterr()
    for args, n in (([], 3), (["-k", "4"], 4)):
        assert await anyio.to_thread.run_sync(lambda: main(["--database-url", db_url, "search", text, *args])) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{n} hits in the fused"), out
        if n == 3:  # each hit's line: "1. 0.497  title  [source #ord]"
            scores = [ln.split()[1] for ln in out.splitlines() if ln[:3] in ("1. ", "2. ", "3. ")]
            assert scores == [f"{p.score:.3f}" for p in passages], (out, passages)
            # "[source, chunk id N (#i in the document)]", as `ask` names a chunk "chunk id N"
            ends = [ln.rsplit("[", 1)[1] for ln in out.splitlines() if ln[:3] in ("1. ", "2. ", "3. ")]
            assert ends == [f"{p.source or f'document {p.document_id}'}, chunk id {p.chunk_id} "
                            f"(#{places[p.chunk_id]} in the document)]" for p in passages], out


def test_pgsynapse_search_loads_its_model_with_the_device_setting(db_url, monkeypatch, capsys):
    """The model `pgsynapse search` loads in-process is loaded as a worker loads it, with device, torch_threads and
    onnx_threads: a device this host does not have fails the load, saying so (it searched on the cpu, exit 0)."""
    monkeypatch.setenv("PGSYNAPSE_DEVICE", "cuda:0" if not torch.cuda.is_available() else "cuda:99")
    assert main(["--database-url", db_url, "search", "savepoints"]) == 78
    assert "cannot load model" in capsys.readouterr().err


def test_a_search_text_over_max_question_chars_is_refused_before_any_model_work(db_url, models, monkeypatch,
                                                                               capsys):
    """`pgsynapse search` of a text of a megabyte tokenized and embedded it all, then PostgreSQL refused its
    full-text query ("value is too big in tsquery"). A search text over max_question_chars (the limit of a question:
    a search is what an answer retrieves) is refused at once, exit 1, naming the setting: here before the model is
    loaded (a device this host lacks would fail the load, exit 78); `search()` and a search of images by text too."""
    monkeypatch.setenv("PGSYNAPSE_DEVICE", "cuda:0" if not torch.cuda.is_available() else "cuda:99")
    monkeypatch.setenv("PGSYNAPSE_MAX_QUESTION_CHARS", "1000")
    for args in (["search", "x" * 1001], ["search", "--images", "x" * 1001]):
        assert main(["--database-url", db_url, *args]) == 1, args
        err = capsys.readouterr().err
        assert err == ("pgsynapse: error: the search text has 1,001 characters, over max_question_chars=1,000: "
                       "shorten it, or raise max_question_chars (PGSYNAPSE_MAX_QUESTION_CHARS)\n"), (args, err)
    assert main(["--database-url", db_url, "search", "x" * 1000]) == 78  # at the limit: searched (the load fails)
    assert "cannot load model" in capsys.readouterr().err


def test_a_search_of_a_model_version_that_does_not_exist_exits_1_not_69(db_url, capsys):
    """`search --version 99` exited 69, "retry later" (a DatabaseError), where promote, retire and traffic of the same
    version exit 1: no retry makes a version."""
    assert main(["--database-url", db_url, "search", "vacuum", "--version", "99"]) == 1
    assert capsys.readouterr().err == ("pgsynapse: error: no model version 99: `pgsynapse model list` shows the "
                                       "versions\n")


def test_a_search_text_that_is_not_utf8_is_refused_in_one_line(db_url, models, capsys):
    """A shell's argument with a byte that is not UTF-8 (a Latin-1 terminal) reached the tokenizer: a traceback,
    "TypeError: TextEncodeInput must be Union[...]". It is refused as `ask` refuses such a question, exit 1."""
    for args in (["search", "vacuum \udcff"], ["search", "--images", "vacuum \udcff"]):
        assert main(["--database-url", db_url, *args]) == 1, args
        assert capsys.readouterr().err == ("pgsynapse: error: the search text is not valid text: byte 0xff at 7 is "
                                           "not UTF-8 (was it written in another encoding?)\n"), args


async def test_search_refuses_a_text_over_its_max_chars(db_url, models):
    conn = await aconn(db_url)
    conn.row_factory = dict_row
    try:
        with pytest.raises(InputError, match=r"^the search text has 20,001 characters, over max_question_chars=20,000"):
            await search(conn, models, "x" * 20_001)  # the setting's default
        with pytest.raises(InputError, match=r"^the search text has 11 characters, over max_question_chars=10:"):
            await search(conn, models, "x" * 11, max_chars=10)
    finally:
        await conn.close()


def test_a_database_error_that_retrying_will_not_fix_exits_1_not_69(db_url, monkeypatch, capsys):
    """A search text whose words make a tsvector over PostgreSQL's 1 MB (SQLSTATE 54000, program_limit_exceeded)
    exited 69, "database unreachable, retry later": the same text fails again. It is refused, exit 1, saying so."""
    text = " ".join(f"w{i}x" for i in range(150_000))
    monkeypatch.setenv("PGSYNAPSE_MAX_QUESTION_CHARS", str(2 * len(text)))  # refused from its length otherwise
    assert main(["--database-url", db_url, "search", text]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pgsynapse: error: the database refused the statement: value is too big in tsquery: ")
    assert "(SQLSTATE 54000)" in err and "a limit of PostgreSQL: retrying will not help" in err
    assert len(err) < 1000  # the message quoted the whole text back: a line of 1.2 MB


async def test_full_text_side_ranks_only_the_chunks_its_rarer_words_select(db_url, models):
    """``hybrid_text_max_rows``: a word in more chunks than the bound does not select chunks to rank (ANALYZE's
    statistics say how many), but it still ranks the chunks the rarer word selected; unbounded, every chunk with
    either word is a candidate, as before the bound."""
    common = [(f"Transactions {i}", f"Note {i}: a transaction groups statements; every transaction commits or rolls "
                                    f"back as a whole.") for i in range(40)]
    rare = [("Zebrafish and transactions", "A zebrafish transaction is the example: the transaction commits."),
            ("Zebrafish", "The zebrafish is the example's name.")]
    async with running_worker(fast_settings(db_url), models):
        ids = await _corpus(db_url, [*common, *rare])
    both, alone = ids[-2:]
    conn = await aconn(db_url)
    conn.row_factory = dict_row
    await register_vector_async(conn)
    await conn.execute("ANALYZE pgsynapse.chunks")
    version = await version_row(conn)
    vec = models.get(version).encode(["zebrafish transaction"])[0]
    results = {}
    for max_rows in (10**9, 5):
        order, by_id = await fuse_full_text(conn, version["id"], vec, "zebrafish transaction", [], 10, 1.0, max_rows)
        results[max_rows] = [by_id[c]["document_id"] for c in order]
    await conn.close()
    assert len(results[10**9]) == 10 and set(results[10**9]) - {both, alone}  # the common word's chunks compete
    assert results[5] == [both, alone]  # only the rare word selects; the common word still ranks `both` first
