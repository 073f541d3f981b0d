"""The ``runtime`` setting: at start a worker moves the active version from torch to the fast runtime, once.

Real export (torch.onnx.export + ONNX Runtime quantisation), a real agreement check, real embeddings.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from functools import partial
from pathlib import Path

import anyio
import numpy as np
import psycopg
import pytest
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.app import ask
from pgsynapse.client import AnswerTimeout
from pgsynapse.db import export_command_name
from pgsynapse.errors import ModelError
from pgsynapse.export import EXPORT_LOCK, optimise_active_version, run_export
from pgsynapse.ingest import worker_note
from pgsynapse.learning.registry import RegistryError, promote
from pgsynapse.listener.worker import Worker
from pgsynapse.models import ModelCache, default_model_path
from pgsynapse.queries import q
from pgsynapse.search import unsearched
from pgsynapse.status import render, snapshot
from tests.embed_models import tiny_embedding_model
from tests.helpers import SAFETY_TIMEOUT, aconn, adopt_runtime, fast_settings, insert_docs, running_worker, wait_until

pytestmark = pytest.mark.anyio

BODY = ("To roll back part of a transaction, set a savepoint with SAVEPOINT name and later issue "
        "ROLLBACK TO SAVEPOINT name; the work done after the savepoint is undone.")


async def _version(conn) -> dict:
    return await (await conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = 1")).fetchone()


async def test_worker_start_moves_the_active_version_to_onnx_int8_once(db_url, models, tmp_path):
    settings = fast_settings(db_url, runtime="onnx-int8", export_sample_chunks=64, data_dir=tmp_path)
    conn = await aconn(db_url)
    [before] = insert_docs(db_url, [("Savepoints", BODY)])
    # embedded on torch first (an existing installation), then the start of an onnx-int8 worker switches
    async with running_worker(fast_settings(db_url), models):
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (before,))
    async with running_worker(settings, models):
        v = await _version(conn)
        record = v["metrics"]["runtime_export"]
        assert v["runtime"] in ("onnx-int8", "onnx"), record  # onnx only when every INT8 scheme was refused
        assert record["requested"] == "onnx-int8" and record["runtime"] == v["runtime"]
        accepted = record["tried"][-1]
        assert accepted["accepted"] and accepted["overlap_at_10"] >= 0.95
        assert Path(v["artifact_path"]).parent == tmp_path / "models"
        assert v["metrics"]["previous_runtime"] == "torch"
        [after] = insert_docs(db_url, [("Savepoints", BODY)])
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (after,))
    rows = await (await conn.execute(
        "SELECT c.document_id, e.embedding::real[] AS v FROM pgsynapse.embeddings e"
        " JOIN pgsynapse.chunks c ON c.id = e.chunk_id WHERE c.document_id = ANY(%s) ORDER BY c.document_id",
        ([before, after],))).fetchall()
    old, new = (np.asarray(r["v"], dtype=np.float32) for r in rows)
    # the same text on torch and on the exported runtime: interchangeable vectors in one index
    assert float(old @ new) > 0.99
    exported = models.get(v)
    assert float(exported.encode(["Savepoints\n" + BODY])[0] @ new) > 0.9999

    # the next start finds the switch done: nothing is exported again
    with capture_logs() as logs:
        async with running_worker(settings, models):
            again = await _version(conn)
    assert again["runtime"] == v["runtime"] and again["metrics"]["runtime_export"] == record
    assert not [e for e in logs if e["event"].startswith("runtime_")]
    # a worker on another host, where the artifact is missing, builds it again from this record, the same bytes:
    # tests/integration/test_relocated_data_dir.py (from the record of the same switch, default_runtime's), and
    # where it goes: tests/unit/test_local_artifact.py
    await conn.close()


async def test_a_failed_export_leaves_torch_serving_and_is_not_retried(db_url, tmp_path):
    """A model the ONNX path cannot take (CLS pooling) keeps torch; the reason is recorded, tried once."""
    model = tmp_path / "cls-model"
    shutil.copytree(default_model_path(), model, ignore=shutil.ignore_patterns("*.onnx", "onnx", "openvino"))
    pooling = model / "1_Pooling" / "config.json"
    cfg = json.loads(pooling.read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(cfg))
    settings = fast_settings(db_url, runtime="onnx-int8", export_sample_chunks=16, data_dir=tmp_path,
                             model_path=str(model))
    models = ModelCache(model_path=str(model))  # the configured model, served on torch
    conn = await aconn(db_url)
    with capture_logs() as logs:
        async with running_worker(settings, models):
            v = await _version(conn)
            [doc] = insert_docs(db_url, [("Savepoints", BODY)])
            await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,))
    assert v["runtime"] == "torch" and v["artifact_path"] is None
    record = v["metrics"]["runtime_export"]
    assert record["requested"] == "onnx-int8" and "mean pooling" in record["error"]
    [failed] = [e for e in logs if e["event"] == "runtime_export_failed"]
    assert "mean pooling" in failed["error"]
    assert list((tmp_path / "models").iterdir()) == []  # the failed attempt's directory is removed
    with capture_logs() as logs:
        async with running_worker(settings, models):
            pass
    assert not [e for e in logs if e["event"].startswith("runtime_export")]
    assert (await _version(conn))["metrics"]["runtime_export"] == record
    await conn.close()


def _register_candidate(url: str, model_path: str | None = None) -> int:
    """Version 2 as the retrain job registers it (on torch, runtime_pending) and its backfill leaves it (every
    chunk embedded, all of the sessions: the A/B share of this test)."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        vid = conn.execute(q("register_version", "learning.sql"), {
            "name": "fine-tuned", "base": 1, "passage": None, "path": model_path, "dim": 384, "metrics": json.dumps({}),
            "status": "candidate"}).fetchone()["id"]
        conn.execute("SELECT pgsynapse.ensure_embedding_index(%s)", (vid,))
        conn.execute("UPDATE pgsynapse.model_versions SET backfilled_at = now(), traffic_percent = 100 WHERE id = %s",
                     (vid,))
    return vid


