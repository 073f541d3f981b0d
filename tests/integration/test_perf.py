"""Runtimes, the inference cache, micro-batching and the claim query's plan, on real Postgres and the real model."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import psycopg
import pytest
from pgvector.psycopg import register_vector, register_vector_async
from psycopg.rows import dict_row

from pgsynapse.cache import LRU, cleanup, embed_query, embed_query_sync
from pgsynapse.cli import main
from pgsynapse.db import EXPORT_LOCK
from pgsynapse.errors import ModelError
from pgsynapse.export import (Agreement, ExportReport, quantize_int8, register, run_export, sample_texts,
                              unfuse_attention)
from pgsynapse.export.quantize import _calibration_feeds
from pgsynapse.export.register import _sha256, optimise_version
from pgsynapse.models import ONNX_FILES, ModelCache, ModelSpec, default_model_path, load_embedder, resolve_model_path
from pgsynapse.queries import q
from pgsynapse.status import render, snapshot
from tests.embed_models import tiny_embedding_model
from tests.helpers import SAFETY_TIMEOUT, aconn, fast_settings, insert_docs, running_worker, wait_until

pytestmark = pytest.mark.anyio

ALL_DONE = "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'"


@pytest.fixture(scope="session")
def onnx_artifact(default_runtime, tmp_path_factory):
    """The default model exported to ONNX fp32 and INT8 (dynamic) once for the session: the fp32 graph is the one
    of the default runtime's export (built once per test run, tests/conftest.py), with its tokenizer files."""
    out = tmp_path_factory.mktemp("onnx")
    shutil.copytree(default_runtime["artifact_path"], out, dirs_exist_ok=True)
    (out / ONNX_FILES["onnx-int8"]).unlink()  # the export's scheme: rebuilt as plain dynamic INT8
    quantize_int8(out)
    return out


@pytest.fixture(scope="module")
def tiny_384(tmp_path_factory) -> Path:
    """A 2-layer random BERT of the default model's dimension and tokenizer (tests/embed_models.py), the source of
    the `model export` tests below that check what the command registers, refuses, samples and records: the same
    export path (trace, BERT fusion, agreement check, register) as all-MiniLM-L6-v2's in a fraction of its time.
    The real model's export and its quantisation are tested above and in tests/integration/test_runtime_switch.py."""
    return tiny_embedding_model(tmp_path_factory.mktemp("models") / "tiny-384", 384)


@pytest.fixture(scope="session")
def torch_embedder(models):
    return models.get({"id": 1, "name": "all-MiniLM-L6-v2", "artifact_path": None, "runtime": "torch", "dim": 384})


async def test_onnx_runtimes_match_torch_and_share_its_interface(onnx_artifact, torch_embedder):
    texts = ["VACUUM reclaims storage occupied by dead tuples.", "CREATE INDEX builds an index on a table.",
             "short", "The jsonb type stores JSON in a decomposed binary format " * 20]
    ref = torch_embedder.encode(texts)
    for runtime, min_cos in (("onnx", 0.9999), ("onnx-int8", 0.98)):
        e = load_embedder(ModelSpec(1, "m", onnx_artifact, runtime, 384), onnx_threads=1)
        assert e.max_seq_length == torch_embedder.max_seq_length
        assert e.tokenizer("a b")["input_ids"] == torch_embedder.tokenizer("a b")["input_ids"]
        vecs = e.encode(texts, batch_size=2)  # batches cross the length-sorted order and are put back in place
        assert vecs.shape == (4, 384) and vecs.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
        cos = (vecs * ref).sum(axis=1)
        assert cos.min() > min_cos, (runtime, cos)


