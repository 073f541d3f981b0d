"""Stale-write guards of answers and backfills: a result computed from a row that changed while the job ran is
never written over the newer row. Each test drives the worker's steps by hand (claim, load, compute, then the
row changes, then the write), so the interleaving is certain without any timing."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import anyio
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from structlog.testing import capture_logs

from pgsynapse.handlers.base import Outcome
from pgsynapse.handlers.embed import EmbedHandler
from pgsynapse.learning.registry import retire
from pgsynapse.listener.worker import Worker
from pgsynapse.images import registry as image_registry
from tests.chaos.invariants import check, install_audit
from tests.helpers import aconn, fast_settings, insert_docs, running_worker, wait_until
from tests.image_models import coloured_image, png_bytes

pytestmark = pytest.mark.anyio

ALL_ANSWERED = "SELECT count(*) = 0 FROM pgsynapse.questions WHERE status = 'pending'"
ALL_EMBEDDED = "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'"


@contextlib.asynccontextmanager
async def stepped_worker(settings, models) -> AsyncIterator[Worker]:
    """A worker with its pool open and no loops running: the test calls claim, load, compute and write itself."""
    worker = Worker(settings, settings.database_url, models=models)
    worker.pool = AsyncConnectionPool(settings.database_url, min_size=1, max_size=2, open=False,
                                      kwargs={"row_factory": dict_row, "autocommit": True}, configure=worker._configure)
    await worker.pool.open()
    try:
        yield worker
    finally:
        await worker.pool.close()


async def _run_until_write(worker: Worker, kind: str) -> list[Outcome]:
    jobs = await worker.claim(kind, 10)
    assert jobs
    handler = worker.handlers[kind]
    async with worker.pool.connection() as c:
        work, known = await handler.load(c, jobs)
    return known + handler.compute(work)


async def _jobs(conn, kind: str) -> list[dict]:
    return list(await (await conn.execute(
        "SELECT status, skip_reason, last_error FROM pgsynapse.jobs WHERE kind = %s ORDER BY id", (kind,))).fetchall())


async def test_an_answer_to_the_old_text_is_superseded_and_the_edited_question_is_answered_anew(db_url, models):
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    insert_docs(db_url, [("Vacuum", "VACUUM reclaims storage occupied by dead tuples."),
                         ("Indexes", "CREATE INDEX constructs an index. A unique index rejects duplicate values.")])
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await wait_until(conn, ALL_EMBEDDED)
    row = await (await conn.execute(
        "INSERT INTO pgsynapse.questions (text) VALUES ('how do I reclaim storage from dead tuples?') RETURNING id")).fetchone()
    async with stepped_worker(settings, models) as worker:
        outcomes = await _run_until_write(worker, "answer")
        assert outcomes[0].ok
        # the application edits the question while its answer is being computed
        await conn.execute("UPDATE pgsynapse.questions SET text = 'how do I make a unique index?' WHERE id = %s",
                           (row["id"],))
        await worker.writer.write("answer", worker.handlers["answer"], outcomes)
    q = await (await conn.execute("SELECT status, answer FROM pgsynapse.questions WHERE id = %s", (row["id"],))).fetchone()
    assert q == {"status": "pending", "answer": None}
    jobs = await _jobs(conn, "answer")
    assert [j["status"] for j in jobs] == ["done", "pending"] and "superseded" in jobs[0]["skip_reason"]
    # the new text is answered by the job its UPDATE queued
    async with running_worker(settings, models):
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
    q = await (await conn.execute("SELECT status, answer, retrieval_query FROM pgsynapse.questions WHERE id = %s",
                                  (row["id"],))).fetchone()
    await conn.close()
    assert q["status"] == "answered" and q["retrieval_query"] == "how do I make a unique index?"
    assert "unique index" in q["answer"].lower()


async def test_editing_an_answered_question_clears_its_answer_and_answers_it_again(db_url, models):
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    async with running_worker(settings, models):
        row = await (await conn.execute(
            "INSERT INTO pgsynapse.questions (text) VALUES ('what is vacuum?') RETURNING id")).fetchone()
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
        await conn.execute("UPDATE pgsynapse.questions SET session_id = 'x' WHERE id = %s", (row["id"],))
        assert len(await _jobs(conn, "answer")) == 1  # other columns do not queue a job
        await conn.execute("UPDATE pgsynapse.questions SET text = 'what is a savepoint?' WHERE id = %s", (row["id"],))
        edited = await (await conn.execute("SELECT status, answer FROM pgsynapse.questions WHERE id = %s",
                                           (row["id"],))).fetchone()
        assert edited == {"status": "pending", "answer": None}
        await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
    q = await (await conn.execute("SELECT status, retrieval_query FROM pgsynapse.questions WHERE id = %s",
                                  (row["id"],))).fetchone()
    assert q == {"status": "answered", "retrieval_query": "what is a savepoint?"}
    assert [j["status"] for j in await _jobs(conn, "answer")] == ["done", "done"]
    await conn.close()


async def test_an_application_role_edits_a_question_and_its_edit_queues_the_new_answer(db_url, pg_url, models):
    """The enqueue trigger runs with its owner's rights: pgsynapse_app has no privilege on the jobs table."""
    role = f"pgsynapse_t_edit_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN IN ROLE pgsynapse_app')
    params = {k: v for k, v in conninfo_to_dict(db_url).items() if k != "password"}
    conn = await aconn(db_url)
    try:
        with psycopg.connect(make_conninfo(**{**params, "user": role}), autocommit=True) as app:
            async with running_worker(fast_settings(db_url), models):
                [qid] = app.execute("INSERT INTO pgsynapse.questions (text) VALUES ('what is vacuum?') RETURNING id").fetchone()
                await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
                app.execute("UPDATE pgsynapse.questions SET text = 'what is a savepoint?' WHERE id = %s", (qid,))
                await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute("SELECT count(*) FROM pgsynapse.jobs")
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f'DROP ROLE "{role}"')
    q = await (await conn.execute("SELECT status, retrieval_query FROM pgsynapse.questions")).fetchone()
    jobs = await _jobs(conn, "answer")
    await conn.close()
    assert q == {"status": "answered", "retrieval_query": "what is a savepoint?"}
    assert [j["status"] for j in jobs] == ["done", "done"]