async def test_a_new_candidate_serves_its_ab_share_on_the_fast_runtime_and_is_promoted_without_a_switch(
        db_url, models, tmp_path, default_runtime):
    """Issue 23, item 5: a candidate is exported before it gets traffic; promoting it switches nothing.
    (runtime=onnx: the same path as onnx-int8 with one export instead of a quantisation search, to stay fast; the
    INT8 export itself is tested above, and test_auto_promote promotes a candidate on INT8.)"""
    adopt_runtime(db_url, default_runtime)  # version 1 as a fresh install leaves it: nothing to export at start
    candidate = _register_candidate(db_url)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        # before a worker has exported it: no A/B traffic, and no promotion
        assert [r["id"] for r in sync.execute(q("routable_versions", "answers.sql"))] == [1]
        with pytest.raises(RegistryError, match="waiting for its export"):
            promote(sync, candidate)
    settings = fast_settings(db_url, runtime="onnx", export_sample_chunks=16, data_dir=tmp_path, kinds=("answer",))
    conn = await aconn(db_url)
    with capture_logs() as logs:
        async with running_worker(settings, models) as worker:
            await wait_until(conn, "SELECT NOT runtime_pending FROM pgsynapse.model_versions WHERE id = %s",
                             (candidate,), channel="pgsynapse_models")
            v = await (await conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = %s", (candidate,))).fetchone()
            assert v["runtime"] == "onnx" and v["metrics"]["previous_runtime"] == "torch"
            assert v["metrics"]["runtime_export"]["runtime"] == "onnx"
            # its A/B share is served on the exported runtime
            await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('a', 'savepoints')")
            await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.questions WHERE status = 'pending'",
                             channel="pgsynapse_answers")
            mark = len(logs)
            with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
                assert promote(sync, candidate)["runtime"] == "onnx"
            await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('b', 'savepoints')")
            await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.questions WHERE status = 'pending'",
                             channel="pgsynapse_answers")
            # a heartbeat after the promotion: the worker holds the version on onnx, and never loaded it on torch
            await wait_until(conn, "SELECT heartbeat_at > (SELECT max(at) FROM pgsynapse.model_events)"
                                   " AND models @> %s::jsonb FROM pgsynapse.workers WHERE worker_id = %s",
                             (json.dumps([{"version": candidate, "runtime": "onnx"}]), worker.worker_id))
    served = await (await conn.execute("SELECT session_id, model_version_id FROM pgsynapse.questions ORDER BY id")).fetchall()
    assert [(r["session_id"], r["model_version_id"]) for r in served] == [("a", candidate), ("b", candidate)]
    events = await (await conn.execute(
        "SELECT event, figures->>'runtime' AS runtime FROM pgsynapse.model_events WHERE model_version_id = %s"
        " ORDER BY id", (candidate,))).fetchall()
    assert [(e["event"], e["runtime"]) for e in events] == [("runtime_switched", "onnx"), ("promoted", "onnx")]
    # the one torch load is the export's reference model (the agreement check); everything served is onnx
    switched = next(i for i, e in enumerate(logs) if e["event"] == "runtime_switched")
    loads = [e["runtime"] for e in logs[switched:] if e["event"] == "model_loaded" and e.get("version") == candidate]
    assert loads and set(loads) == {"onnx"}
    assert [e["runtime"] for e in logs if e["event"] == "model_loaded" and e.get("version") == candidate].count(
        "torch") == [e["runtime"] for e in logs[:switched] if e["event"] == "model_loaded"].count("torch") == 1
    after = [e["event"] for e in logs[mark:]]
    assert "runtime_export_started" not in after and "runtime_switched" not in after
    assert (await _version(conn))["status"] == "candidate"  # version 1, kept for rollback
    await conn.close()