def test_static_schemes_rewrite_exactly_and_quantise_closer_than_dynamic(onnx_artifact, tmp_path):
    """The fused Attention unfused into MatMul(QKV) + MultiHeadAttention is exact in fp32. Quantised, the
    outlier and smoothing schemes stay closer to fp32 than plain dynamic INT8 on real text (the outlier channels
    no longer set the activation scale)."""
    feeds = _calibration_feeds(onnx_artifact, None)
    fp32 = ort.InferenceSession(str(onnx_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    unfused = onnx.load(str(onnx_artifact / "model.onnx"))
    unfuse_attention(unfused)
    ops = Counter(n.op_type for n in unfused.graph.node)
    assert ops["Attention"] == 0 and ops["MultiHeadAttention"] == 6 and ops["MatMul"] == 24, ops
    onnx.save(unfused, str(tmp_path / "unfused.onnx"))
    feed = {k: v[:4] for k, v in feeds[0].items()}
    sess = ort.InferenceSession(str(tmp_path / "unfused.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, feed)[0], fp32.run(None, feed)[0], atol=2e-4)

    ref = load_embedder(ModelSpec(1, "m", onnx_artifact, "onnx", 384), onnx_threads=1)
    # 24 chunks compared, and the static schemes calibrated on 24 others plus the first words of 8 (one batch of
    # 32), as the export calibrates on the chunks it does not measure (export/agreement.py): a half and a quarter
    # of the default samples, the margins alike (1 - cosine with VNNI: dynamic 0.0058, outlier-static 0.0008,
    # smooth-static 0.0011; with 48 chunks and the default calibration 0.0050, 0.0007, 0.0010)
    chunks, _ = sample_texts(ref.tokenizer, n_chunks=24 + 24)
    chunks, calibration = chunks[:24], chunks[24:]
    calibration += [" ".join(c.split()[:12]) for c in calibration[:8]]
    base = ref.encode(chunks)
    cosine = {}
    for scheme in ("dynamic", "outlier-static", "smooth-static"):
        out = onnx_artifact  # its model_int8.onnx is the dynamic one
        if scheme != "dynamic":
            out = tmp_path / scheme
            shutil.copytree(onnx_artifact, out)
            # one calibration thread: xdist's other worker has the other core
            quantize_int8(out, scheme, calibration=calibration, threads=1)
        vecs = load_embedder(ModelSpec(1, "m", out, "onnx-int8", 384), onnx_threads=1).encode(chunks)
        cosine[scheme] = float((vecs * base).sum(axis=1).mean())
    # outlier-static quantises the QKV projection too, with no per-batch scale
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "outlier-static" / "model_int8.onnx")).graph.node)
    assert ops["MatMulIntegerToFloat"] == 24 and ops["Attention"] == 0, ops
    # smooth-static keeps the fused attention (as QAttention), smooths the QKV and FFN-in inputs and splits the
    # FFN-out inputs
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "smooth-static" / "model_int8.onnx")).graph.node)
    assert ops["QAttention"] == 6 and ops["MatMulIntegerToFloat"] == 18 and ops["Mul"] == 12, ops
    assert ops["Gather"] == 6 and ops["DynamicQuantizeLinear"] == 0 and ops["MatMul"] == 6, ops
    # measured with VNNI: dynamic ~0.9946, outlier-static ~0.999 (1 - cosine 7x smaller).
    # Without VNNI (an AVX2-only x86 CPU) ONNX Runtime's u8s8 kernels saturate on the dynamically quantised
    # inputs: smooth-static fell to 0.9962 against dynamic's 0.9939 (2026-12-03, AMD EPYC exposing avx2 only);
    # the start-up export's agreement check refuses those and takes outlier-static, whose static activation
    # ranges stay closest there too.
    closer = ("outlier-static", "smooth-static") if _cpu_has_vnni() else ("outlier-static",)
    for scheme in closer:
        assert 1 - cosine[scheme] < (1 - cosine["dynamic"]) / 2, cosine


def _cpu_has_vnni() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return "avx512_vnni" in flags or "avx_vnni" in flags


