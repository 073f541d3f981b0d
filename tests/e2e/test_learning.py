"""The learning loop end to end on real Postgres with the real model: feedback -> automatic retrain ->
held-out metrics -> backfill -> A/B routing -> ab-report -> promote -> rollback -> retire, and a worker
killed during backfill that resumes without duplicates."""

from __future__ import annotations

import gzip
import json
import re
import signal
from importlib import resources

import psycopg
import pytest
from psycopg.rows import dict_row

from pgsynapse.learning.abreport import ab_report, render
from pgsynapse.learning.registry import retire
from pgsynapse.learning.routing import choose_version
from pgsynapse.models import default_model_path
from pgsynapse.queries import q
from tests.helpers import aconn, pgsynapse, spawn_worker, wait_until

pytestmark = pytest.mark.anyio


def _pages() -> list[dict]:
    """Real pages shipped with the package: SQL reference pages whose second line is 'NAME — what it does'."""
    with resources.files("pgsynapse").joinpath("data", "demo_corpus.jsonl.gz").open("rb") as raw:
        with gzip.open(raw, "rt") as f:
            docs = [json.loads(line) for line in f]
    out = []
    for d in docs:
        lines = d["text"].split("\n")
        m = re.match(r"^([A-Z][A-Z ]+) — (.+)$", lines[1]) if len(lines) > 1 else None
        if m and d["id"].startswith("sql-"):
            out.append({**d, "command": m.group(1), "what": m.group(2), "text": d["text"][:1200]})
    return out


def _questions(pages: list[dict]) -> list[tuple[str, int]]:
    """Known question -> page pairs, generated from each page's own summary line."""
    qs = []
    for i, p in enumerate(pages):
        qs.append((f"how do I {p['what']}", i))
        qs.append((f"which statement can {p['what']}", i))
        qs.append((f"what is the syntax of {p['command'].lower()}", i))
    return qs


async def _helpful_feedback(conn: psycopg.AsyncConnection, pages: list[dict]) -> None:
    """Each of :func:`_questions`' questions asked (answered) and marked helpful on its page's first chunk."""
    docs = {r["source"]: r["id"] for r in await (await conn.execute(
        "SELECT id, source FROM pgsynapse.documents")).fetchall()}
    for text, page in _questions(pages):
        qid = (await (await conn.execute("INSERT INTO pgsynapse.questions (text, status) VALUES (%s, 'answered')"
                                         " RETURNING id", (text,))).fetchone())["id"]
        await conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id) SELECT %s, true, id"
                           " FROM pgsynapse.chunks WHERE document_id = %s ORDER BY ord LIMIT 1",
                           (qid, docs[pages[page]["id"]]))


LEARN_ENV = {
    "PGSYNAPSE_KINDS": "embed,answer,retrain,backfill",
    "PGSYNAPSE_RETRAIN_SYNTHETIC_PAIRS": "0",
    "PGSYNAPSE_RETRAIN_BATCH_SIZE": "8",
    "PGSYNAPSE_RETRAIN_MARGIN": "-1",  # the flow under test: let the candidate through whatever it scores
    "PGSYNAPSE_RETRAIN_HELDOUT_FRACTION": "0.25",
    "PGSYNAPSE_ROLLOUT_TRAFFIC_PERCENT": "30",
    "PGSYNAPSE_BACKFILL_BATCH": "16",
    "PGSYNAPSE_BACKFILL_THROTTLE_SECONDS": "0",
    "PGSYNAPSE_CHUNK_TOKENS": "128",
}


def _routable(url: str) -> list[dict]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(q("routable_versions", "answers.sql")).fetchall()