async def test_a_final_failure_of_the_old_text_leaves_the_edited_question_to_its_new_job(db_url, models):
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    row = await (await conn.execute(
        "INSERT INTO pgsynapse.questions (text) VALUES ('what is vacuum?') RETURNING id")).fetchone()
    async with stepped_worker(settings, models) as worker:
        [job] = await worker.claim("answer", 10)
        await conn.execute("UPDATE pgsynapse.questions SET text = 'what is a savepoint?' WHERE id = %s", (row["id"],))
        # the old text's job fails for good (an input error is never retried)
        await worker.writer.write("answer", worker.handlers["answer"],
                            [Outcome(job, error="InputError: something about the old text", retry=False)])
    q = await (await conn.execute("SELECT status, error FROM pgsynapse.questions WHERE id = %s", (row["id"],))).fetchone()
    assert q == {"status": "pending", "error": None}
    assert [j["status"] for j in await _jobs(conn, "answer")] == ["failed", "pending"]
    await conn.close()


async def test_a_backfill_batch_of_a_version_retired_meanwhile_is_superseded(db_url, models):
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    insert_docs(db_url, [(f"Doc {i}", f"Document {i} about checkpoints and the write-ahead log.") for i in range(3)])
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await wait_until(conn, ALL_EMBEDDED)
    # a candidate version whose backfill starts now (the same weights: what matters is the guard)
    await conn.execute(
        "INSERT INTO pgsynapse.model_versions (id, name, base_version_id, artifact_path, dim, status)"
        " SELECT 2, 'candidate', 1, artifact_path, dim, 'candidate' FROM pgsynapse.model_versions WHERE id = 1")
    await conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id) VALUES ('backfill', 2)")
    async with stepped_worker(settings, models) as worker:
        outcomes = await _run_until_write(worker, "backfill")
        assert outcomes[0].ok and len(outcomes[0].result[1]) == 3
        with psycopg.connect(db_url, row_factory=dict_row) as admin:
            retire(admin, 2)  # while the batch computes
        await worker.writer.write("backfill", worker.handlers["backfill"], outcomes)
    n = await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.embeddings WHERE model_version_id = 2")).fetchone()
    jobs = await _jobs(conn, "backfill")
    await conn.close()
    assert n["n"] == 0
    # superseded, and no next step queued for a retired version
    assert len(jobs) == 1 and jobs[0]["status"] == "done" and "superseded" in jobs[0]["skip_reason"]


