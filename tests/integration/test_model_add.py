"""`pgsynapse model add`: any local model, of any dimension, added as a candidate, backfilled, given traffic,
promoted, and the old version retired, while the worker keeps serving; on the default runtime (the added torch
model is exported to it before it gets traffic, as a retrained one is)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
import shutil
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.cli import main
from pgsynapse.errors import ModelError, RegistryError
from pgsynapse.export.agreement import Agreement, ExportReport
from pgsynapse.handlers.backfill import finish_backfill
from pgsynapse.learning.cli import backfill_worker_note, render_versions, run_learning_command, run_model_command
from pgsynapse.learning.distill import Distilled
from pgsynapse.learning.registry import add_model, promote, retire, set_traffic
from pgsynapse.logs import configure_logging
from pgsynapse.metrics import INFERENCE_SECONDS
from pgsynapse.models import default_model_path
from pgsynapse.search import search
from pgsynapse.status import render, snapshot
from tests.helpers import aconn, adopt_runtime, fast_settings, insert_docs, running_worker, wait_until
from tests.embed_models import tiny_cross_encoder, tiny_embedding_model

pytestmark = pytest.mark.anyio

DOCS = [
    ("Savepoints", "SAVEPOINT establishes a new savepoint within the current transaction. ROLLBACK TO SAVEPOINT "
                   "rolls back all commands that were executed after the savepoint was established."),
    ("VACUUM", "VACUUM reclaims storage occupied by dead tuples. Plain VACUUM can run in parallel with reads and "
               "writes of the table, VACUUM FULL rewrites it and needs an exclusive lock."),
    ("Indexes", "CREATE INDEX constructs an index on the specified column(s) of a relation. B-tree, hash, GiST, "
                "SP-GiST, GIN and BRIN are the index methods provided."),
    ("Roles", "CREATE ROLE adds a new role to a PostgreSQL database cluster. A role is an entity that can own "
              "database objects and have database privileges."),
]
BACKFILLED = "SELECT backfilled_at IS NOT NULL AND NOT runtime_pending FROM pgsynapse.model_versions WHERE id = %s"


@pytest.fixture(scope="module")
def tiny48(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_embedding_model(tmp_path_factory.mktemp("models") / "tiny-48", 48)


def _sync(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


async def _counts(conn, version: int) -> tuple[int, int, list[int]]:
    row = await (await conn.execute(
        "SELECT (SELECT count(*) FROM pgsynapse.chunks) AS chunks,"
        " (SELECT count(*) FROM pgsynapse.embeddings WHERE model_version_id = %(v)s) AS vectors,"
        " (SELECT array_agg(DISTINCT vector_dims(embedding)) FROM pgsynapse.embeddings"
        "  WHERE model_version_id = %(v)s) AS dims", {"v": version})).fetchone()
    return row["chunks"], row["vectors"], row["dims"] or []


async def test_add_backfill_traffic_promote_retire_with_a_dimension_change(db_url, models, default_runtime, tiny48):
    adopt_runtime(db_url, default_runtime)  # version 1: the default model on the default runtime, 384-d
    settings = fast_settings(db_url, runtime="onnx-int8", data_dir=default_runtime["data_dir"])
    conn = await aconn(db_url)
    insert_docs(db_url, DOCS)
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status <> 'embedded'")

    with _sync(db_url) as sconn:
        added = add_model(sconn, tiny48, name="tiny-48", serving_runtime=settings.runtime)
    v2 = added["id"]
    assert added["dim"] == 48 and added["status"] == "candidate" and added["runtime_pending"]
    assert any("reads 128 tokens" in w for w in added["warnings"])  # chunks of 256 tokens: its tail is not read
    # not backfilled yet: no search, no traffic, no promotion
    with pytest.raises(RegistryError, match="still backfilling"):
        await search(conn, models, "savepoint", version=v2)
    with _sync(db_url) as sconn, pytest.raises(RegistryError, match="still backfilling"):
        promote(sconn, v2)

    async with running_worker(settings, models):
        await wait_until(conn, BACKFILLED, (v2,))
        chunks, vectors, dims = await _counts(conn, v2)
        assert vectors == chunks > 0 and dims == [48]
        v = await (await conn.execute("SELECT runtime, traffic_percent, metrics FROM pgsynapse.model_versions"
                                      " WHERE id = %s", (v2,))).fetchone()
        assert float(v["traffic_percent"]) == 0  # model add's default: no sessions until `pgsynapse traffic`
        assert v["metrics"]["runtime_export"]["requested"] == "onnx-int8"  # exported, or why not, is recorded

        # a document written now is embedded for both versions, each in its own dimension
        [doc] = insert_docs(db_url, [("Sequences", "CREATE SEQUENCE creates a new sequence number generator.")])
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,))
        per_version = await (await conn.execute(
            "SELECT e.model_version_id AS v, vector_dims(e.embedding) AS d FROM pgsynapse.embeddings e"
            " JOIN pgsynapse.chunks c ON c.id = e.chunk_id WHERE c.document_id = %s ORDER BY 1", (doc,))).fetchall()
        assert [(r["v"], r["d"]) for r in per_version] == [(1, 384), (v2, 48)]

        # every session to the candidate: questions are answered from its 48-d vectors
        with _sync(db_url) as sconn:
            set_traffic(sconn, v2, 100)
        await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('s1', 'How do savepoints work?')")
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.questions WHERE status = 'pending'")
        q = await (await conn.execute("SELECT status, model_version_id FROM pgsynapse.questions")).fetchone()
        assert q == {"status": "answered", "model_version_id": v2}

        with _sync(db_url) as sconn:
            promote(sconn, v2)
            listing = render_versions(sconn)
            assert f"{v2:>4}  active" in listing and "48" in listing
            retire(sconn, 1)
            gone = sconn.execute("SELECT to_regclass('pgsynapse.embeddings_v1') IS NULL AS gone").fetchone()["gone"]
            assert gone
        hits = await search(conn, models, "savepoint", k=3)  # the active version now: 48-d
        assert len(hits) == 3
        assert (await _counts(conn, 1))[1] == 0
        # after the retire, a new document is embedded for the new version only, and cut for it: chunks of at most
        # the 128 tokens it reads (version 1 read 256)
        # (sentences that differ: identical chunks of a document are stored once)
        [doc] = insert_docs(db_url, [("Views", " ".join(f"CREATE VIEW defines view {i} of a query." for i in range(60)))])
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,))
        chunks, vectors, dims = await _counts(conn, v2)
        assert vectors == chunks and dims == [48]
        sizes = [r["token_count"] for r in await (await conn.execute(
            "SELECT token_count FROM pgsynapse.chunks WHERE document_id = %s", (doc,))).fetchall()]
        assert len(sizes) > 2 and max(sizes) <= 128, sizes


async def test_the_last_backfill_step_finds_a_chunk_behind_its_cursor(db_url, models, tiny48):
    """Each step reads ahead of its cursor only; a chunk behind it that lacks the version's vector (an embed job
    computed before the version existed wrote the others) is found by the last step's second look from 0."""
    insert_docs(db_url, DOCS)
    conn = await aconn(db_url)
    settings = fast_settings(db_url, backfill_batch=2)
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status <> 'embedded'")
    with _sync(db_url) as sconn:
        v2 = add_model(sconn, tiny48, serving_runtime="torch")["id"]
        # the queued first step, as if the steps before it had passed every chunk
        sconn.execute("UPDATE pgsynapse.jobs SET payload = payload || '{\"after\": 1000000}' WHERE kind = 'backfill'")
    before = _batches_of(v2)
    async with running_worker(settings, models):
        await wait_until(conn, BACKFILLED, (v2,))
    chunks, vectors, _ = await _counts(conn, v2)
    assert vectors == chunks > 2
    # its steps' inference time is the version's: they were labelled model_version="", runtime=""
    assert _batches_of(v2) > before