async def test_worker_embeds_with_an_onnx_version(db_url, onnx_artifact, models):
    conn = await aconn(db_url)
    await conn.execute("UPDATE pgsynapse.model_versions SET runtime = 'onnx-int8', artifact_path = %s WHERE id = 1",
                       (str(onnx_artifact),))
    ids = insert_docs(db_url, [(f"Doc {i}", f"Document {i} on topic {i % 5}.") for i in range(40)])

    async with running_worker(fast_settings(db_url, batch_size=8, max_wait_ms=20), ModelCache()) as worker:
        await wait_until(conn, ALL_DONE)
        [loaded] = worker.models.loaded()
        assert loaded.spec.runtime == "onnx-int8"
    row = await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.embeddings WHERE chunk_id IN"
                                    " (SELECT id FROM pgsynapse.chunks WHERE document_id = ANY(%s))", (ids,))).fetchone()
    assert row["n"] == 40
    await conn.close()


async def test_repeated_query_embedding_is_served_from_the_cache(db_url, torch_embedder):
    conn = await aconn(db_url)
    await register_vector_async(conn)
    lru = LRU(16)
    first = await embed_query(conn, torch_embedder, "How do I  reclaim space?", lru=lru)
    assert lru.stats.misses == 1
    again = await embed_query(conn, torch_embedder, "How do I reclaim space?", lru=lru)  # same once normalised
    assert lru.stats.memory_hits == 1
    np.testing.assert_array_equal(first, again)
    # a fresh process (empty LRU) is served by the table, and the hit is counted there
    fresh = LRU(16)
    from_db = await embed_query(conn, torch_embedder, "How do I reclaim space?", lru=fresh)
    assert fresh.stats.db_hits == 1 and fresh.stats.misses == 0
    np.testing.assert_allclose(from_db, first, atol=1e-6)
    row = await (await conn.execute("SELECT count(*) AS n, sum(hit_count) AS hits FROM pgsynapse.inference_cache")).fetchone()
    assert (row["n"], row["hits"]) == (1, 1)
    # and the vector is the model's own
    np.testing.assert_allclose(first, torch_embedder.encode(["How do I reclaim space?"])[0], atol=1e-5)
    await conn.close()


async def test_cache_never_serves_another_versions_result(db_url, torch_embedder):
    with psycopg.connect(db_url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute("INSERT INTO pgsynapse.model_versions (id, name, runtime, dim, status) VALUES (2, 'v2', 'torch', 384, 'candidate')")
        v2 = load_embedder(ModelSpec(2, "v2", torch_embedder.spec.path, "torch", 384))
        lru = LRU(16)
        embed_query_sync(conn, torch_embedder, "what is MVCC", lru=lru)
        embed_query_sync(conn, v2, "what is MVCC", lru=lru)
        assert lru.stats.misses == 2 and lru.stats.memory_hits == 0
        rows = conn.execute("SELECT model_version_id, hit_count FROM pgsynapse.inference_cache ORDER BY 1").fetchall()
        assert rows == [(1, 0), (2, 0)]


async def test_cache_cleanup_enforces_ttl_and_size_bound(db_url, torch_embedder):
    conn = await aconn(db_url)
    await register_vector_async(conn)
    lru = LRU(0)
    for i in range(5):
        await embed_query(conn, torch_embedder, f"question {i}", lru=lru)
    await conn.execute("UPDATE pgsynapse.inference_cache SET last_hit_at = now() - interval '2 hours'"
                       " WHERE input_hash = (SELECT input_hash FROM pgsynapse.inference_cache LIMIT 1)")
    assert await cleanup(conn, ttl_seconds=3600, max_rows=10) == 1
    assert await cleanup(conn, ttl_seconds=3600, max_rows=2) == 2
    row = await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.inference_cache")).fetchone()
    assert row["n"] == 2
    await conn.close()


def test_claim_query_uses_the_claim_index(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgsynapse.documents DISABLE TRIGGER documents_enqueue_insert")
        conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id, status) SELECT 'embed', g, 'done' FROM generate_series(1, 20000) g")
        conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id) SELECT 'embed', g FROM generate_series(20001, 20500) g")
        conn.execute("ANALYZE pgsynapse.jobs")
        sql = q("claim_jobs")
        params = {"kind": "embed", "limit": 32, "worker": "w", "lease": 60}
        with conn.transaction():
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, params))
        assert "jobs_claim" in plan, plan
        assert "Seq Scan on jobs" not in plan, plan
        # so does the retention delete of done jobs (finished over days, most of them recent)
        conn.execute("UPDATE pgsynapse.jobs SET finished_at = now() - make_interval(secs => id) WHERE status = 'done'")
        conn.execute("ANALYZE pgsynapse.jobs")
        with conn.transaction():
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + q("prune_done_jobs"), {"retention": 19_000, "limit": 10_000}))
        assert "jobs_done_finished" in plan, plan