async def test_feedback_retrains_backfills_routes_promotes_and_rolls_back(db_url, tmp_path):
    # 8 pages, 24 questions: the flow, not the model's quality, is under test (the margin lets any candidate through)
    pages = _pages()[:8]
    questions = _questions(pages)
    conn = await aconn(db_url)
    n_feedback = len(questions)
    env = {**LEARN_ENV, "PGSYNAPSE_RETRAIN_MIN_FEEDBACK": str(n_feedback), "PGSYNAPSE_DATA_DIR": str(tmp_path)}
    worker = spawn_worker(db_url, env=env)
    try:
        cur = await conn.execute(
            "INSERT INTO pgsynapse.documents (source, title, body) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])"
            " RETURNING id", ([p["id"] for p in pages], [p["title"] for p in pages], [p["text"] for p in pages]))
        doc_ids = [r["id"] for r in await cur.fetchall()]
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'")

        # users ask; the worker answers
        cur = await conn.execute(
            "INSERT INTO pgsynapse.questions (session_id, text) SELECT * FROM unnest(%s::text[], %s::text[]) RETURNING id",
            ([f"s{i}" for i in range(len(questions))], [t for t, _ in questions]))
        q_ids = [r["id"] for r in await cur.fetchall()]
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.questions WHERE status = 'pending'",
                         channel="pgsynapse_answers")
        rows = {r["id"]: r for r in await (await conn.execute(
            "SELECT id, sources FROM pgsynapse.questions WHERE id = ANY(%s)", (q_ids,))).fetchall()}

        # feedback from known pairs: helpful with the right page's passage, unhelpful when the top source is wrong
        helpful, unhelpful = [], []
        for qid, (_, page) in zip(q_ids, questions, strict=True):
            right = doc_ids[page]
            chunk = (await (await conn.execute(
                "SELECT id FROM pgsynapse.chunks WHERE document_id = %s ORDER BY ord LIMIT 1", (right,))).fetchone())["id"]
            helpful.append((qid, chunk))
            top = (rows[qid]["sources"] or [{}])[0].get("document_id")
            if top is not None and top != right:
                unhelpful.append(qid)
        # bad feedback is refused by constraints, with a clear error
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="feedback_question_must_exist"):
            await conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (-1, true)")
        with pytest.raises(psycopg.errors.CheckViolation, match="feedback_rating_between_1_and_5"):
            await conn.execute("INSERT INTO pgsynapse.feedback (question_id, rating) VALUES (%s, 9)", (q_ids[0],))

        await conn.execute("LISTEN pgsynapse_jobs")
        if unhelpful:
            await conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) SELECT unnest(%s::bigint[]), false",
                               (unhelpful,))
        # one statement below the threshold queues nothing; the statement that reaches it queues one retrain
        await conn.execute(
            "INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id)"
            " SELECT * FROM unnest(%s::bigint[], %s::bool[], %s::bigint[])",
            ([h[0] for h in helpful[:-1]], [True] * (len(helpful) - 1), [h[1] for h in helpful[:-1]]))
        assert (await (await conn.execute(
            "SELECT count(*) AS n FROM pgsynapse.jobs WHERE kind = 'retrain'")).fetchone())["n"] == 0
        await conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id) VALUES (%s, true, %s)",
                           helpful[-1])
        await conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id) VALUES (%s, true, %s)",
                           helpful[-1])  # a second statement over the threshold: still one pending retrain
        retrains = await (await conn.execute(
            "SELECT count(*) AS n FROM pgsynapse.jobs WHERE kind = 'retrain'")).fetchone()
        assert retrains["n"] == 1

        # the worker retrains by itself, registers the candidate with held-out metrics, backfills it
        # ... and a worker settles its runtime (here torch: tests run PGSYNAPSE_RUNTIME=torch) before its A/B share
        await wait_until(conn, "SELECT count(*) = 1 FROM pgsynapse.model_versions WHERE backfilled_at IS NOT NULL"
                               " AND NOT runtime_pending AND id > 1", channel="pgsynapse_models", timeout=600)
        cand = await (await conn.execute(
            "SELECT id, status, traffic_percent, metrics, base_version_id FROM pgsynapse.model_versions WHERE id > 1"
        )).fetchone()
        assert cand["status"] == "candidate" and float(cand["traffic_percent"]) == 30.0 and cand["base_version_id"] == 1
        m = cand["metrics"]
        # three templates asked about every page: the grouped hold-out has nothing to hold out that training would
        # not see (learning/holdout.py), so only retrain_margin = -1 lets this candidate through, marked forced
        # (training examples: one per question, its latest feedback's: the repeated click counts once, and the
        # questions marked unhelpful first are trained on their later helpful row)
        assert m["split"]["groups"] <= 3 and m["heldout"] == 0 and m["train_examples"] == n_feedback
        assert m["gate"]["passed"] is True and m["gate"]["forced"] is True
        assert m["gate"]["reasons"][0].startswith("no grouped hold-out"), m["gate"]["reasons"]
        assert "gate_scores" not in m  # per-question scores stay in the artifact
        # the recipe is in the metrics: the default is one run (no soup), the fine-tuned weights as trained
        assert m["soup"] == 1 and m["interpolate"] == 1.0 and m["steps"] >= 1, m
        logged = worker.wait_event("retrain_gate")
        assert logged["version"] == cand["id"] and logged["passed"] is True and logged["forced"] is True
        assert logged["reasons"] == m["gate"]["reasons"]
        # ... and the registry's history says so, by the worker that ran the job
        registered = await (await conn.execute(
            "SELECT event, reason, figures->>'forced' AS forced, actor FROM pgsynapse.model_events"
            " WHERE model_version_id = %s", (cand["id"],))).fetchall()
        assert [(e["event"], e["reason"], e["forced"]) for e in registered] == [
            ("registered", "; ".join(m["gate"]["reasons"]), "true")]
        assert registered[0]["actor"] == worker.wait_event("worker_started")["worker"]
        # the canary set was built by this first retrain from the corpus, frozen with the active version, and
        # scored: one question per page (8 < MIN_CANARY: reported, not checked)
        canary = await (await conn.execute(
            "SELECT count(*) AS n, count(DISTINCT document_id) AS docs, min(frozen_with_version) AS v"
            " FROM pgsynapse.canary_questions")).fetchone()
        assert canary == {"n": len(pages), "docs": len(pages), "v": 1}
        assert m["canary_active"]["n"] == len(pages) and 0 <= m["canary_candidate"]["recall@5"] <= 1
        assert m["gate"]["canary"]["n"] == len(pages)
        counts = await (await conn.execute(
            "SELECT (SELECT count(*) FROM pgsynapse.chunks) AS chunks,"
            " (SELECT count(*) FROM pgsynapse.embeddings WHERE model_version_id = %s) AS cand", (cand["id"],))).fetchone()
        assert counts["cand"] == counts["chunks"]
        # the candidate is a query encoder: it searches v1's chunk vectors, copied by its backfill, and a document
        # added now is encoded once, by v1's model, for both versions
        assert (await (await conn.execute("SELECT passage_version_id AS p FROM pgsynapse.model_versions WHERE id = %s",
                                          (cand["id"],))).fetchone())["p"] == 1
        [new_doc] = [r["id"] for r in await (await conn.execute(
            "INSERT INTO pgsynapse.documents (source, title, body) VALUES ('late', %s, %s) RETURNING id",
            (pages[0]["title"] + " (again)", pages[0]["text"][:600]))).fetchall()]
        await wait_until(conn, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (new_doc,))
        differing = await (await conn.execute(
            "SELECT count(*) FILTER (WHERE c.embedding IS DISTINCT FROM b.embedding) AS differ, count(c.*) AS cand,"
            " count(*) AS base FROM pgsynapse.embeddings b LEFT JOIN pgsynapse.embeddings c"
            " ON c.chunk_id = b.chunk_id AND c.model_version_id = %s WHERE b.model_version_id = 1",
            (cand["id"],))).fetchone()
        total = (await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.chunks")).fetchone())["n"]
        assert total > counts["chunks"] and differing["differ"] == 0 and differing["cand"] == differing["base"] == total
        trained = await (await conn.execute(
            "SELECT count(*) FILTER (WHERE trained_in_version = %s) AS used, count(*) AS total,"
            " count(*) FILTER (WHERE superseded_by IS NOT NULL) AS superseded"
            " FROM pgsynapse.training_examples WHERE positive_chunk_id IS NOT NULL", (cand["id"],))).fetchone()
        # every example that stands was trained on; the repeated click's first row stands no more and was not
        assert (trained["used"], trained["superseded"], trained["total"]) == (n_feedback, 1, n_feedback + 1)

        # A/B: about 30% of 1,000 sessions go to the candidate, sticky per session
        versions = _routable(db_url)
        picks = [choose_version(versions, f"session-{i}")["id"] for i in range(1000)]
        share = picks.count(cand["id"]) / 1000
        assert 0.25 <= share <= 0.35, share
        assert picks == [choose_version(versions, f"session-{i}")["id"] for i in range(1000)]

        # questions from sessions on both sides record their version; ab-report shows both
        sessions = [f"session-{i}" for i in range(40)]
        cur = await conn.execute(
            "INSERT INTO pgsynapse.questions (session_id, text) SELECT unnest(%s::text[]), 'how do I create a new table'"
            " RETURNING id", (sessions,))
        ab_ids = [r["id"] for r in await cur.fetchall()]
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.questions WHERE status = 'pending'",
                         channel="pgsynapse_answers")
        got = await (await conn.execute(
            "SELECT session_id, model_version_id FROM pgsynapse.questions WHERE id = ANY(%s)", (ab_ids,))).fetchall()
        assert {r["model_version_id"] for r in got} == {1, cand["id"]}
        assert all(r["model_version_id"] == choose_version(versions, r["session_id"])["id"] for r in got)
        await conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) SELECT unnest(%s::bigint[]), true",
                           (ab_ids,))
        with psycopg.connect(db_url, row_factory=dict_row, autocommit=True) as sync:
            report = ab_report(sync)
            text = render(report)
            assert {r["version"] for r in report["versions"]} >= {1, cand["id"]}
            assert f"v{cand['id']}" in text and "v1" in text and "95% CI" in text

            # the CLI, as an operator uses it
            shown = pgsynapse("ab-report", url=db_url)
            assert shown.returncode == 0 and f"v{cand['id']}" in shown.stdout and "v1 " in shown.stdout, shown.stderr
            promoted = pgsynapse("promote", str(cand["id"]), url=db_url)
            assert promoted.returncode == 0 and f"model version {cand['id']} is active" in promoted.stdout
            versions = _routable(db_url)
            assert {choose_version(versions, f"session-{i}")["id"] for i in range(1000)} == {cand["id"]}
            again = pgsynapse("promote", str(cand["id"]), url=db_url)
            assert again.returncode == 1 and "already active" in again.stderr
            back = pgsynapse("rollback", url=db_url)
            assert back.returncode == 0 and "model version 1 is active" in back.stdout
            versions = _routable(db_url)
            assert {choose_version(versions, f"session-{i}")["id"] for i in range(1000)} == {1}
            deleted = retire(sync, cand["id"])
            assert deleted == total
            left = sync.execute("SELECT count(*) AS n FROM pgsynapse.embeddings WHERE model_version_id = %s",
                                (cand["id"],)).fetchone()
            assert left["n"] == 0
    finally:
        assert worker.stop() == 0
        await conn.close()