def _batches_of(version: int) -> float:
    """Backfill batches of ``version`` observed by pgsynapse_inference_seconds (process-wide)."""
    labels = {"kind": "backfill", "model_version": str(version), "runtime": "torch"}
    return sum(s.value for m in INFERENCE_SECONDS.collect() for s in m.samples
               if s.name == "pgsynapse_inference_seconds_count" and s.labels == labels)


async def test_a_slow_model_takes_shorter_backfill_steps(db_url, models, tiny48):
    """A step stops encoding once backfill_step_seconds have passed and writes what it has; the next step goes on
    from its last chunk. (Here: a budget that every forward pass of 2 chunks overruns, so each step writes 2.)"""
    insert_docs(db_url, DOCS)
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status <> 'embedded'")
    with _sync(db_url) as sconn:
        v2 = add_model(sconn, tiny48, serving_runtime="torch")["id"]
    settings = fast_settings(db_url, encode_batch_size=2, backfill_step_seconds=1e-6, backfill_throttle_seconds=0)
    with capture_logs() as logs:
        async with running_worker(settings, models):
            await wait_until(conn, BACKFILLED, (v2,))
    chunks, vectors, _ = await _counts(conn, v2)
    steps = [e["embedded"] for e in logs if e["event"] == "backfill_progress"]
    assert vectors == chunks >= 4 and sum(steps) == chunks
    assert max(steps) == 2 and len(steps) == -(-chunks // 2), steps


def test_status_shows_a_backfill_in_progress_with_an_eta(db_url, tiny48):
    insert_docs(db_url, DOCS)
    with _sync(db_url) as sconn:
        # the chunks an embed job would have written (no worker runs: this is about what status shows)
        sconn.execute("INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start, char_end,"
                      " content_hash) SELECT id, 0, body, 40, 0, length(body), content_hash FROM pgsynapse.documents")
        v2 = add_model(sconn, tiny48, serving_runtime="torch")["id"]
        # as a worker leaves it after one batch of two chunks, five seconds after the version was registered
        chunk_ids = [r["id"] for r in sconn.execute("SELECT id FROM pgsynapse.chunks ORDER BY id LIMIT 2")]
        sconn.execute("INSERT INTO pgsynapse.embeddings (chunk_id, model_version_id, embedding)"
                      " SELECT id, %s, array_fill(0.1, ARRAY[48])::vector FROM unnest(%s::bigint[]) id",
                      (v2, chunk_ids))
        sconn.execute("UPDATE pgsynapse.model_versions SET created_at = now() - interval '5 seconds' WHERE id = %s",
                      (v2,))
        chunks = sconn.execute("SELECT count(*) AS n FROM pgsynapse.chunks").fetchone()["n"]
        snap = snapshot(sconn)
    # 2 chunks in 5 s: the rest at the same rate
    eta = (chunks - 2) * 5 / 2
    v = next(v for v in snap["model_versions"] if v["id"] == v2)
    assert v["backfill"] == f"2/{chunks}" and v["backfill_eta_seconds"] == pytest.approx(eta, abs=0.5)
    text = render(snap)
    assert f"backfill 2/{chunks} ({100 * 2 / chunks:.0f}%), ETA {round(eta)}s" in text, text


def test_add_refuses_what_is_not_an_embedding_model(db_url, tmp_path, tiny48, tiny_vit_path, tiny_clip_path):
    with _sync(db_url) as conn:
        with pytest.raises(ModelError, match="does not exist"):
            add_model(conn, tmp_path / "nowhere")
        with pytest.raises(ModelError, match="no config.json"):
            add_model(conn, tmp_path)
        # a cross-encoder was registered as an embedding model (its encoder's mean-pooled states), an image
        # encoder stopped the command with a traceback
        with pytest.raises(ModelError, match=r"tiny-ce is a cross-encoder \(BertForSequenceClassification\), not a "
                                             "sentence-embedding model: add it as a ranker"):
            add_model(conn, tiny_cross_encoder(tmp_path / "tiny-ce"))
        with pytest.raises(ModelError, match=r"is not a sentence-transformers model \(ViTModel, no modules.json\): "
                                             r".*an image model \(CLIP, ViT...\) is added with `pgsynapse image-model"):
            add_model(conn, tiny_vit_path)
        # a plain transformers BERT (no modules.json: sentence-transformers invented a mean pooling for it) and a
        # CLIP checkpoint (its text tower) were registered as embedding models
        plain = tiny48.with_name(tiny48.name + "-bert")  # tiny48's transformer, saved by transformers alone
        with pytest.raises(ModelError, match=rf"^model {plain} is not a sentence-transformers model \(BertModel, no "
                                             r"modules.json\): pgsynapse model add needs a directory saved by "
                                             r"sentence-transformers \(modules.json, its pooling\) or an exported ONNX"):
            add_model(conn, plain)
        with pytest.raises(ModelError, match=r"is not a sentence-transformers model \(CLIPModel, no modules.json\): "
                                             r".*an image model \(CLIP, ViT...\) is added with `pgsynapse image-model"):
            add_model(conn, tiny_clip_path)
        with pytest.raises(RegistryError, match="between 0 and 100"):
            add_model(conn, tiny48, traffic=120)
        v = add_model(conn, tiny48, serving_runtime="torch")["id"]
        with pytest.raises(RegistryError, match=f"already model version {v}"):
            add_model(conn, tiny48)
        versions = conn.execute("SELECT count(*) AS n FROM pgsynapse.model_versions").fetchone()["n"]
        assert versions == 2  # the refusals registered nothing
        retire(conn, v)
        assert add_model(conn, tiny48, serving_runtime="torch")["id"] == v + 1  # retired: it may come back



async def test_follow_says_when_no_running_worker_would_backfill(db_url, models, tiny48, capsys):
    # `model add --follow` waited for ever, silently with --no-progress, when no worker ran to backfill
    with _sync(db_url) as conn:
        v = add_model(conn, tiny48, serving_runtime="torch")["id"]
        conn.execute("UPDATE pgsynapse.model_versions SET backfilled_at = now() WHERE id = %s", (v,))
        args = argparse.Namespace(command="model", model_command="add", path=str(tiny48), name=None, traffic=0.0,
                                  follow=True, no_progress=True)
        assert run_model_command(args, conn, fast_settings(db_url), db_url) == 0  # backfilled: no wait, no note
        assert "no running worker" not in capsys.readouterr().err
        note = backfill_worker_note(conn)
        assert note is not None and "no running worker takes backfill jobs: it starts once `pgsynapse run` does" in note
        async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
            assert "no running worker takes backfill jobs" in backfill_worker_note(conn)  # it runs other kinds
        async with running_worker(fast_settings(db_url, kinds=("embed", "backfill")), models):
            assert backfill_worker_note(conn) is None


def test_follow_of_a_version_waiting_for_its_runtime_export_does_not_say_it_serves(db_url, tiny48, capsys):
    # `model add --follow` of a torch model, where the workers serve onnx-int8, closed with "model version 2 is
    # backfilled: it serves 10% of sessions, then pgsynapse promote 2" while the version served no session (it gets
    # its share once a worker has exported it: `model list` said "waiting for its runtime export") and `promote`
    # refused it, exit 1, until then
    with _sync(db_url) as conn:
        v = add_model(conn, tiny48, traffic=10.0)["id"]  # the workers serve onnx-int8: it waits for its export
        conn.execute("UPDATE pgsynapse.model_versions SET backfilled_at = now(), traffic_percent = 10 WHERE id = %s",
                     (v,))  # as its backfill leaves it
        args = argparse.Namespace(command="model", model_command="add", path=str(tiny48), name=None, traffic=0.0,
                                  follow=True, no_progress=True)
        assert run_model_command(args, conn, fast_settings(db_url), db_url) == 0
        assert capsys.readouterr().out.splitlines()[-1] == (
            f"model version {v} is backfilled and waits for its export to the serving runtime (a running worker that "
            "embeds or answers does it; pgsynapse model list shows when it is done): then it serves 10% of sessions, "
            f"then pgsynapse promote {v}")
        conn.execute("UPDATE pgsynapse.model_versions SET runtime_pending = false WHERE id = %s", (v,))  # exported
        assert run_model_command(args, conn, fast_settings(db_url), db_url) == 0
        assert capsys.readouterr().out.splitlines()[-1] == (
            f"model version {v} is backfilled: it serves 10% of sessions, then pgsynapse promote {v}")

def test_model_add_s_notes_are_json_events_with_json_logs(db_url, tiny48, capsys):
    """With JSON logs (the systemd unit's) every stderr line of `model add` is JSON: its warnings, `--follow`'s note
    that no worker backfills, its failed backfill and its ignored --traffic were plain `pgsynapse: ...` lines."""
    configure_logging("json")
    settings = fast_settings(db_url)

    def model_add(follow: bool, traffic: float = 0.0, settings=settings) -> tuple[int, list[dict]]:
        args = argparse.Namespace(command="model", model_command="add", path=str(tiny48), name=None, traffic=traffic,
                                  follow=follow, no_progress=True)
        code = run_model_command(args, conn, settings, db_url)
        events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]  # each line is JSON
        return code, [e for e in events if e["level"] != "info"]  # not the model_loaded, model_added ones

    with _sync(db_url) as conn:
        v = add_model(conn, tiny48, serving_runtime="torch")["id"]
        conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id, payload, status, last_error) VALUES"
                     " ('backfill', %s, '{}', 'failed', 'disk full')", (v,))
        code, events = model_add(follow=True)
        assert code == 1
        assert [(e["event"], e["level"]) for e in events] == [("model_follow_waiting", "warning"),
                                                              ("model_backfill_failed", "error")], events
        assert events[0]["note"].startswith("no running worker takes backfill jobs"), events
        assert events[1]["note"] == f"backfill of model version {v} failed: disk full", events
        conn.execute("UPDATE pgsynapse.model_versions SET backfilled_at = now() WHERE id = %s", (v,))
        code, events = model_add(follow=True, traffic=5.0)
        assert code == 0
        assert [(e["event"], e["level"]) for e in events] == [("model_traffic_not_applied", "warning")], events
        assert events[0]["note"].startswith(f"--traffic applies when a model is added; pgsynapse traffic {v} 5 "), events
        retire(conn, v)
        code, events = model_add(follow=False, settings=fast_settings(db_url, chunk_tokens=8192))
        assert code == 0
        assert [(e["event"], e["level"]) for e in events] == [("model_add_warning", "warning")], events
        assert "but chunks hold up to chunk_tokens=8192" in events[0]["note"], events