async def test_a_final_failure_of_the_old_text_leaves_the_edited_document_to_its_new_job(db_url, models):
    """An embed job fails for good while the document was edited: the row stays pending for its new job, and no
    'failed' NOTIFY tells the application otherwise."""
    conn = await aconn(db_url)
    await conn.execute("LISTEN pgsynapse_documents")
    [doc] = insert_docs(db_url, [("Old", "The text whose job fails.")])
    async with stepped_worker(fast_settings(db_url), models) as worker:
        [job] = await worker.claim("embed", 10)
        await conn.execute("UPDATE pgsynapse.documents SET body = 'The corrected text.' WHERE id = %s", (doc,))
        await worker.writer.write("embed", worker.handlers["embed"], [Outcome(job, error="ValueError: bad", retry=False)])
    row = await (await conn.execute("SELECT status, error FROM pgsynapse.documents WHERE id = %s", (doc,))).fetchone()
    assert (row["status"], row["error"]) == ("pending", None)
    assert [n.payload async for n in conn.notifies(timeout=0.5)] == []  # nothing delivered: the commit is long done
    async with running_worker(fast_settings(db_url), models):
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,))
    await conn.close()


async def test_a_document_changed_between_claim_and_load_is_embedded_once_not_by_both_jobs(db_url, models):
    """The first job is claimed (running), then the text changes: the UPDATE queues a second job, and the first
    job, loading after the change, embeds the new text. The second job then has nothing left to do: it must not
    write the same chunks again (found by the kill -9 loop's write audit, 1 run in several)."""
    install_audit(db_url)
    [doc] = insert_docs(db_url, [("Vacuum", "VACUUM reclaims storage occupied by dead tuples.")])
    conn = await aconn(db_url)
    async with stepped_worker(fast_settings(db_url), models) as worker:
        [first] = await worker.claim("embed", 10)
        await conn.execute("UPDATE pgsynapse.documents SET body = 'VACUUM FULL rewrites the whole table.' WHERE id = %s",
                           (doc,))
        handler = worker.handlers["embed"]
        async with worker.pool.connection() as c:
            work, known = await handler.load(c, [first])
        await worker.writer.write("embed", handler, known + handler.compute(work))
        # the second job, queued by the UPDATE, runs after the first wrote the new text
        second = await _run_until_write(worker, "embed")
        await worker.writer.write("embed", handler, second)
        # two loops: a job claimed, the text changed, the new job claimed too, and both load the newest text
        await conn.execute("UPDATE pgsynapse.documents SET body = 'VACUUM ANALYZE also updates statistics.' WHERE id = %s",
                           (doc,))
        [third] = await worker.claim("embed", 10)
        await conn.execute("UPDATE pgsynapse.documents SET body = 'VACUUM VERBOSE prints a report.' WHERE id = %s", (doc,))
        [fourth] = await worker.claim("embed", 10)
        async with worker.pool.connection() as c:
            work3, _ = await handler.load(c, [third])
            work4, _ = await handler.load(c, [fourth])
        out3, out4 = handler.compute(work3), handler.compute(work4)
        await worker.writer.write("embed", handler, out3)
        await worker.writer.write("embed", handler, out4)
    v = check(db_url)["violations"]
    row = await (await conn.execute("SELECT status, body, embedded_hash = content_hash AS current FROM pgsynapse.documents"
                                    " WHERE id = %s", (doc,))).fetchone()
    jobs = await _jobs(conn, "embed")
    await conn.close()
    assert (v["chunks_written_twice"], v["documents_not_current"]) == (0, 0), v
    assert row == {"status": "embedded", "body": "VACUUM VERBOSE prints a report.", "current": True}
    assert [j["status"] for j in jobs] == ["done"] * 4


async def test_an_image_changed_between_claim_and_load_is_embedded_once(db_url, models, tiny_clip_path):
    install_audit(db_url)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        image_registry.add(sync, tiny_clip_path)
        img = sync.execute("INSERT INTO pgsynapse.images (data) VALUES (%s) RETURNING id",
                           (png_bytes(coloured_image("red", seed=1)),)).fetchone()["id"]
    conn = await aconn(db_url)
    async with stepped_worker(fast_settings(db_url, kinds=("embed_image",)), models) as worker:
        handler = worker.handlers["embed_image"]
        [first] = await worker.claim("embed_image", 10)
        await conn.execute("UPDATE pgsynapse.images SET data = %s WHERE id = %s", (png_bytes(coloured_image("blue", seed=2)), img))
        [second] = await worker.claim("embed_image", 10)  # two loops: both load the blue image
        async with worker.pool.connection() as c:
            work1, _ = await handler.load(c, [first])
            work2, _ = await handler.load(c, [second])
        out1, out2 = handler.compute(work1), handler.compute(work2)
        await worker.writer.write("embed_image", handler, out1)
        await worker.writer.write("embed_image", handler, out2)
    v = check(db_url)["violations"]
    jobs = await _jobs(conn, "embed_image")
    await conn.close()
    assert (v["image_embeddings_written_twice"], v["images_not_current"], v["images_missing_embeddings"]) == (0, 0, 0), v
    assert [j["status"] for j in jobs] == ["done", "done"]


