"""Reads on a real streaming replica (read_url): two embedded servers, the standby made by pg_basebackup.

Retrieval for answers and ``search`` read the standby once it has replayed what the primary had flushed when the
read began; a standby that lags (its replay paused here) or cannot be reached is not read: the primary is. The
lagging test fails when the replica is read regardless (tried: the answer cites no passage of the document that
only the primary has), and the first one when nothing is read there (the standby shows no kNN query).
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg.rows import dict_row

from pgsynapse.client import Client
from pgsynapse.handlers.answer import AnswerHandler
from pgsynapse.handlers.embed import EmbedHandler
from pgsynapse.migrate import migrate
from pgsynapse.replica import ReadReplica
from pgsynapse.search import search
from pgsynapse.status import render, snapshot
from tests.helpers import aconn, fast_settings, running_worker, wait_until
from tests.replica import ReplicaPair


WAIT = 120.0  # safety net only

DOCS = [
    ("Vacuum", "VACUUM reclaims storage occupied by dead tuples. Run it regularly on busy tables."),
    ("JSON", "The jsonb type stores JSON documents in a decomposed binary format that is faster to process."),
]


@pytest.fixture(scope="module")
def pair():
    pair = ReplicaPair().start()
    yield pair
    pair.stop()


@pytest.fixture
def dbs(pair):
    """A migrated database on the primary, and the same database's URL on the standby."""
    name = f"pgsynapse_r_{uuid.uuid4().hex[:10]}"
    # both replayed by the standby before they return (remote_apply): the test reads it at once
    with psycopg.connect(pair.url("postgres", applied=True), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    migrate(pair.url(name, applied=True))
    yield pair.url(name), pair.url(name, standby=True)
    with psycopg.connect(pair.primary_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def embedded(primary: psycopg.AsyncConnection, docs: list[tuple[str, str]]) -> list[int]:
    cur = await primary.execute(
        "INSERT INTO pgsynapse.documents (title, body) SELECT * FROM unnest(%s::text[], %s::text[]) RETURNING id",
        ([t for t, _ in docs], [b for _, b in docs]))
    ids = [r["id"] for r in await cur.fetchall()]
    await wait_until(primary, "SELECT count(*) = %s FROM pgsynapse.documents WHERE status = 'embedded' AND id = ANY(%s)",
                     (len(ids), ids), timeout=WAIT)
    return ids


async def last_reads(standby: psycopg.AsyncConnection, application_name: str) -> list[str]:
    """The last statement of each of the standby's connections of ``application_name``."""
    rows = await (await standby.execute(
        "SELECT query FROM pg_stat_activity WHERE application_name = %s", (application_name,))).fetchall()
    return [r["query"] for r in rows]


@pytest.mark.anyio
async def test_retrieval_reads_the_standby_once_it_has_caught_up(dbs, models):
    primary_url, standby_url = dbs
    # a long wait: the standby is always read here, never skipped for lagging
    settings = fast_settings(primary_url, read_url=standby_url, read_max_lag_ms=60_000, kinds=("embed", "answer"))
    answers = AnswerHandler(settings, models)
    primary, standby = await aconn(primary_url), await aconn(standby_url)
    async with running_worker(settings, models, handlers={"embed": EmbedHandler(settings, models),
                                                          "answer": answers}):
        ids = await embedded(primary, DOCS)
        async with Client(primary_url) as client:
            result = await client.ask("how do I reclaim space from dead tuples?", timeout=WAIT)
        assert result.status == "answered", result
        assert result.sources and result.sources[0]["document_id"] == ids[0]
        assert answers.replica is not None and answers.replica.reads["replica"] >= 1, answers.replica.reads
        assert answers.replica.reads["primary_lagging"] == answers.replica.reads["primary_unavailable"] == 0
        # the standby ran the retrieval: its reader's last statement is the retrieval's (the full-text candidates
        # follow the kNN when hybrid is on, the default)
        [read] = await last_reads(standby, "pgsynapse-read")
        assert "ORDER BY e.embedding" in read or "to_tsvector('english'" in read, read
    await primary.close()
    await standby.close()


@pytest.mark.anyio
async def test_a_lagging_standby_is_not_read(dbs, models):
    primary_url, standby_url = dbs
    settings = fast_settings(primary_url, read_url=standby_url, read_max_lag_ms=50, kinds=("embed", "answer"))
    answers = AnswerHandler(settings, models)
    primary, standby = await aconn(primary_url), await aconn(standby_url)
    await standby.execute("SELECT pg_wal_replay_pause()")
    try:
        async with running_worker(settings, models, handlers={"embed": EmbedHandler(settings, models),
                                                              "answer": answers}):
            ids = await embedded(primary, DOCS)
            # what the replica would answer from: nothing of these documents reached it
            row = await (await standby.execute("SELECT count(*) AS n FROM pgsynapse.documents")).fetchone()
            assert row["n"] == 0
            async with Client(primary_url) as client:
                result = await client.ask("how do I reclaim space from dead tuples?", timeout=WAIT)
            assert result.status == "answered", result
            assert result.sources and result.sources[0]["document_id"] == ids[0]
            assert answers.replica is not None and answers.replica.reads["primary_lagging"] >= 1
            assert answers.replica.reads["replica"] == 0
    finally:
        await standby.execute("SELECT pg_wal_replay_resume()")
        await primary.close()
        await standby.close()


@pytest.mark.anyio
async def test_an_unreachable_replica_is_not_read(db_url, models):
    # a socket directory where no server listens: every connection attempt fails at once
    settings = fast_settings(db_url, read_url="host=/nonexistent-pgsynapse dbname=x", kinds=("embed", "answer"))
    answers = AnswerHandler(settings, models)
    primary = await aconn(db_url)
    async with running_worker(settings, models, handlers={"embed": EmbedHandler(settings, models),
                                                          "answer": answers}):
        ids = await embedded(primary, DOCS)
        async with Client(db_url) as client:
            first = await client.ask("how do I reclaim space from dead tuples?", timeout=WAIT)
            second = await client.ask("how is JSON stored?", timeout=WAIT)
    assert (first.status, second.status) == ("answered", "answered")
    assert first.sources[0]["document_id"] == ids[0] and second.sources[0]["document_id"] == ids[1]
    assert answers.replica is not None and answers.replica.reads["replica"] == 0
    assert answers.replica.reads["primary_unavailable"] >= 1
    await primary.close()


@pytest.mark.anyio
async def test_search_reads_the_standby(dbs, models):
    primary_url, standby_url = dbs
    settings = fast_settings(primary_url, kinds=("embed",))
    primary, standby = await aconn(primary_url), await aconn(standby_url)
    async with running_worker(settings, models, handlers={"embed": EmbedHandler(settings, models)}):
        ids = await embedded(primary, DOCS)
    replica = ReadReplica(standby_url, max_lag_ms=60_000, application_name="pgsynapse-search")
    try:
        hits = await search(primary, models, "binary JSON storage", k=2, replica=replica)
        [read] = await last_reads(standby, "pgsynapse-search")
    finally:
        await replica.aclose()
    assert [h.document_id for h in hits] == [ids[1], ids[0]]
    assert replica.reads == {"replica": 1, "primary_lagging": 0, "primary_unavailable": 0}
    # its last read (hybrid, the default: the kNN, then the full-text ranks) was on the standby too
    assert "ORDER BY e.embedding" in read or "to_tsvector('english'" in read, read
    await primary.close()
    await standby.close()


def test_status_shows_how_far_the_standby_is_behind(dbs):
    primary_url, standby_url = dbs
    with psycopg.connect(primary_url, autocommit=True, row_factory=dict_row) as primary, \
            psycopg.connect(standby_url, autocommit=True) as standby:
        healthy = snapshot(primary, read_url=standby_url)["read_replica"]
        assert healthy["in_recovery"] and healthy["paused"] is False, healthy
        standby.execute("SELECT pg_wal_replay_pause()")
        try:
            primary.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('t', 'written while paused')")
            snap = snapshot(primary, read_url=standby_url)
        finally:
            standby.execute("SELECT pg_wal_replay_resume()")
        r = snap["read_replica"]
        assert r["in_recovery"] and r["paused"] and r["behind_bytes"] > 0, r
        assert "bytes of WAL behind" in render(snap) and "REPLAY PAUSED" in render(snap)
        # the primary itself as the "replica": said plainly, not read
        assert "NOT A REPLICA" in render(snapshot(primary, read_url=primary_url))
        assert "UNREACHABLE" in render(snapshot(primary, read_url="host=/nonexistent-pgsynapse dbname=x"))