@pytest.mark.parametrize("command, event", [
    (["model", "distill"], "distill_not_registered"),
    (["model", "export", "--runtime", "onnx"], "export_refused"),
])
def test_a_refused_distill_or_export_is_a_json_event_with_json_logs(db_url, tmp_path, monkeypatch, capsys, command,
                                                                    event):
    """`model distill` whose gate refuses its student, and `model export` whose agreement is below the threshold,
    said so in a plain `pgsynapse: ...` line among the JSON ones (the training and export are stood in for: what
    they return is what the command reports)."""
    agreement = Agreement(overlap_at_10=0.5, cosine_mean=0.9, cosine_min=0.8, query_cosine_mean=0.9, n_chunks=10,
                          n_queries=5)
    monkeypatch.setattr("pgsynapse.cli.run_export", lambda *a, **k: ExportReport(
        "onnx", str(tmp_path / "onnx"), agreement, 0.95, accepted=False, seconds=1.0, size_bytes=1))
    monkeypatch.setattr("pgsynapse.learning.cli.distill", lambda *a, **k: Distilled(
        None, {"passed": False, "reasons": ["the student is worse"]}, {}, tmp_path / "student"))
    monkeypatch.setenv("PGSYNAPSE_DATA_DIR", str(tmp_path / "data"))
    capsys.readouterr()
    assert main(["--database-url", db_url, "--log-format", "json", *command]) == 1
    [refused] = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert {"event": event, "level": "error"}.items() <= refused.items(), refused
    assert ("onnx agreement below 0.95: top-10 overlap 0.500" in refused["note"] if event == "export_refused" else
            refused["note"].startswith("the student was not registered: its gate refused it")), refused