async def test_an_embed_batch_skips_a_version_retired_while_it_computed(db_url, models):
    """A retire drops the version's partition of pgsynapse.embeddings (migration 0019): a batch that computed vectors
    for it writes the other versions' and the document, instead of failing on a row with no partition (tried:
    without the live-version check the write raises 'no partition of relation "embeddings" found for row')."""
    settings = fast_settings(db_url, kinds=("embed",))
    conn = await aconn(db_url)
    await conn.execute(
        "INSERT INTO pgsynapse.model_versions (id, name, base_version_id, artifact_path, dim, status)"
        " SELECT 2, 'candidate', 1, artifact_path, dim, 'candidate' FROM pgsynapse.model_versions WHERE id = 1")
    [doc] = insert_docs(db_url, [("Checkpoints", "A checkpoint flushes dirty pages and writes a checkpoint record.")])
    async with stepped_worker(settings, models) as worker:
        outcomes = await _run_until_write(worker, "embed")
        assert outcomes[0].ok and set(outcomes[0].result.vectors) == {1, 2}
        with psycopg.connect(db_url, row_factory=dict_row) as admin:
            retire(admin, 2)  # while the batch computes
        await worker.writer.write("embed", worker.handlers["embed"], outcomes)
    per_version = {r["v"]: r["n"] for r in await (await conn.execute(
        "SELECT model_version_id AS v, count(*) AS n FROM pgsynapse.embeddings GROUP BY 1")).fetchall()}
    row = await (await conn.execute("SELECT status FROM pgsynapse.documents WHERE id = %s", (doc,))).fetchone()
    jobs = await _jobs(conn, "embed")
    await conn.close()
    assert row["status"] == "embedded" and list(per_version) == [1] and per_version[1] >= 1
    assert [j["status"] for j in jobs] == ["done"]


async def test_a_retryable_failure_of_the_old_text_is_superseded_by_the_edits_job(db_url, models):
    """An embed job fails with a retryable error while the document was edited: the edit's pending job has the new
    text, so the failed one is closed as superseded at once (not retried, not left running until its lease
    expires) and its batch-mates are written in the same transaction."""
    settings = fast_settings(db_url, lease_seconds=600.0)
    conn = await aconn(db_url)
    [doc, mate] = insert_docs(db_url, [("Old", "The text whose job fails."), ("Mate", "A healthy neighbour.")])
    async with stepped_worker(settings, models) as worker:
        jobs = await worker.claim("embed", 10)
        by_ref = {j.ref_id: j for j in jobs}
        handler = worker.handlers["embed"]
        async with worker.pool.connection() as c:
            work, _ = await handler.load(c, [by_ref[mate]])
        await conn.execute("UPDATE pgsynapse.documents SET body = 'The corrected text.' WHERE id = %s", (doc,))
        with capture_logs() as logs:
            await worker.writer.write("embed", handler, [Outcome(by_ref[doc], error="RuntimeError: model busy"),
                                                         *handler.compute(work)])
        # both jobs are done (one written, one superseded): counted as processed, neither retried nor failed
        stats = worker.stats
        assert (stats.processed, stats.retried, stats.failed) == ({"embed": 2}, {}, {}), stats
    events = [e["event"] for e in logs]
    assert "job_write_failed" not in events and "batch_write_failed_splitting" not in events, logs
    jobs = await (await conn.execute("SELECT ref_id, status, skip_reason, last_error FROM pgsynapse.jobs"
                                     " WHERE kind = 'embed' ORDER BY id")).fetchall()
    assert [(j["ref_id"], j["status"]) for j in jobs] == [(doc, "done"), (mate, "done"), (doc, "pending")]
    assert "model busy" in jobs[0]["skip_reason"] and jobs[0]["last_error"] is None
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,))
    await conn.close()


async def test_an_edit_committed_after_its_pending_job_was_claimed_and_loaded_is_still_embedded(db_url, models):
    """The application's transaction edits a document whose job is pending: the trigger queues nothing (the pending
    job will read the row). A worker claims that job and loads the row before the transaction commits, so it
    computes the old text, which the write then refuses as stale. The new text must still get its job."""
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    [doc] = insert_docs(db_url, [("Vacuum", "VACUUM reclaims storage occupied by dead tuples.")])
    async with stepped_worker(settings, models) as worker, await aconn(db_url) as app:
        await app.set_autocommit(False)
        await app.execute("UPDATE pgsynapse.documents SET body = 'VACUUM FULL rewrites the whole table.' WHERE id = %s",
                          (doc,))
        outcomes = await _run_until_write(worker, "embed")  # claimed and loaded before the edit commits
        await app.commit()
        await worker.writer.write("embed", worker.handlers["embed"], outcomes)
    jobs = await _jobs(conn, "embed")
    assert [j["status"] for j in jobs] == ["done", "pending"], jobs
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT embedded_hash = content_hash FROM pgsynapse.documents WHERE id = %s", (doc,))
    await conn.close()