async def test_a_candidate_whose_export_fails_gets_its_ab_share_on_torch_with_the_reason_recorded(
        db_url, models, tmp_path, default_runtime):
    """A candidate the ONNX path cannot take (CLS pooling) stays on torch; the reason is recorded and logged."""
    adopt_runtime(db_url, default_runtime)

    model = tmp_path / "cls-model"
    shutil.copytree(default_model_path(), model, ignore=shutil.ignore_patterns("*.onnx", "onnx", "openvino"))
    pooling = model / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "pooling_mode_mean_tokens": False,
                                   "pooling_mode_cls_token": True}))
    candidate = _register_candidate(db_url, str(model))
    settings = fast_settings(db_url, runtime="onnx-int8", export_sample_chunks=16, data_dir=tmp_path,
                             kinds=("answer",))
    conn = await aconn(db_url)
    with capture_logs() as logs:
        async with running_worker(settings, models):
            await wait_until(conn, "SELECT NOT runtime_pending FROM pgsynapse.model_versions WHERE id = %s",
                             (candidate,), channel="pgsynapse_models")
            await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('a', 'savepoints')")
            await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.questions WHERE status = 'pending'",
                             channel="pgsynapse_answers")
    v = await (await conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = %s", (candidate,))).fetchone()
    assert v["runtime"] == "torch" and "mean pooling" in v["metrics"]["runtime_export"]["error"]
    [event] = await (await conn.execute(
        "SELECT event, reason FROM pgsynapse.model_events WHERE model_version_id = %s", (candidate,))).fetchall()
    assert event["event"] == "runtime_export_failed" and "mean pooling" in event["reason"]
    assert [e for e in logs if e["event"] == "runtime_export_failed" and e["version"] == candidate]
    row = await (await conn.execute("SELECT model_version_id FROM pgsynapse.questions")).fetchone()
    assert row["model_version_id"] == candidate  # its A/B share, on torch, as recorded
    await conn.close()


async def test_the_in_process_worker_of_ask_leaves_waiting_exports_to_the_real_worker(db_url, tmp_path):
    """`pgsynapse ask` with no worker running answers with a worker of its own: it must not export the active version
    (minutes before the answer) nor a candidate waiting for it (a thread that outlived the command, and failed at
    interpreter shutdown)."""
    candidate = _register_candidate(db_url)
    settings = fast_settings(db_url, runtime="onnx", export_sample_chunks=16, data_dir=tmp_path)
    with capture_logs() as logs:
        answer = await anyio.to_thread.run_sync(lambda: ask(settings, "how do I roll back part of a transaction?"))
    assert answer.status == "answered", answer
    assert not [e for e in logs if e["event"].startswith("runtime_")], logs
    conn = await aconn(db_url)
    v = await (await conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = %s", (candidate,))).fetchone()
    assert v["runtime_pending"] and v["runtime"] == "torch"  # still waiting: the next `pgsynapse run` exports it
    assert (await _version(conn))["runtime"] == "torch"
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []
    await conn.close()


WAITING = ("SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
           " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))")


# a worker holds the export lock (exporting a version to its runtime)
EXPORTING = ("SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted"
             " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))")


async def test_a_worker_waiting_for_another_workers_export_says_so(db_url, tmp_path):
    """A second worker started beside the first on a fresh install waited minutes on the export lock without a
    line in its log (its first one came after the other's export), as if it hung."""
    settings = fast_settings(db_url, runtime="onnx-int8", data_dir=tmp_path)
    holder = await aconn(db_url)  # the other worker, exporting
    await holder.execute("SELECT pg_advisory_lock(hashtext(%s))", (EXPORT_LOCK,))
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, optimise_active_version, settings, db_url)
            await wait_until(holder, WAITING)
            # the other worker's export ends (refused, say): recorded, so the waiting one finds it tried
            await holder.execute("UPDATE pgsynapse.model_versions SET metrics = metrics || jsonb_build_object("
                                 "'runtime_export', jsonb_build_object('requested', 'onnx-int8')) WHERE id = 1")
            await holder.execute("SELECT pg_advisory_unlock(hashtext(%s))", (EXPORT_LOCK,))
    assert [e["event"] for e in logs if e["event"].startswith("runtime_")] == ["runtime_export_waiting"], logs
    [waiting] = [e for e in logs if e["event"] == "runtime_export_waiting"]
    assert waiting["log_level"] == "info" and "another worker" in waiting["note"], waiting
    # with nobody else exporting, the lock is taken at once: nothing said
    with capture_logs() as logs:
        await anyio.to_thread.run_sync(optimise_active_version, settings, db_url)
    assert not [e for e in logs if e["event"].startswith("runtime_")], logs
    await holder.close()


async def test_an_export_under_way_holds_back_no_vacuum(db_url, tmp_path, monkeypatch):
    """The export runs in one transaction that holds its lock (minutes at a first start): that transaction takes no
    xid and keeps no snapshot while the model is computed, so VACUUM removes the rows deleted meanwhile. A write or
    a REPEATABLE READ snapshot in it would keep them all (dead but not yet removable) until the export ends."""
    computing, go = threading.Event(), threading.Event()

    def held_export(*args, **kwargs):  # the model computation, held while the test looks: the database is real
        computing.set()
        go.wait(SAFETY_TIMEOUT)
        raise ModelError("the test's export ends here")

    monkeypatch.setattr(sys.modules["pgsynapse.export.register"], "export_and_check", held_export)
    settings = fast_settings(db_url, runtime="onnx-int8", data_dir=tmp_path)
    conn = await aconn(db_url)
    await conn.execute("CREATE TABLE churn (id int) WITH (autovacuum_enabled = false)")
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, optimise_active_version, settings, db_url)
        try:
            assert await anyio.to_thread.run_sync(computing.wait, SAFETY_TIMEOUT)
            holder = await (await conn.execute(
                "SELECT a.state, a.backend_xid, a.backend_xmin FROM pg_stat_activity a JOIN pg_locks l USING (pid)"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.objid = hashtext(%s)::oid", (EXPORT_LOCK,)
            )).fetchone()
            await conn.execute("INSERT INTO churn SELECT generate_series(1, 1000)")
            await conn.execute("DELETE FROM churn")
            await conn.execute("VACUUM (VERBOSE) churn")
        finally:
            go.set()
    [vacuumed] = [n for n in notices if "tuples:" in n]
    assert "1000 removed, 0 remain, 0 are dead but not yet removable" in vacuumed, vacuumed
    assert holder == {"state": "idle in transaction", "backend_xid": None, "backend_xmin": None}, holder
    assert (await _version(conn))["metrics"]["runtime_export"]["error"] == "ModelError: the test's export ends here"
    await conn.close()