def test_the_same_model_is_refused_once_its_version_serves_on_another_runtime(db_url, tmp_path, tiny48):
    """Adding a version's model again registered a duplicate (and a second backfill) once the version had left its
    path: exported to the serving runtime (what every added torch model is), or the packaged default model that the
    first version serves with no path of its own."""
    with _sync(db_url) as conn:
        v = add_model(conn, tiny48)["id"]
        onnx = tmp_path / "tiny-48-onnx"
        shutil.copytree(tiny48, onnx)  # where an export would have put it: the version serves from there now
        conn.execute("UPDATE pgsynapse.model_versions SET runtime = 'onnx-int8', artifact_path = %s, runtime_pending"
                     " = false, metrics = metrics || jsonb_build_object('previous_artifact_path', artifact_path)"
                     " WHERE id = %s", (str(onnx), v))
        with pytest.raises(RegistryError, match=f"is already model version {v} \\(candidate\\)"):
            add_model(conn, tiny48)
        with pytest.raises(RegistryError, match="is already model version 1 \\(active\\)"):
            add_model(conn, default_model_path())
        assert conn.execute("SELECT count(*) AS n FROM pgsynapse.model_versions").fetchone()["n"] == 2


def test_an_exported_onnx_directory_is_added_on_its_own_runtime(db_url, default_runtime):
    """An ONNX artifact (here: the default model's INT8 export) is served as it is: no export to wait for."""
    with _sync(db_url) as conn:
        row = add_model(conn, default_runtime["artifact_path"], serving_runtime="onnx-int8")
    assert (row["runtime"], row["dim"], row["runtime_pending"]) == ("onnx-int8", 384, False)