async def test_an_edit_committed_after_its_pending_job_was_claimed_and_loaded_is_still_answered(db_url, models):
    settings = fast_settings(db_url)
    conn = await aconn(db_url)
    row = await (await conn.execute(
        "INSERT INTO pgsynapse.questions (text) VALUES ('what is vacuum?') RETURNING id")).fetchone()
    async with stepped_worker(settings, models) as worker, await aconn(db_url) as app:
        await app.set_autocommit(False)
        await app.execute("UPDATE pgsynapse.questions SET text = 'what is a savepoint?' WHERE id = %s", (row["id"],))
        outcomes = await _run_until_write(worker, "answer")
        await app.commit()
        await worker.writer.write("answer", worker.handlers["answer"], outcomes)
    jobs = await _jobs(conn, "answer")
    assert [j["status"] for j in jobs] == ["done", "pending"], jobs
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT status = 'answered' FROM pgsynapse.questions WHERE id = %s", (row["id"],),
                         channel="pgsynapse_answers")
    q = await (await conn.execute("SELECT retrieval_query FROM pgsynapse.questions WHERE id = %s", (row["id"],))).fetchone()
    await conn.close()
    assert q["retrieval_query"] == "what is a savepoint?"


async def test_an_image_changed_in_a_transaction_committed_after_its_load_is_still_embedded(db_url, models,
                                                                                             tiny_clip_path):
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        image_registry.add(sync, tiny_clip_path)
        img = sync.execute("INSERT INTO pgsynapse.images (data) VALUES (%s) RETURNING id",
                           (png_bytes(coloured_image("red", seed=1)),)).fetchone()["id"]
    settings = fast_settings(db_url, kinds=("embed_image",))
    conn = await aconn(db_url)
    async with stepped_worker(settings, models) as worker, await aconn(db_url) as app:
        await app.set_autocommit(False)
        await app.execute("UPDATE pgsynapse.images SET data = %s WHERE id = %s", (png_bytes(coloured_image("blue", seed=2)), img))
        outcomes = await _run_until_write(worker, "embed_image")
        await app.commit()
        await worker.writer.write("embed_image", worker.handlers["embed_image"], outcomes)
    assert [j["status"] for j in await _jobs(conn, "embed_image")] == ["done", "pending"]
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT embedded_hash = content_hash FROM pgsynapse.images WHERE id = %s", (img,),
                         channel="pgsynapse_images")
    await conn.close()


async def test_a_final_failure_of_a_text_edited_in_a_transaction_committed_after_its_load_is_superseded(db_url, models):
    """The body is over max_document_chars: the job fails for good. The application's transaction shortens it, and
    commits after the worker claimed and read the row (the trigger found the job pending and queued none): the
    failure is the old text's. The job is superseded, the new text gets a job, and the row is never failed."""
    settings = fast_settings(db_url, max_document_chars=40)
    conn = await aconn(db_url)
    [doc] = insert_docs(db_url, [("Vacuum", "VACUUM reclaims storage occupied by dead tuples, and much more.")])
    async with stepped_worker(settings, models) as worker, await aconn(db_url) as app:
        await app.set_autocommit(False)
        await app.execute("UPDATE pgsynapse.documents SET body = 'VACUUM reclaims storage.' WHERE id = %s", (doc,))
        outcomes = await _run_until_write(worker, "embed")
        assert "body has" in (outcomes[0].error or ""), outcomes
        await app.commit()
        await worker.writer.write("embed", worker.handlers["embed"], outcomes)
        # superseded, not failed: counted with the jobs done (status, metrics), not with the failed ones
        assert (worker.stats.processed, worker.stats.failed) == ({"embed": 1}, {}), worker.stats
    row = await (await conn.execute("SELECT status, error FROM pgsynapse.documents WHERE id = %s", (doc,))).fetchone()
    assert (row["status"], row["error"]) == ("pending", None)
    jobs = await _jobs(conn, "embed")
    assert [j["status"] for j in jobs] == ["done", "pending"], jobs
    assert "body has" in jobs[0]["skip_reason"] and jobs[0]["last_error"] is None
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT embedded_hash = content_hash FROM pgsynapse.documents WHERE id = %s", (doc,))
    await conn.close()