async def test_status_says_a_worker_is_starting_while_it_exports_the_active_version(db_url, tmp_path):
    """At a fresh install's first start the worker exports the active version to INT8 (minutes on a small host)
    before it registers: `pgsynapse status` meanwhile printed `workers : none registered` and nothing of the export,
    as if no worker ran. The test holds the version's row, so the real export stays under way (it cannot record
    its outcome) while status is read. The version's model is a tiny one of the same dimension (what status says
    does not depend on the model; the real model's export is the first test's): the same export, a few times faster."""
    model = tiny_embedding_model(tmp_path / "tiny", 384)
    settings = fast_settings(db_url, runtime="onnx-int8", export_sample_chunks=16, data_dir=tmp_path,
                             model_path=str(model))
    conn, blocker = await aconn(db_url), await aconn(db_url)
    worker = Worker(settings, db_url, models=ModelCache(model_path=str(model)))
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        async with anyio.create_task_group() as tg:
            async with blocker.transaction():
                await blocker.execute("SELECT FROM pgsynapse.model_versions WHERE id = 1 FOR UPDATE")
                tg.start_soon(partial(worker.run, handle_signals=False))
                await wait_until(conn, EXPORTING)
                during = render(snapshot(sync))
                assert "workers        : none registered yet: a worker is starting" in during, during
                assert "runtime export : under way for" in during, during
            await wait_until(conn, "SELECT count(*) = 1 FROM pgsynapse.workers")
            after = render(snapshot(sync))
            worker.request_stop()
    assert "workers        : 1" in after and "runtime export" not in after, after
    assert (await _version(conn))["runtime"] in ("onnx-int8", "onnx")
    await conn.close()
    await blocker.close()