def test_model_export_registers_a_passing_runtime_and_refuses_a_failing_one(db_url, tmp_path, tiny_384):
    settings = fast_settings(db_url, data_dir=str(tmp_path), model_path=str(tiny_384))
    report = run_export(settings, "onnx", n_chunks=40, threshold=0.99)
    assert report.accepted and report.agreement.overlap_at_10 >= 0.99 and report.agreement.cosine_mean > 0.9999
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT id, runtime, status, traffic_percent, base_version_id, artifact_path,"
                            " metrics->'export'->'agreement'->>'overlap_at_10' FROM pgsynapse.model_versions ORDER BY id").fetchall()
    assert rows[1][1:5] == ("onnx", "candidate", 0, 1)
    # backfilled as a version `model add` registers is (every chunk encoded by its model): with no backfill job it
    # stayed "backfill 0/N (0%)" for ever, and promote, traffic and search --version waited for it
    with psycopg.connect(db_url) as conn:
        backfill = conn.execute("SELECT ref_id, status, payload FROM pgsynapse.jobs WHERE kind = 'backfill'").fetchall()
    assert backfill == [(rows[1][0], "pending", {"traffic_percent": 0})]
    artifact = Path(rows[1][5])
    assert artifact.parent == tmp_path / "models" and artifact.name.startswith("v1-onnx-") and float(rows[1][6]) >= 0.99
    # the same export again, at an impossible threshold: refused with its figures, nothing registered, and it
    # neither touched the registered artifact (a new directory per export) nor left its own behind
    refused = run_export(settings, "onnx", n_chunks=40, threshold=1.01)
    assert not refused.accepted and refused.agreement.overlap_at_10 == 1.0
    assert refused.options["tried"] == [{"scheme": None, "overlap_at_10": 1.0,
                                         "cosine_mean": refused.agreement.cosine_mean}]
    assert refused.artifact_path != str(artifact) and not Path(refused.artifact_path).exists()
    assert (artifact / "model.onnx").exists()
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgsynapse.model_versions").fetchone()[0] == 2


def test_model_export_samples_the_export_sample_chunks_setting_unless_given(db_url, tmp_path, monkeypatch, capsys,
                                                                         tiny_384):
    # `model export` sampled 600 chunks whatever PGSYNAPSE_EXPORT_SAMPLE_CHUNKS said
    monkeypatch.setenv("PGSYNAPSE_EXPORT_SAMPLE_CHUNKS", "24")
    monkeypatch.setenv("PGSYNAPSE_MODEL_PATH", str(tiny_384))
    base = ["--database-url", db_url, "--data-dir", str(tmp_path), "model", "export", "--runtime", "onnx",
            "--threshold", "0.5"]
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["agreement"]["n_chunks"] == 24
    # (--sample N wins over the setting: run_export's n_chunks, as the test above gives it)