async def test_a_final_failure_of_a_question_edited_in_a_transaction_committed_after_its_load_is_superseded(db_url,
                                                                                                         models):
    settings = fast_settings(db_url, max_question_chars=20)
    conn = await aconn(db_url)
    row = await (await conn.execute("INSERT INTO pgsynapse.questions (text)"
                                    " VALUES ('how does vacuum reclaim storage?') RETURNING id")).fetchone()
    async with stepped_worker(settings, models) as worker, await aconn(db_url) as app:
        await app.set_autocommit(False)
        await app.execute("UPDATE pgsynapse.questions SET text = 'what is vacuum?' WHERE id = %s", (row["id"],))
        outcomes = await _run_until_write(worker, "answer")
        assert "over max_question_chars" in (outcomes[0].error or ""), outcomes
        await app.commit()
        await worker.writer.write("answer", worker.handlers["answer"], outcomes)
    q = await (await conn.execute("SELECT status, error FROM pgsynapse.questions WHERE id = %s", (row["id"],))).fetchone()
    assert (q["status"], q["error"]) == ("pending", None)
    assert [j["status"] for j in await _jobs(conn, "answer")] == ["done", "pending"]
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT status = 'answered' FROM pgsynapse.questions WHERE id = %s", (row["id"],),
                         channel="pgsynapse_answers")
    await conn.close()


async def test_a_final_failure_of_an_image_changed_in_a_transaction_committed_after_its_load_is_superseded(
        db_url, models, tiny_clip_path):
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        image_registry.add(sync, tiny_clip_path)
        img = sync.execute("INSERT INTO pgsynapse.images (data) VALUES (%s) RETURNING id",
                           (png_bytes(coloured_image("red", seed=1)) + b"\0" * 8000,)).fetchone()["id"]  # over the limit
    settings = fast_settings(db_url, kinds=("embed_image",), max_image_bytes=8000)
    conn = await aconn(db_url)
    async with stepped_worker(settings, models) as worker, await aconn(db_url) as app:
        await app.set_autocommit(False)
        await app.execute("UPDATE pgsynapse.images SET data = %s WHERE id = %s", (png_bytes(coloured_image("blue", seed=2)), img))
        outcomes = await _run_until_write(worker, "embed_image")
        assert "over max_image_bytes" in (outcomes[0].error or ""), outcomes
        await app.commit()
        await worker.writer.write("embed_image", worker.handlers["embed_image"], outcomes)
    row = await (await conn.execute("SELECT status, error FROM pgsynapse.images WHERE id = %s", (img,))).fetchone()
    assert (row["status"], row["error"]) == ("pending", None)
    assert [j["status"] for j in await _jobs(conn, "embed_image")] == ["done", "pending"]
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT embedded_hash = content_hash FROM pgsynapse.images WHERE id = %s", (img,),
                         channel="pgsynapse_images")
    await conn.close()


async def test_a_final_failure_of_a_data_question_edited_in_a_transaction_committed_after_its_load_is_superseded(
        db_url, models):
    settings = fast_settings(db_url, max_question_chars=20)
    conn = await aconn(db_url)
    row = await (await conn.execute("INSERT INTO pgsynapse.data_questions (text)"
                                    " VALUES ('how many orders were shipped last week?') RETURNING id")).fetchone()
    async with stepped_worker(settings, models) as worker, await aconn(db_url) as app:
        await app.set_autocommit(False)
        await app.execute("UPDATE pgsynapse.data_questions SET text = 'how many orders?' WHERE id = %s", (row["id"],))
        outcomes = await _run_until_write(worker, "sql_answer")
        assert "over max_question_chars" in (outcomes[0].error or ""), outcomes
        await app.commit()
        await worker.writer.write("sql_answer", worker.handlers["sql_answer"], outcomes)
    q = await (await conn.execute("SELECT status, error FROM pgsynapse.data_questions WHERE id = %s",
                                  (row["id"],))).fetchone()
    jobs = await _jobs(conn, "sql_answer")
    await conn.close()
    assert (q["status"], q["error"]) == ("pending", None)
    assert [j["status"] for j in jobs] == ["done", "pending"]  # the new text's job (answering it needs a SQL model)