async def test_status_search_and_ingest_tell_model_export_switch_from_a_starting_worker(db_url, tmp_path, monkeypatch):
    """`pgsynapse model export --switch` holds the export lock a worker's first start takes: while it exported and no
    worker was registered, `status` said "none registered yet: a worker is starting (it exports a model version to
    its runtime first...)", `search` and `ingest --follow` that a worker was starting, with no worker anywhere. They
    name the command and its version, and what to do (start `pgsynapse run`, which waits for that export); a worker
    started meanwhile, waiting for it, is a worker starting again. The real command runs, its model computation
    held while the test reads (the database is real)."""
    computing, go = threading.Event(), threading.Event()

    def held_export(*args, **kwargs):
        computing.set()
        go.wait(SAFETY_TIMEOUT)
        raise ModelError("the test's export ends here")

    monkeypatch.setattr(sys.modules["pgsynapse.export.register"], "export_and_check", held_export)
    # the waiting worker below waits in one lock wait, not in slices of a second: between two, for a moment, it
    # waits on nothing in pg_locks, and wait_until's re-check (every second too) met it there a third of the runs
    monkeypatch.setattr(sys.modules["pgsynapse.db"], "LOCK_WAIT_SLICE_MS", SAFETY_TIMEOUT * 1000)
    settings = fast_settings(db_url, data_dir=tmp_path)
    raised: list[BaseException] = []

    def command() -> None:
        try:
            run_export(settings, "onnx-int8", switch=True)
        except ModelError as exc:
            raised.append(exc)

    conn = await aconn(db_url)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, command)
            try:
                assert await anyio.to_thread.run_sync(computing.wait, SAFETY_TIMEOUT)
                alone = render(snapshot(sync))
                alone_notes = (unsearched(sync, 1), worker_note(sync, "document"))
                # a worker started now waits for the command's export (one on torch finds nothing more to do)
                tg.start_soon(anyio.to_thread.run_sync, optimise_active_version, settings, db_url)
                await wait_until(conn, WAITING)
                waited = render(snapshot(sync))
                waited_notes = (unsearched(sync, 1), worker_note(sync, "document"))
            finally:
                go.set()
    assert "a worker is starting" not in alone, alone
    assert ("workers        : none registered (`pgsynapse model export --switch` is exporting model version 1 to the "
            "workers' runtime (minutes on a small host): runtime export, below; a worker started now waits for it, "
            "then serves that version on its runtime)") in alone, alone
    assert "runtime export : under way for " in alone, alone
    assert (": `pgsynapse model export --switch` exports model version 1 to its runtime and checks its agreement "
            "(minutes on a small host; a starting worker waits for it, then serves the version on that runtime)"
            ) in alone, alone
    assert alone_notes == (
        "1 document(s) waiting to be embedded were not searched (no running worker takes embed jobs, and `pgsynapse "
        "model export --switch` is exporting model version 1 to the workers' runtime (minutes on a small host): they "
        "are embedded once `pgsynapse run` starts, which waits for that export first)",
        "no running worker takes embed jobs, and `pgsynapse model export --switch` is exporting model version 1 to "
        "the workers' runtime (minutes on a small host): the documents are embedded once `pgsynapse run` starts, "
        "which waits for that export first (waiting; Ctrl-C stops waiting, the documents stay stored)"), alone_notes
    assert ("workers        : none registered yet: a worker is starting (it waits for `pgsynapse model export "
            "--switch`'s export of model version 1 to its runtime first: runtime export, below)") in waited, waited
    assert "; 1 more worker waits for it" in waited, waited
    assert waited_notes[0].startswith("1 document(s) waiting to be embedded were not searched (a worker is starting: "
                                      "it waits for `pgsynapse model export --switch`"), waited_notes
    assert waited_notes[1].startswith("a worker is starting: it waits for `pgsynapse model export --switch`"), \
        waited_notes
    assert [str(e) for e in raised] == ["the test's export ends here"], raised
    await conn.close()