def test_model_export_of_a_version_that_does_not_exist_is_refused_exit_1(db_url, tmp_path, capsys):
    """`model export --version 99` exited 78 (bad configuration or setup: systemd does not restart it), where the
    other commands given a version that does not exist (`search --version`, `promote`, `traffic`, `retire`, `ranker
    add version:N`) exit 1, a command refused (README, exit codes)."""
    argv = ["--database-url", db_url, "--data-dir", str(tmp_path), "model", "export", "--version", "99"]
    assert main(argv) == 1
    assert "no model version 99: `pgsynapse model list` shows the versions" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(("option", "content", "says"), [
    # a traceback (FileNotFoundError) after the model had loaded, exit 1, and an empty artifact directory left
    ("--corpus", None, "--corpus {path}: cannot read it: No such file or directory"),
    ("--questions", None, "--questions {path}: cannot read it: No such file or directory"),
    # a traceback (JSONDecodeError, KeyError 'q')
    ("--corpus", '{"title": "T", "text": "a page"}\nnot json\n', "--corpus {path}, line 2: not a JSON object"),
    ("--questions", '{"question": "what?"}\n', '--questions {path}, line 1: no "q" (a question\'s text) in it'),
    ("--corpus", '{"title": "T", "body": "a page"}\n', '--corpus {path}, line 1: no "text" (a page\'s text) in it'),
])
def test_model_export_with_a_bad_corpus_or_questions_file_says_which_and_leaves_nothing(db_url, tmp_path, capsys,
                                                                                      option, content, says):
    path = tmp_path / "sample.jsonl"
    if content is not None:
        path.write_text(content)
    data = tmp_path / "data"
    argv = ["--database-url", db_url, "--data-dir", str(data), "model", "export", "--runtime", "onnx", option,
            str(path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert says.format(path=path) in err and "Traceback" not in err, err
    assert not (data / "models").exists() or list((data / "models").iterdir()) == []


def test_model_export_refuses_a_corpus_too_small_for_its_agreement_check(db_url, tmp_path, capsys):
    """A --corpus of five short pages made an agreement sample of five chunks: every query's top 10 was the whole
    sample, so any artifact agreed 1.0, and it was registered (exit 0)."""
    corpus = tmp_path / "small.jsonl"
    corpus.write_text("".join(json.dumps({"title": f"Page {i}", "text": f"Page {i} is about topic {i}."}) + "\n"
                              for i in range(5)))
    data = tmp_path / "data"
    argv = ["--database-url", db_url, "--data-dir", str(data), "model", "export", "--runtime", "onnx", "--corpus",
            str(corpus)]
    assert main(argv) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"--corpus {corpus} gives 5 chunks for the agreement check (600 asked), fewer than 16" in err, err
    assert list((data / "models").iterdir()) == []
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM pgsynapse.model_versions").fetchone()[0] == 1


def test_model_export_of_a_corpus_with_no_questions_says_so_before_exporting(db_url, tmp_path, capsys):
    """A --corpus whose pages have no titles, without --questions, had no query to compare neighbours on: the
    export ran, then was "refused: onnx agreement below 0.95: top-10 overlap nan", its JSON report with NaN in it."""
    corpus = tmp_path / "untitled.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Page {i} is about topic {i}: " + " ".join(
        f"word{i * 7 + j}" for j in range(30))}) + "\n" for i in range(30)))
    data = tmp_path / "data"
    argv = ["--database-url", db_url, "--data-dir", str(data), "model", "export", "--runtime", "onnx", "--corpus",
            str(corpus)]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    err = " ".join(err.split())
    assert (f"no question for the agreement check: the pages of --corpus {corpus} have no title; give --questions "
            "FILE") in err, err
    assert "nan" not in out.lower() + err.lower() and not (data / "models").exists()  # refused before any work