async def test_two_workers_writing_and_failing_the_same_rows_in_opposite_roles_take_their_locks_in_one_order(
        db_url, models):
    """Two workers hold jobs of the same two documents (each was edited after the first worker's claim). The first
    writes one and fails the other for good, the second the other way round. Each write locks the rows it writes and
    the rows it fails: taken in one order (by row) in both, the second waits for the first; taken as they came (the
    write's rows, then the failed ones), each waits for the other and PostgreSQL aborts one as a deadlock."""
    settings = fast_settings(db_url, lease_seconds=600.0)
    conn = await aconn(db_url)
    docs = insert_docs(db_url, [("One", "The first document."), ("Two", "The second document.")])
    async with stepped_worker(settings, models) as first, stepped_worker(settings, models) as second:
        old = await _run_until_write(first, "embed")
        for doc in docs:
            await conn.execute("UPDATE pgsynapse.documents SET body = body || ' Edited.' WHERE id = %s", (doc,))
        new = await _run_until_write(second, "embed")

        def roles(outcomes: list[Outcome], written: int) -> list[Outcome]:
            # the job of row ``written`` keeps its result; the other fails for good (its row read as other content)
            return [o if o.job.ref_id == written else Outcome(o.job, error="RuntimeError: boom", retry=False,
                                                              read_hash="the text it read")
                    for o in outcomes]

        handler = first.handlers["embed"]
        paused, release = anyio.Event(), anyio.Event()
        write = handler.write

        async def held_write(c, outcomes):  # the first holds what its write locked until the second waits for it
            report = await write(c, outcomes)
            paused.set()
            await release.wait()
            return report

        handler.write = held_write  # type: ignore[method-assign]
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(first.writer.write, "embed", handler, roles(old, docs[0]))
                await paused.wait()
                tg.start_soon(second.writer.write, "embed", second.handlers["embed"], roles(new, docs[1]))
                await wait_until(conn, "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database()"
                                       " AND wait_event_type = 'Lock'", channel="pgsynapse_jobs")
                release.set()
    retried = [e for e in logs if e["event"] in ("batch_write_retrying", "batch_write_failed_splitting")]
    assert not retried, retried
    rows = await (await conn.execute("SELECT id, status FROM pgsynapse.documents ORDER BY id")).fetchall()
    assert [r["status"] for r in rows] == ["pending", "embedded"], rows  # the first's result was stale
    await conn.close()


class RolledBackOnceEmbedHandler(EmbedHandler):
    """The real handler with two faults: a body containing POISON makes the encode raise (a retryable error), and the
    first write transaction is ended by the server with a serialization failure (40001), as a lost race is: the
    writer writes the same outcomes again in a new transaction."""

    rollbacks = 0

    def _encode(self, items, embedders):
        if any("POISON" in (item.body or "") for item in items):
            raise ValueError("cannot encode a poisoned document")
        return super()._encode(items, embedders)

    async def notify_written(self, conn, report, jobs) -> None:
        await super().notify_written(conn, report, jobs)
        if not self.rollbacks:
            self.rollbacks += 1
            await conn.execute("DO $$ BEGIN RAISE EXCEPTION 'could not serialize access (test)'"
                               " USING ERRCODE = 'serialization_failure'; END $$")


async def test_a_batch_written_again_after_a_rollback_counts_each_job_once_and_logs_what_became_of_it(db_url, models):
    """One batch: a healthy document, one whose encode fails (retried), one over max_document_chars (failed for good).
    Its write transaction is rolled back once and written again: each job counts once in the stats (the metrics'
    jobs_retried and jobs_failed), and batch_processed's failed= counts the job failed for good, not every error."""
    settings = fast_settings(db_url, max_document_chars=60, lease_seconds=600.0)
    conn = await aconn(db_url)
    insert_docs(db_url, [("Fine", "VACUUM reclaims storage."), ("Poisoned", "POISON inside."),
                         ("Long", "A body over sixty characters long, which this worker refuses at once.")])
    handler = RolledBackOnceEmbedHandler(settings, models)
    async with stepped_worker(settings, models) as worker:
        worker.handlers["embed"] = handler
        jobs = await worker.claim("embed", 10)
        assert len(jobs) == 3
        with capture_logs() as logs:
            await worker.process_batch("embed", jobs)
        assert handler.rollbacks == 1
        assert [e["event"] for e in logs].count("batch_write_retrying") == 1, logs
        stats = worker.stats
        assert (stats.processed, stats.retried, stats.failed) == ({"embed": 1}, {"embed": 1}, {"embed": 1}), stats
    [done] = [{k: e[k] for k in ("n", "ok", "retried", "failed")} for e in logs if e["event"] == "batch_processed"]
    assert done == {"n": 3, "ok": 1, "retried": 1, "failed": 1}, done
    rows = await (await conn.execute("SELECT d.title, j.status FROM pgsynapse.jobs j JOIN pgsynapse.documents d"
                                     " ON d.id = j.ref_id ORDER BY j.id")).fetchall()
    assert [(r["title"], r["status"]) for r in rows] == [("Fine", "done"), ("Poisoned", "pending"), ("Long", "failed")]
    await conn.close()