async def test_worker_killed_during_backfill_resumes_without_duplicates(db_url, tmp_path, models):
    """Register a candidate by hand (a copy of the default model) and kill the worker mid-backfill."""
    import shutil

    pages = _pages()[:6]  # several backfill batches of 4 chunks: the kill lands between two of them
    conn = await aconn(db_url)
    env = {**LEARN_ENV, "PGSYNAPSE_BACKFILL_BATCH": "4", "PGSYNAPSE_LEASE_SECONDS": "2",
           "PGSYNAPSE_BACKFILL_THROTTLE_SECONDS": "0.5", "PGSYNAPSE_DATA_DIR": str(tmp_path)}
    worker = spawn_worker(db_url, env=env)
    await conn.execute(
        "INSERT INTO pgsynapse.documents (source, title, body) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])",
        ([p["id"] for p in pages], [p["title"] for p in pages], [p["text"] for p in pages]))
    await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status = 'pending'")
    copy = tmp_path / "candidate-model"
    shutil.copytree(default_model_path(), copy)
    row = await (await conn.execute(
        "INSERT INTO pgsynapse.model_versions (name, base_version_id, artifact_path, dim, status)"
        " VALUES ('copy', 1, %s, 384, 'candidate') RETURNING id", (str(copy),))).fetchone()
    version = row["id"]
    await conn.execute("SELECT pgsynapse.ensure_embedding_index(%s)", (version,))
    mark = len(worker.events)
    await conn.execute(q("enqueue_backfill", "learning.sql").replace("%(version)s", str(version))
                       .replace("%(payload)s", "'{\"traffic_percent\": 5}'::jsonb").replace("%(delay)s", "0"))
    worker.wait_event("backfill_progress", start=mark)
    # the event is logged inside the write transaction: wait for its commit, then kill mid-backfill
    await wait_until(conn, "SELECT count(*) > 0 FROM pgsynapse.embeddings WHERE model_version_id = %s", (version,),
                     channel="pgsynapse_jobs")
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(30)
    part = await (await conn.execute(
        "SELECT count(*) AS n FROM pgsynapse.embeddings WHERE model_version_id = %s", (version,))).fetchone()
    total = (await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.chunks")).fetchone())["n"]
    assert 0 < part["n"] < total
    snap = json.loads(pgsynapse("status", "--json", url=db_url).stdout)
    row = next(v for v in snap["model_versions"] if v["id"] == version)
    assert row["backfill"] == f"{part['n']}/{total}"  # progress in status
    restarted = spawn_worker(db_url, env=env)
    try:
        await wait_until(conn, "SELECT backfilled_at IS NOT NULL FROM pgsynapse.model_versions WHERE id = %s",
                         (version,), channel="pgsynapse_models", timeout=300)
        done = await (await conn.execute(
            "SELECT count(*) AS n, count(DISTINCT chunk_id) AS distinct_chunks FROM pgsynapse.embeddings"
            " WHERE model_version_id = %s", (version,))).fetchone()
        assert done["n"] == done["distinct_chunks"] == total
        # the copy is the same model: its vectors equal the active version's
        same = await (await conn.execute(
            "SELECT max(a.embedding <-> b.embedding) AS d FROM pgsynapse.embeddings a JOIN pgsynapse.embeddings b"
            " ON a.chunk_id = b.chunk_id WHERE a.model_version_id = 1 AND b.model_version_id = %s", (version,))).fetchone()
        assert same["d"] < 1e-3
    finally:
        assert restarted.stop() == 0
        await conn.close()