async def test_ask_beside_a_starting_worker_waits_for_its_export_and_does_not_say_to_start_one(db_url, tmp_path):
    """`pgsynapse ask` during a worker's first start (its export, before it registers): no worker takes answer jobs
    yet and the starting one may run other kinds (`run --kinds embed`), so ask still answers with a worker of its
    own, which waits for the export first (runtime_export_waiting says so). Its warning about the documents not yet
    embedded said "start `pgsynapse run`" beside the worker that was starting."""
    insert_docs(db_url, [("Savepoints", "SAVEPOINT marks a point inside a transaction.")])
    settings = fast_settings(db_url, data_dir=tmp_path)
    holder = await aconn(db_url)  # the starting worker, exporting
    await holder.execute("SELECT pg_advisory_lock(hashtext(%s))", (EXPORT_LOCK,))
    answers = []
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: anyio.to_thread.run_sync(
                lambda: answers.append(ask(settings, "how do I mark a point in a transaction?"))))
            await wait_until(holder, WAITING)  # ask's own worker waits for the export
            await holder.execute("SELECT pg_advisory_unlock(hashtext(%s))", (EXPORT_LOCK,))
    await holder.close()
    assert answers and answers[0].status == "answered", answers
    [note] = [e for e in logs if e["event"] == "documents_not_embedded"]
    assert note["n"] == 1 and "start `pgsynapse run`" not in note["hint"], note
    assert note["hint"] == ("they are not searched until a worker embeds them: one is starting (it exports a model "
                            "version to its runtime first, minutes on a small host: `pgsynapse status`)"), note
    assert [e for e in logs if e["event"] == "runtime_export_waiting"], logs