def test_the_active_version_is_shown_with_the_traffic_the_candidates_leave_it(db_url):
    """Two candidates at 50 % and 10 %: `model list` and `status` showed the active version at 100 %; it serves the
    40 % the candidates leave. A share that would take the candidates past 100 % is refused: the routing gave the
    last candidate less than it was told, without a word."""
    with _sync(db_url) as conn:
        conn.execute("UPDATE pgsynapse.model_versions SET backfilled_at = now() WHERE id = 1")
        ids = [conn.execute("INSERT INTO pgsynapse.model_versions (name, dim, status, backfilled_at) VALUES (%s, 384, "
                            "'candidate', now()) RETURNING id", (f"c{i}",)).fetchone()["id"] for i in range(2)]
        set_traffic(conn, ids[0], 50)
        set_traffic(conn, ids[1], 10)
        with pytest.raises(RegistryError, match=rf"model version {ids[1]} at 60% would take the candidates' traffic "
                                                rf"to 110%: at most 50% is left \(v{ids[0]} has 50%\)"):
            set_traffic(conn, ids[1], 60)
        # a candidate with a share that is not routed yet (waiting for its runtime export) takes none of it
        waiting = conn.execute("INSERT INTO pgsynapse.model_versions (name, dim, status, backfilled_at, runtime_pending,"
                               " traffic_percent) VALUES ('w', 384, 'candidate', now(), true, 5) RETURNING id"
                               ).fetchone()["id"]
        listing = render_versions(conn).splitlines()
        assert [line.split()[4] for line in listing[1:]] == ["40%", "50%", "10%", "5%"], listing
        shown = {v["id"]: v["traffic_percent"] for v in snapshot(conn)["model_versions"]}
        assert shown == {1: 40.0, ids[0]: 50.0, ids[1]: 10.0, waiting: 5.0}
        assert "model v1       : active (torch), 40% traffic" in render(snapshot(conn))


