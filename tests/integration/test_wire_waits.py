"""The worker never leaves the server waiting on it inside a statement: no COPY FROM STDIN, no pipeline.

Cut off from the database there (a network partition), the worker's backend would keep its transaction, and the
row locks of the jobs it was writing, until the server's TCP keepalive gave up: ``idle_in_transaction_session_timeout``
(db.bounded_transaction) is armed only at a ReadyForQuery, and a backend blocked reading its client is not
cancelled by ``statement_timeout``. No other worker could take those jobs over (seen in
tests/chaos/test_chaos_partition.py: B waited on a backend stuck in the embed writer's COPY). A real worker runs
every kind it has here (embed, answer, backfill of an added model, embed_image) through a forwarder that reads the
server's side of the protocol."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from pgsynapse.images import registry
from pgsynapse.learning.registry import add_model
from tests.chaos.invariants import QUIET
from tests.chaos.partition import Forwarder
from tests.embed_models import tiny_embedding_model
from tests.helpers import aconn, insert_docs, spawn_worker, wait_until
from tests.image_models import COLOURS, coloured_image, png_bytes

pytestmark = pytest.mark.anyio


async def test_no_kind_leaves_the_server_waiting_on_the_worker_inside_a_statement(db_url, tiny_clip_path, tmp_path):
    forwarder = Forwarder("127.0.0.1", conninfo_to_dict(db_url))
    forwarder.start()
    conn = await aconn(db_url)
    worker = None
    try:
        with psycopg.connect(db_url, autocommit=True) as sconn:
            registry.add(sconn, tiny_clip_path)
            sconn.execute("INSERT INTO pgsynapse.images (data) SELECT unnest(%s::bytea[])",
                          ([png_bytes(coloured_image(c, seed=i)) for i, c in enumerate(list(COLOURS)[:3])],))
        insert_docs(db_url, [(f"Doc {i}", f"Document {i} is about table {i}, its index and its rows.") for i in range(12)])
        with psycopg.connect(db_url, autocommit=True) as sconn:  # asked twice: the second is a query-cache hit
            sconn.execute("INSERT INTO pgsynapse.questions (text) SELECT unnest(%s::text[])",
                          (["What is table 3 about?", "Which document covers indexes?"],))
        worker = spawn_worker(forwarder.url(db_url), env={"PGSYNAPSE_BACKFILL_BATCH": "4"})
        await wait_until(conn, QUIET)
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sconn:
            sconn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('What is table 3 about?')")
            version = add_model(sconn, tiny_embedding_model(tmp_path / "tiny-32", 32), name="tiny-32")["id"]
        await wait_until(conn, "SELECT backfilled_at IS NOT NULL AND NOT runtime_pending"
                               " FROM pgsynapse.model_versions WHERE id = %s", (version,))
        await wait_until(conn, QUIET)
        done = await (await conn.execute(
            "SELECT array_agg(DISTINCT kind ORDER BY kind) AS kinds FROM pgsynapse.jobs WHERE status = 'done'")).fetchone()
    finally:
        if worker is not None:
            assert worker.stop(60) == 0, worker.tail()
        forwarder.stop()
        await conn.close()
    assert {"answer", "backfill", "embed", "embed_image"} <= set(done["kinds"]), done
    assert forwarder.connections > 0
    waits = forwarder.mid_statement_waits
    assert not waits, f"the server waited on the worker inside a statement (connection, what): {waits[:10]}"