async def _ask_beside_the_export_lock(settings, holder: psycopg.AsyncConnection, monkeypatch: pytest.MonkeyPatch
                                      ) -> AnswerTimeout | None:
    """`pgsynapse ask --timeout 2` while ``holder`` holds the export lock (released after): what it raised. Ask's
    worker waits in one lock wait, not in slices of a second: between two, for a moment, it waits on nothing in
    pg_locks, and the timeout's read of who waits met that moment (seen once in a CI run)."""
    monkeypatch.setattr(sys.modules["pgsynapse.db"], "LOCK_WAIT_SLICE_MS", SAFETY_TIMEOUT * 1000)
    await holder.execute("SELECT pg_advisory_lock(hashtext(%s))", (EXPORT_LOCK,))

    def asking() -> AnswerTimeout | None:
        try:
            ask(settings, "how do I mark a point in a transaction?", timeout=2)
        except AnswerTimeout as exc:
            return exc
        return None

    try:
        with anyio.fail_after(60):  # a safety net only: ask's timeout is 2 s
            return await anyio.to_thread.run_sync(asking, abandon_on_cancel=True)
    finally:
        await holder.execute("SELECT pg_advisory_unlock(hashtext(%s))", (EXPORT_LOCK,))


async def test_ask_beside_a_starting_worker_ends_in_its_timeout_and_says_why(db_url, tmp_path, monkeypatch):
    """`pgsynapse ask --timeout 2` during a worker's first start: ask's own worker waited for that export (minutes on a
    small host) before the timeout even started counting. The question is asked while ask's worker starts, so the
    timeout bounds both; its error says the worker is still starting, what it waits for, and where the answer will
    be (the exporting worker answers it once started)."""
    insert_docs(db_url, [("Savepoints", "SAVEPOINT marks a point inside a transaction.")])
    settings = fast_settings(db_url, data_dir=tmp_path)
    holder = await aconn(db_url)  # the starting worker, exporting
    raised = await _ask_beside_the_export_lock(settings, holder, monkeypatch)
    qid = (await (await holder.execute("SELECT id FROM pgsynapse.questions WHERE status = 'pending'")).fetchone())["id"]
    assert raised is not None and raised.question_id == qid, raised
    assert str(raised) == (
        f"no answer to question {qid} within 2s: no running worker takes answer jobs, and the one this command "
        "started is still starting: it waits for another worker's export of a model version to its runtime (a first "
        "start, minutes on a small host: `pgsynapse status`); give a longer --timeout (0: no limit), or ask once a "
        "worker runs (`pgsynapse run`); the question stays pending and is answered once one that takes answer jobs "
        f"runs: SELECT status, answer FROM pgsynapse.questions WHERE id = {qid}")
    await holder.close()


async def test_ask_beside_model_export_switch_ends_in_its_timeout_and_names_the_command(db_url, tmp_path,
                                                                                         monkeypatch):
    """`pgsynapse ask --timeout 2` while `pgsynapse model export --switch` exports (its connection named as that
    command names itself, holding the export lock): ask's own worker waits for that export, and the timeout said it
    waited for "another worker's export" with no other worker anywhere."""
    insert_docs(db_url, [("Savepoints", "SAVEPOINT marks a point inside a transaction.")])
    settings = fast_settings(db_url, data_dir=tmp_path)
    holder = await psycopg.AsyncConnection.connect(db_url, autocommit=True, row_factory=dict_row,
                                                   application_name=export_command_name(1))
    raised = await _ask_beside_the_export_lock(settings, holder, monkeypatch)
    await holder.close()
    assert raised is not None and "another worker" not in str(raised), raised
    assert ("and the one this command started is still starting: it waits for `pgsynapse model export --switch`'s "
            "export of model version 1 to its runtime (minutes on a small host: `pgsynapse status`); give a longer "
            "--timeout") in str(raised), raised