def test_traffic_on_a_candidate_not_serving_yet_says_when_it_will(db_url, capsys):
    """`traffic 3 50` on a candidate still backfilling or waiting for its runtime export said "gets 50% of
    sessions", and it got none until then."""
    with _sync(db_url) as conn:
        filling, exporting, ready = [conn.execute(
            "INSERT INTO pgsynapse.model_versions (name, dim, status, backfilled_at, runtime_pending) VALUES (%s, 384, "
            "'candidate', %s, %s) RETURNING id", row).fetchone()["id"]
            for row in (("a", None, False), ("b", datetime.now(UTC), True), ("c", datetime.now(UTC), False))]
        for version in (filling, exporting, ready):
            run_learning_command(argparse.Namespace(command="traffic", model_version=version, percent=10), conn)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model version")]
    assert printed == [
        f"model version {filling} gets 10% of sessions once its backfill is done (pgsynapse status shows it)",
        f"model version {exporting} gets 10% of sessions once a worker has exported it to its runtime "
        "(pgsynapse status shows it)",
        f"model version {ready} gets 10% of sessions"]



async def test_a_share_set_while_the_version_backfills_is_the_share_it_gets(db_url, models, tiny48):
    """docs/learning.md: `model add PATH --follow`, then `pgsynapse traffic 2 10` ("10 % of sessions once it is
    backfilled", and the CLI said so). The backfill's last step gave the version the share its job carried from
    `model add` (--traffic, 0 by default): the 10 % set meanwhile was lost, and the version served no session."""
    insert_docs(db_url, [("Vacuum", "VACUUM reclaims storage occupied by dead tuples."),
                         ("Analyze", "ANALYZE collects statistics about the contents of tables.")])
    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'")
    with _sync(db_url) as sync:
        v = add_model(sync, tiny48, serving_runtime="torch")["id"]  # no --traffic: its backfill job asks 0
        set_traffic(sync, v, 10)  # before any worker backfills it
    async with running_worker(fast_settings(db_url, kinds=("backfill",)), models):
        await wait_until(conn, "SELECT backfilled_at IS NOT NULL FROM pgsynapse.model_versions WHERE id = %s", (v,),
                         channel="pgsynapse_models")
    row = await (await conn.execute("SELECT traffic_percent::float8 AS t FROM pgsynapse.model_versions WHERE id = %s",
                                    (v,))).fetchone()
    await conn.close()
    assert row["t"] == 10.0