def test_a_failed_model_export_leaves_no_artifact_directory_behind(db_url, tmp_path):
    """An export that fails (a model the ONNX path cannot take: CLS pooling) left its new, partial directory in
    DATA_DIR/models for ever."""
    model = tmp_path / "cls-model"
    shutil.copytree(default_model_path(), model, ignore=shutil.ignore_patterns("*.onnx", "onnx", "openvino"))
    pooling = model / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps(json.loads(pooling.read_text()) | {"pooling_mode_mean_tokens": False,
                                                                     "pooling_mode_cls_token": True}))
    data = tmp_path / "data"
    settings = fast_settings(db_url, data_dir=str(data), model_path=str(model))
    with pytest.raises(ModelError, match="mean pooling"):
        run_export(settings, "onnx", n_chunks=16)
    assert list((data / "models").iterdir()) == []


def test_switching_an_exported_version_again_keeps_the_torch_weights_it_came_from(db_url, tmp_path):
    """`model export --switch` of a version a worker had switched to onnx-int8 recorded the INT8 directory as the
    version's previous_artifact_path, the torch weights a rebuild starts from: a worker on a host without the new
    artifact then stopped at its start with a traceback (OSError: no model.safetensors ... in the old INT8
    directory)."""
    first, second = str(tmp_path / "models" / "v1-onnx-int8-1"), str(tmp_path / "models" / "v1-onnx-int8-2")
    agreed = Agreement(1.0, 1.0, 1.0, 1.0, 8, 8)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        for path in (first, second):  # the worker's switch at a first start, then `model export --switch`
            row = conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = 1").fetchone()
            register(conn, ExportReport("onnx-int8", path, agreed, 0.95, True, 1.0, 1), row, switch=True)
        v = conn.execute("SELECT runtime, artifact_path, metrics FROM pgsynapse.model_versions WHERE id = 1").fetchone()
    assert (v["runtime"], v["artifact_path"]) == ("onnx-int8", second)
    # the torch weights it was first switched from (NULL: the configured or packaged model), as a rebuild reads it
    assert (v["metrics"]["previous_runtime"], v["metrics"]["previous_artifact_path"]) == ("torch", None), v["metrics"]
    assert resolve_model_path(v["metrics"]["previous_artifact_path"], None) == default_model_path()


def _stderr_until(proc: subprocess.Popen, word: str) -> str:
    """What ``proc`` wrote on stderr until ``word`` (or its end), read as it comes: no polling."""
    said, deadline = b"", time.monotonic() + SAFETY_TIMEOUT
    while word.encode() not in said and select.select([proc.stderr], [], [], max(0, deadline - time.monotonic()))[0]:
        if not (chunk := os.read(proc.stderr.fileno(), 65536)):
            break
        said += chunk
    return said.decode()


