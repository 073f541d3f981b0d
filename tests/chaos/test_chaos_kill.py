"""kill -9 loop: a worker subprocess is SIGKILLed at event-chosen points while documents (inserts, updates,
deletes) and questions stream in, then restarted; at the end every document has exactly one current set of
embeddings, every question exactly one answer, and no job is lost, left running or done twice."""

from __future__ import annotations

import random
import signal
import time

import psycopg
import pytest

from tests.chaos.invariants import QUIET, assert_exactly_once
from pgsynapse.db import next_notifies
from tests.helpers import SAFETY_TIMEOUT, aconn, spawn_worker, wait_until

pytestmark = pytest.mark.anyio

SEED = 6
# a short lease so killed batches come back fast, small batches so kills land in many of them; otherwise the
# defaults: the default runtime, and max_attempts 5 (a kill in a batch is not charged to its jobs, see
# migration 0008, so only a job killed 5 times while it ran alone would fail)
ENV = {"PGSYNAPSE_LEASE_SECONDS": "1", "PGSYNAPSE_BATCH_SIZE": "8"}


def _body(rng: random.Random, i: int, rev: int = 0) -> str:
    words = " ".join(f"w{rng.randrange(5000)}" for _ in range(rng.randrange(5, 40)))
    return f"Document {i} revision {rev}: {words}."


async def _kill_point(rng: random.Random, worker, conn, round_base: int, new_docs: int) -> str:
    """Wait for an event-chosen moment: the k-th batch, the n-th document NOTIFY, or an embedded count."""
    how = rng.choice(["batch_processed", "documents_notify", "embedded_count"])
    if how == "batch_processed":
        k = rng.randrange(1, 3)
        start = len(worker.events)
        for _ in range(k):
            ev = worker.wait_event("batch_processed", start=start)
            start = worker.events.index(ev) + 1
    elif how == "documents_notify":
        # right after a progress NOTIFY (a batch's write committed)
        if not await next_notifies(conn, SAFETY_TIMEOUT):
            raise TimeoutError(f"no progress NOTIFY within the safety timeout: {worker.tail()}")
    else:
        target = round_base + rng.randrange(1, max(2, new_docs // 2))
        await wait_until(conn, "SELECT count(*) >= %s FROM pgsynapse.documents WHERE status = 'embedded'", (target,))
    return how


async def test_kill_9_loop_loses_and_duplicates_nothing(db_url, full, record):
    rng = random.Random(SEED)
    kills_wanted = 30 if full else 10
    per_round = 120 if full else 40
    conn = await aconn(db_url)
    await conn.execute("LISTEN pgsynapse_documents")
    ids: list[int] = []
    kills, interrupted, points, questions = 0, 0, {}, 0
    worker = spawn_worker(db_url, env=ENV)
    try:
        for rnd in range(kills_wanted):
            embedded = (await (await conn.execute(
                "SELECT count(*) AS n FROM pgsynapse.documents WHERE status = 'embedded'")).fetchone())["n"]
            # stream: new documents in one statement, and new text for a few existing ones (new content_hash)
            docs = [(f"Doc {len(ids) + i}", _body(rng, len(ids) + i)) for i in range(per_round)]
            cur = await conn.execute(
                "INSERT INTO pgsynapse.documents (title, body) SELECT * FROM unnest(%s::text[], %s::text[]) RETURNING id",
                ([t for t, _ in docs], [b for _, b in docs]))
            ids += [r["id"] for r in await cur.fetchall()]
            for doc in rng.sample(ids, min(len(ids), 4)):
                await conn.execute("UPDATE pgsynapse.documents SET body = %s WHERE id = %s", (_body(rng, doc, rnd + 1), doc))
            # questions in the same stream: answered from whatever is embedded at the time, exactly once
            await conn.execute(
                "INSERT INTO pgsynapse.questions (session_id, text) SELECT * FROM unnest(%s::text[], %s::text[])",
                ([f"s{rnd % 3}", None, f"s{rnd}"], [f"What does document {rng.randrange(len(ids))} say about w{k}?"
                                                    for k in rng.sample(range(5000), 3)]))
            questions += 3
            if rnd % 4 == 3:
                await conn.execute("DELETE FROM pgsynapse.documents WHERE id = %s", (ids.pop(rng.randrange(len(ids))),))
            t0 = time.monotonic()
            how = await _kill_point(rng, worker, conn, embedded, per_round)
            print(f"round {rnd}: kill at {how} after {time.monotonic() - t0:.1f}s", flush=True)
            worker.proc.send_signal(signal.SIGKILL)
            assert worker.proc.wait(30) == -signal.SIGKILL
            kills += 1
            points[how] = points.get(how, 0) + 1
            running = (await (await conn.execute(
                "SELECT count(*) AS n FROM pgsynapse.jobs WHERE status = 'running'")).fetchone())["n"]
            interrupted += running
            t0 = time.monotonic()
            worker = spawn_worker(db_url, env=ENV)
            print(f"round {rnd}: restarted in {time.monotonic() - t0:.1f}s, {running} jobs were leased", flush=True)
        await wait_until(conn, QUIET)
        result = assert_exactly_once(db_url)
    finally:
        code = worker.stop()
        await conn.close()
    assert code == 0
    # the kills really hit work in flight: leased jobs whose worker died, claimed again after their lease (solo:
    # a job whose lease expired comes back to run alone; see migration 0008)
    assert interrupted > 0
    with psycopg.connect(db_url) as c:
        reclaimed = c.execute("SELECT count(*) FROM pgsynapse.jobs WHERE solo").fetchone()[0]
    assert reclaimed > 0
    t = result["totals"]
    assert t["jobs_failed"] == 0 and t["documents"] == len(ids)
    assert t["questions"] == t["questions_answered"] == questions
    record(kills=kills, kill_points=points, jobs_leased_at_kill=interrupted, jobs_reclaimed=reclaimed,
           jobs_checked=t["jobs"], documents=t["documents"], chunks=t["chunks"], embeddings=t["embeddings"],
           questions_answered=t["questions_answered"], writes_audited=t["writes_audited"],
           lost=result["lost"], duplicated=result["duplicated"])