def test_retiring_a_retired_version_says_it_already_is(db_url, tiny48, capsys):
    """A second `pgsynapse retire N` printed "model version N retired, 0 embeddings deleted" (exit 0) again, and
    recorded another `retired` event: refused now, as promoting the active version is."""
    with _sync(db_url) as conn:
        v = add_model(conn, tiny48, serving_runtime="torch")["id"]
        args = argparse.Namespace(command="retire", model_version=v)
        assert run_learning_command(args, conn) == 0
        with pytest.raises(RegistryError, match=f"^model version {v} is already retired: nothing to do$"):
            run_learning_command(args, conn)
        printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model version")]
        assert printed == [f"model version {v} retired, 0 embeddings deleted"]
        events = conn.execute("SELECT count(*) AS n FROM pgsynapse.model_events WHERE model_version_id = %s AND "
                              "event = 'retired'", (v,)).fetchone()["n"]
        assert events == 1


async def test_a_finished_backfill_takes_only_the_share_the_other_candidates_leave(db_url):
    """A candidate whose backfill finished got rollout_traffic_percent (10) beside another candidate at 95 %: 105 %
    in all, and the routing gave it 5 without a word. It gets what is left."""
    with _sync(db_url) as conn:
        held, filled = [conn.execute("INSERT INTO pgsynapse.model_versions (name, dim, status, backfilled_at,"
                                     " traffic_percent) VALUES (%s, 384, 'candidate', %s, %s) RETURNING id",
                                     row).fetchone()["id"] for row in (("a", datetime.now(UTC), 95), ("b", None, 0))]
        async with await aconn(db_url) as aconnection:
            assert await finish_backfill(aconnection, filled, 10) == 5.0
        assert [float(r["traffic_percent"]) for r in conn.execute(
            "SELECT traffic_percent FROM pgsynapse.model_versions WHERE id = ANY(%s) ORDER BY id",
            ([held, filled],))] == [95.0, 5.0]