def test_model_export_switch_records_the_export_so_a_host_without_the_artifact_rebuilds_it(db_url, tmp_path,
                                                                                          tiny_384):
    """`model export --switch` moved the version to the new runtime without the `runtime_export` record the worker's
    own switch writes (runtime, scheme, sample, sha256): a worker on a host without the new artifact did not know to
    build it again, and went on to serve a directory that is not there.

    It also took no export lock: started while a worker exported the same version at its start, both exported it
    and the last to write won. It waits for the lock now, as a worker does, and says so (one test with the rest:
    the switch's export is the slow part)."""
    data = tmp_path / "data"
    argv = ["--database-url", db_url, "--data-dir", str(data), "model", "export", "--runtime", "onnx", "--switch",
            "--sample", "16"]
    with psycopg.connect(db_url) as holder:  # a worker exporting at its start: the lock of its transaction
        holder.execute(q("export_lock", "export.sql"), {"lock": EXPORT_LOCK})
        proc = subprocess.Popen([sys.executable, "-m", "pgsynapse", *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PGSYNAPSE_MODEL_PATH": str(tiny_384)})
        try:
            said = _stderr_until(proc, "waiting for")
            runtime, metrics = holder.execute("SELECT runtime, metrics FROM pgsynapse.model_versions WHERE id = 1"
                                              ).fetchone()
            assert (runtime, metrics.keys() & {"export", "runtime_export"}) == ("torch", set()), (metrics, said)
            assert not (data / "models").exists(), said  # it wrote nothing, not even its artifact's folder
            assert "waiting for" in said and proc.poll() is None, said
            holder.commit()  # the worker's export ends: the command's starts
            out, err = proc.communicate(timeout=SAFETY_TIMEOUT)
        finally:
            proc.kill()
            proc.wait(SAFETY_TIMEOUT)
    assert proc.returncode == 0, out + err
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        v = conn.execute("SELECT * FROM pgsynapse.model_versions WHERE id = 1").fetchone()
        events = conn.execute("SELECT event, actor, figures FROM pgsynapse.model_events"
                              " WHERE model_version_id = 1").fetchall()
    record = v["metrics"].get("runtime_export")
    assert v["runtime"] == "onnx" and record is not None, v["metrics"]
    assert (record["requested"], record["runtime"], record["sample_chunks"]) == ("onnx", "onnx", 16)
    assert record["tried"][-1]["accepted"] and record["sha256"] == _sha256(Path(v["artifact_path"]) / "model.onnx")
    assert [(e["event"], e["actor"], e["figures"]) for e in events] == [("runtime_switched", "cli", record)]
    # a host without the artifact: its worker (even a one-shot command's) builds it again, the same bytes
    host = fast_settings(db_url, data_dir=str(data), model_path=str(tiny_384))  # its configured model, as above
    shutil.rmtree(v["artifact_path"])
    rebuilt = optimise_version(host, db_url, export=False)
    assert rebuilt is not None and rebuilt.accepted
    assert _sha256(Path(v["artifact_path"]) / "model.onnx") == record["sha256"]
    # A version `model export --switch` moved before the switch wrote its `runtime_export` record has only the
    # export's report in its metrics: a worker on a host without its artifact rebuilds it from that report too
    # (one test with the above: the switch's export is the slow part, ~10 s)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:  # as an older release left it
        v = conn.execute("UPDATE pgsynapse.model_versions SET metrics = metrics - 'runtime_export' WHERE id = 1"
                         " RETURNING *").fetchone()
    digest = _sha256(Path(v["artifact_path"]) / "model.onnx")
    shutil.rmtree(v["artifact_path"])
    rebuilt = optimise_version(host, db_url, export=False)
    assert rebuilt is not None and rebuilt.accepted and rebuilt.agreement.n_chunks == 16
    assert _sha256(Path(v["artifact_path"]) / "model.onnx") == digest


async def test_a_bulk_insert_is_one_job_expanded_by_the_worker(db_url, models):
    conn = await aconn(db_url)
    # lower the bulk threshold (10,000 rows) for this database only, so a small statement takes the bulk path
    await conn.execute("CREATE OR REPLACE FUNCTION pgsynapse.bulk_enqueue_rows() RETURNS bigint LANGUAGE sql"
                       " IMMUTABLE AS 'SELECT 5::bigint'")
    ids = insert_docs(db_url, [(f"Bulk {i}", f"Bulk document {i} about subject {i % 3}.") for i in range(20)])
    small = insert_docs(db_url, [("Small", "A statement under the threshold keeps one job per row.")])
    rows = await (await conn.execute("SELECT ref_id, cardinality(ref_ids) AS n FROM pgsynapse.jobs ORDER BY id")).fetchall()
    assert rows == [{"ref_id": -ids[0], "n": 20}, {"ref_id": small[0], "n": None}]
    async with running_worker(fast_settings(db_url, batch_size=8), models):
        await wait_until(conn, ALL_DONE)
    done = await (await conn.execute(
        "SELECT count(*) FILTER (WHERE ref_id > 0 AND completions = 1) AS per_row,"
        " count(*) FILTER (WHERE ref_id < 0 AND completions = 1) AS bulk,"
        " count(*) FILTER (WHERE status <> 'done') AS open FROM pgsynapse.jobs")).fetchone()
    assert done == {"per_row": 21, "bulk": 1, "open": 0}
    embedded = await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.documents WHERE status = 'embedded'")).fetchone()
    assert embedded["n"] == 21
    await conn.close()


def test_a_second_bulk_insert_of_the_same_first_id_joins_the_pending_bulk_job(db_url):
    """A bulk job is keyed by its first row's id (ref_id = -id): a reload of the same rows (DELETE, then the same
    large INSERT) while the first bulk job was pending failed the application's statement on jobs_pending_dedup.
    The rows join the pending job, each once."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE OR REPLACE FUNCTION pgsynapse.bulk_enqueue_rows() RETURNS bigint LANGUAGE sql"
                     " IMMUTABLE AS 'SELECT 5::bigint'")
        load = ("INSERT INTO pgsynapse.documents (id, title, body) SELECT 9000000 + g, 'T', 'body ' || g"
                " FROM generate_series(1, %s) g")
        with conn.transaction():
            conn.execute(load, (6,))
            conn.execute("DELETE FROM pgsynapse.documents WHERE id > 9000000")
            conn.execute(load, (8,))
        conn.execute(load.replace("9000000 + g", "9000100 + g"), (7,))  # another bulk job beside it
        jobs = conn.execute("SELECT ref_id, ARRAY(SELECT unnest(ref_ids) ORDER BY 1) FROM pgsynapse.jobs"
                            " WHERE status = 'pending' ORDER BY ref_id DESC").fetchall()
    assert jobs == [(-9000001, [9000000 + i for i in range(1, 9)]), (-9000101, [9000100 + i for i in range(1, 8)])]


async def test_a_retired_version_is_unloaded_by_the_workers(db_url, models):
    conn = await aconn(db_url)
    await conn.execute("INSERT INTO pgsynapse.model_versions (id, name, runtime, dim, status)"
                       " VALUES (2, 'v2', 'torch', 384, 'candidate')")
    await conn.execute("SELECT pgsynapse.ensure_embedding_index(2)")
    v2_loaded = ("SELECT EXISTS (SELECT 1 FROM pgsynapse.workers, jsonb_array_elements(models) m"
                 " WHERE (m->>'version')::int = 2)")
    async with running_worker(fast_settings(db_url), models):
        insert_docs(db_url, [("Doc", "A document embedded by both serving versions.")])
        await wait_until(conn, ALL_DONE)
        await wait_until(conn, v2_loaded)
        await conn.execute("UPDATE pgsynapse.model_versions SET status = 'retired' WHERE id = 2")
        await wait_until(conn, f"SELECT NOT ({v2_loaded})")
        assert [m.spec.version_id for m in models.loaded()] == [1]
    await conn.close()


async def test_status_shows_each_running_worker_with_its_models_and_memory(db_url, models):
    import os

    from psycopg.rows import dict_row

    conn = await aconn(db_url)
    async with running_worker(fast_settings(db_url), models) as worker:
        # registered once started, not at the maintenance loop's first turn (the partition chaos test cut a worker
        # off before that and status never showed it)
        assert (await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.workers")).fetchone())["n"] == 1
        with psycopg.connect(db_url, row_factory=dict_row) as c:
            snap = snapshot(c)
        [w] = snap["workers"]
        assert (w["worker_id"], w["pid"]) == (worker.worker_id, os.getpid())
        # (the test session's shared model cache may hold other versions loaded by earlier tests)
        v1 = next(m for m in w["models"] if (m["version"], m["runtime"]) == (1, "torch"))
        assert w["rss_mb"] > 100 and v1["load_seconds"] > 0
        text = render(snap)
        assert "model v1 all-MiniLM-L6-v2 (torch): loaded in" in text and "STALE" not in text and "GONE" not in text
        assert w["connected"]  # its LISTEN connection holds the worker's presence lock
    # a clean stop removes the registration
    await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.workers")
    await conn.close()