@pytest.mark.parametrize("restart", [False, True], ids=["truncate", "restart_identity"])
async def test_a_truncate_while_jobs_run_writes_nothing_back_and_closes_them(db_url, models, restart):
    """TRUNCATE of documents and questions (CASCADE) while their jobs are computed: the writes find their rows gone
    and are closed without a word of error, nothing is written back; after RESTART IDENTITY the new rows that take
    the same ids get their own results, never the truncated rows'."""
    [doc] = insert_docs(db_url, [("Vacuum", "VACUUM reclaims storage occupied by dead tuples.")])
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await wait_until(conn, ALL_EMBEDDED)
    await conn.execute("UPDATE pgsynapse.documents SET body = 'VACUUM FULL rewrites the whole table.' WHERE id = %s",
                       (doc,))
    await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('how do I reclaim storage from dead tuples?')")
    async with stepped_worker(fast_settings(db_url), models) as worker:
        with capture_logs() as logs:
            outcomes = {kind: await _run_until_write(worker, kind) for kind in ("embed", "answer")}
            await conn.execute(f"TRUNCATE pgsynapse.documents, pgsynapse.questions {'RESTART IDENTITY' * restart} CASCADE")
            if restart:  # new rows of the same ids, with other texts: their INSERTs queue their own jobs
                insert_docs(db_url, [("Indexes", "CREATE INDEX constructs an index on a table.")])
                await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('how do I build an index?')")
            for kind, out in outcomes.items():
                await worker.writer.write(kind, worker.handlers[kind], out)
        old = {kind: [o.job.id for o in out] for kind, out in outcomes.items()}
    jobs = {r["id"]: r for r in await (await conn.execute(
        "SELECT id, status, skip_reason, last_error FROM pgsynapse.jobs WHERE id = ANY(%s)",
        ([i for ids in old.values() for i in ids],))).fetchall()}
    written = await (await conn.execute(
        "SELECT (SELECT count(*) FROM pgsynapse.chunks) AS chunks, (SELECT count(*) FROM pgsynapse.questions"
        " WHERE answer IS NOT NULL) AS answers")).fetchone()
    assert written == {"chunks": 0, "answers": 0}, written
    assert all(j["status"] == "done" and j["skip_reason"] and j["last_error"] is None for j in jobs.values()), jobs
    assert not [e for e in logs if e["log_level"] in ("warning", "error", "critical")], logs
    if restart:  # the new rows are embedded and answered from their own text
        async with running_worker(fast_settings(db_url), models):
            await wait_until(conn, ALL_EMBEDDED)
            await wait_until(conn, ALL_ANSWERED, channel="pgsynapse_answers")
        row = await (await conn.execute("SELECT d.status, c.text FROM pgsynapse.documents d"
                                        " JOIN pgsynapse.chunks c ON c.document_id = d.id")).fetchone()
        q = await (await conn.execute("SELECT status, retrieval_query FROM pgsynapse.questions")).fetchone()
        assert row["status"] == "embedded" and "CREATE INDEX" in row["text"], row
        assert q == {"status": "answered", "retrieval_query": "how do I build an index?"}, q
    await conn.close()


@pytest.mark.parametrize("remove", ["DELETE FROM pgsynapse.questions", "TRUNCATE pgsynapse.questions CASCADE"])
async def test_a_job_failing_for_good_after_its_row_was_removed_is_closed_not_failed(db_url, models, remove):
    """A DELETE or TRUNCATE closes the failed jobs of the rows it removes (migrations 0040, 0043), and a pending one
    finds its row gone; one that ran at the time and then failed for good (bad input, its last attempt) was failed:
    `pgsynapse status` listed a failure of a row that no longer exists, and the worker logged job_failed."""
    conn = await aconn(db_url)
    await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('how do I reclaim storage from dead tuples?')")
    async with stepped_worker(fast_settings(db_url, max_question_chars=10), models) as worker:
        with capture_logs() as logs:
            [out] = await _run_until_write(worker, "answer")  # over max_question_chars: an InputError, not retried
            assert out.error and not out.retry, out
            await conn.execute(remove)
            await worker.writer.write("answer", worker.handlers["answer"], [out])
    [job] = await _jobs(conn, "answer")
    await conn.close()
    assert job == {"status": "done", "skip_reason": "its row was deleted", "last_error": None}, job
    assert "job_failed" not in [e["event"] for e in logs], logs
