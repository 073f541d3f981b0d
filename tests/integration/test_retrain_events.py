"""A retrain's verdict, where a person and the registry's history see it: `pgsynapse retrain --wait` prints the
gate's sets and reasons and exits 1 for a rejection (`--json` the gate itself, as stdout's one JSON document; a
retrain already pending is the one it waits for), the version the gate rejected has a `rejected` row in
pgsynapse.model_events with those reasons and the worker that decided (docs/operations.md says that row tells the
offline gate's rejection from the A/B test's), and it is not listed as waiting for a runtime export it will never
get: its weights are deleted, its metrics kept. Real Postgres, the real default model, the worker's own retrain
job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import anyio
import psycopg
import pytest
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.cli import main
from pgsynapse.errors import RegistryError
from pgsynapse.export import run_export
from pgsynapse.handlers.base import Job
from pgsynapse.handlers.retrain import RetrainHandler
from pgsynapse.learning.cli import queue_retrain, render_versions
from pgsynapse.learning.registry import promote
from pgsynapse.queries import q
from pgsynapse.search import version_row
from pgsynapse.status import render, snapshot
from tests.e2e.test_learning import _helpful_feedback, _pages
from tests.helpers import aconn, fast_settings, logs_until, pgsynapse, running_worker, wait_until

pytestmark = pytest.mark.anyio


async def test_a_retrain_the_gate_rejects_is_printed_and_recorded_with_its_reasons(db_url, models, tmp_path):
    pages = _pages()[:4]
    conn = await aconn(db_url)
    await conn.execute(
        "INSERT INTO pgsynapse.documents (source, title, body) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])",
        ([p["id"] for p in pages], [p["title"] for p in pages], [p["text"] for p in pages]))
    settings = fast_settings(db_url, kinds=("embed", "retrain"), data_dir=str(tmp_path / "data"),
                             retrain_synthetic_pairs=0, retrain_batch_size=8)
    async with running_worker(settings, models) as worker:
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status <> 'embedded'")
        await _helpful_feedback(conn, pages)
        # the command waits for the job's NOTIFY in its own process while this one's worker runs the job
        waited = await anyio.to_thread.run_sync(lambda: pgsynapse("retrain", "--wait", url=db_url, timeout=300))
        worker_id = worker.worker_id
    assert waited.returncode == 1, waited.stderr[-2000:]  # the gate rejected the candidate
    # a retrain already queued (by the feedback threshold, say) while no worker runs: --wait waits for that one
    with psycopg.connect(db_url, autocommit=True) as sync:
        pending = queue_retrain(sync)
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen([sys.executable, "-m", "pgsynapse", "retrain", "--wait", "--json"], env=env, cwd="/tmp",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True) as cli:
        assert cli.stderr is not None  # under --json: stdout is the JSON alone
        first_line = await anyio.to_thread.run_sync(cli.stderr.readline)  # said before any worker could claim it
        assert first_line == f"a retrain is already pending (job {pending}): waiting for it\n", first_line
        with capture_logs() as logs:
            async with running_worker(settings.model_copy(update={"kinds": ("retrain",)}), models):
                printed, err = await anyio.to_thread.run_sync(lambda: cli.communicate(timeout=300))
    assert cli.returncode == 1, err[-2000:]
    versions = (await (await conn.execute(
        "SELECT id, status, runtime_pending, metrics->'gate' AS gate FROM pgsynapse.model_versions WHERE id > 1"
        " ORDER BY id")).fetchall())
    first, second = versions
    jobs = [r["id"] for r in await (await conn.execute(
        "SELECT id FROM pgsynapse.jobs WHERE kind = 'retrain' ORDER BY id")).fetchall()]
    gate = first["gate"]
    # four pages, three questions about each: no group the gate could hold out, and no canary to check: rejected
    assert first["status"] == "rejected" and gate["passed"] is False, gate
    assert gate["reasons"][0].startswith("no grouped hold-out"), gate["reasons"]
    assert waited.stdout.splitlines() == [
        f"retrain queued (job {jobs[0]})",
        f"model version {first['id']}: rejected by its gate; the active version keeps serving",
        f"  canary:   {gate['canary']['n']} questions in {gate['canary']['groups']} groups, score gain "
        f"{gate['canary']['score']['gain']:+.3f} [{gate['canary']['score']['low']:+.3f}, "
        f"{gate['canary']['score']['high']:+.3f}]",
        *[f"  check: {reason}" for reason in gate["reasons"]]]
    assert jobs[1] == pending and json.loads(printed) == {
        "job": pending, "outcome": "done", "version": second["id"], "status": "rejected", "gate": second["gate"]}
    assert first["runtime_pending"] is False  # it never serves: no export will come
    # the second retrain trains on every example, though the first marked them all trained: its log says both
    [started] = [e for e in logs if e["event"] == "retrain_started"]
    assert (started["job"], started["examples"], started["new_examples"]) == (pending, 12, 0), started
    # nor does it load again: its weights are deleted (88 MB a retrain for this model), its metrics.json kept
    for v in versions:
        path = Path((await (await conn.execute("SELECT artifact_path FROM pgsynapse.model_versions WHERE id = %s",
                                               (v["id"],))).fetchone())["artifact_path"])
        assert path.is_relative_to(tmp_path / "data" / "models") and (path / "metrics.json").is_file()
        assert (path / "config.json").is_file() and not list(path.rglob("*.safetensors")), sorted(path.rglob("*"))
    # and nothing can search with it: it was never backfilled, and not because it is still on its way
    with pytest.raises(RegistryError, match=f"^model version {first['id']} was rejected by its gate: it has no "
                       "vectors of its own"):
        await version_row(conn, first["id"])
    # nor export it: a new candidate from it would bypass its gate (and its weights are gone)
    with pytest.raises(RegistryError, match=f"^model version {first['id']} is rejected: export the active version or a "
                       "candidate"):
        run_export(settings, "onnx", version=first["id"])
    events = (await (await conn.execute(
        "SELECT event, reason, figures, actor FROM pgsynapse.model_events WHERE model_version_id = %s",
        (first["id"],))).fetchall())
    assert [(e["event"], e["reason"], e["actor"]) for e in events] == [
        ("rejected", "; ".join(gate["reasons"]), worker_id)]
    assert events[0]["figures"] == {"job": jobs[0], "passed": False, "forced": False, "delta": gate["delta"]}
    await conn.close()
    with psycopg.connect(db_url, row_factory=dict_row) as sync:
        listed = render_versions(sync)
        shown = render(snapshot(sync))
    line = next(ln for ln in listed.splitlines() if ln.split()[:2] == [str(first["id"]), "rejected"])
    assert "waiting for its runtime export" not in line, listed
    assert f"v{first['id']}    rejected                 by {worker_id}: {gate['reasons'][0]}" in shown, shown



async def _command_ends(capsys: pytest.CaptureFixture[str], url: str, args: list[str], kind: str,
                        end: str | None = None, **params: object) -> tuple[int, str, str]:
    """Run ``pgsynapse *args`` in this process (cli.main, in a thread: no new interpreter's imports); once its
    ``kind`` job is queued, end that job as a worker would (``end``: SQL with ``%(job)s`` and ``params``; it may
    register what the job made) and wake the command. Returns the command's exit code, stdout and stderr."""
    conn = await aconn(url)
    capsys.readouterr()
    code: list[int] = []

    async def command() -> None:  # abandoned if the test fails first: dropping the database ends its wait
        code.append(await anyio.to_thread.run_sync(lambda: main(["--database-url", url, *args]),
                                                   abandon_on_cancel=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(command)
        await wait_until(conn, "SELECT EXISTS (SELECT 1 FROM pgsynapse.jobs WHERE kind = %s AND status = 'pending')",
                         (kind,), channel="pgsynapse_jobs")
        if end:
            job = (await (await conn.execute("SELECT id FROM pgsynapse.jobs WHERE kind = %s AND status = 'pending'",
                                             (kind,))).fetchone())["id"]
            await conn.execute(end, {"job": job, **params})
            await conn.execute("SELECT pg_notify('pgsynapse_jobs', '{}')")
    await conn.close()
    out, err = capsys.readouterr()
    return code[0], out, err


def _here(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``pgsynapse ARGS`` run in this process (cli.main: its exit code, stdout and stderr), without a new
    interpreter's imports (seconds a command)."""
    capsys.readouterr()
    code = main(["--database-url", url, *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["pgsynapse", *args], code, out, err)


def _example(c: psycopg.Connection) -> None:
    """One training example (a document, its chunk, a question on it): what a `retrain` trains on."""
    doc = c.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('t', 'b') RETURNING id").fetchone()[0]
    chunk = c.execute("INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start, char_end,"
                      " content_hash) VALUES (%s, 0, 'x', 1, 0, 1, 'h') RETURNING id", (doc,)).fetchone()[0]
    c.execute("INSERT INTO pgsynapse.training_examples (query, positive_chunk_id) VALUES ('q', %s)", (chunk,))


def _correction(c: psycopg.Connection) -> None:
    """One approved correction of an answered data question: what a `sql-model retrain` trains on."""
    [question] = c.execute("INSERT INTO pgsynapse.data_questions (text, status, sql) VALUES ('how many?',"
                           " 'answered', 'SELECT 1') RETURNING id").fetchone()
    c.execute("INSERT INTO pgsynapse.sql_corrections (question_id, approved) VALUES (%s, true)", (question,))


def _queued(err: str, kind: str) -> int:
    """The job the command said it queued (on stderr under --json)."""
    [line] = [ln for ln in err.splitlines() if ln.startswith(f"{kind} queued (job ")]
    return int(line.removeprefix(f"{kind} queued (job ").split(")")[0])


SKIPPED = "UPDATE pgsynapse.jobs SET status = 'done', finished_at = now(), skip_reason = %(why)s WHERE id = %(job)s"
FAILED = "UPDATE pgsynapse.jobs SET status = 'failed', finished_at = now(), last_error = %(why)s WHERE id = %(job)s"
DONE = "WITH j AS (UPDATE pgsynapse.jobs SET status = 'done', finished_at = now() WHERE id = %(job)s) "
GATE = {"passed": False, "forced": False, "reasons": ["the hold-out gain's lower bound is below the margin"]}
# as the retrain job registers its version: the row, and its `rejected` event naming the job
REJECTED_VERSION = DONE + (", v AS (INSERT INTO pgsynapse.model_versions (name, kind, runtime, dim, status, metrics)"
                           " VALUES ('retrained', 'embedding', 'torch', 384, 'rejected', %(metrics)s) RETURNING id)"
                           " INSERT INTO pgsynapse.model_events (model_version_id, event, figures)"
                           " SELECT id, 'rejected', jsonb_build_object('job', %(job)s::bigint) FROM v")
# as the sql_retrain job registers its model: its metrics name the job
REJECTED_SQL_MODEL = DONE + ("INSERT INTO pgsynapse.sql_models (name, path, runtime, status, metrics)"
                             " VALUES ('retrained', '/nowhere', 'transformers', 'rejected',"
                             " %(metrics)s::jsonb || jsonb_build_object('job', %(job)s::bigint))")


async def test_retrain_wait_json_prints_one_json_document_and_a_rejection_exits_1(db_url, capsys):
    """stdout under --json is one JSON document whatever became of the job (the lines for people go to stderr), for
    `retrain` and `sql-model retrain` alike; a gate that rejected the candidate is exit 1, as README's exit codes
    say (a failed job too; a skipped one is not a failure). Each job is ended here as a worker would end it."""
    with psycopg.connect(db_url, autocommit=True) as c:
        _example(c)
        _correction(c)
    metrics = json.dumps({"gate": GATE})
    nothing = {"version": None, "status": None, "gate": None}

    code, out, err = await _command_ends(capsys, db_url, ["retrain", "--wait", "--json"], "retrain", REJECTED_VERSION,
                                         metrics=metrics)
    printed = json.loads(out)
    assert (code, printed) == (1, {"job": _queued(err, "retrain"), "outcome": "done", "version": printed["version"],
                                   "status": "rejected", "gate": GATE}), (out, err)
    code, out, err = await _command_ends(capsys, db_url, ["retrain", "--wait"], "retrain", REJECTED_VERSION,
                                         metrics=metrics)
    assert code == 1 and out.splitlines() == [
        f"retrain queued (job {_queued(out, 'retrain')})",
        f"model version {printed['version'] + 1}: rejected by its gate; the active version keeps serving",
        f"  check: {GATE['reasons'][0]}"], (out, err)
    code, out, err = await _command_ends(capsys, db_url, ["retrain", "--wait", "--json"], "retrain", FAILED, why="OOM")
    assert (code, json.loads(out)) == (1, {"job": _queued(err, "retrain"), "outcome": "failed", "error": "OOM",
                                           **nothing}), (out, err)
    code, out, err = await _command_ends(capsys, db_url, ["retrain", "--wait", "--json"], "retrain", SKIPPED,
                                         why="nothing new to learn from")
    assert (code, json.loads(out)) == (0, {"job": _queued(err, "retrain"), "outcome": "skipped",
                                           "skip_reason": "nothing new to learn from", **nothing}), (out, err)
    assert "retrain skipped: nothing new to learn from" in err
    # without --wait: the job queued, and nothing else to say
    code, out, err = await _command_ends(capsys, db_url, ["retrain", "--json"], "retrain")
    assert (code, json.loads(out)) == (0, {"job": _queued(err, "retrain"), "outcome": "queued", **nothing}), (out, err)

    sql_nothing = {"sql_model": None, "status": None, "traffic_percent": None, "gate": None}
    code, out, err = await _command_ends(capsys, db_url, ["sql-model", "retrain", "--wait", "--json"], "sql_retrain",
                                         REJECTED_SQL_MODEL, metrics=metrics)
    printed = json.loads(out)
    assert (code, printed) == (1, {"job": _queued(err, "sql_retrain"), "outcome": "done",
                                   "sql_model": printed["sql_model"], "status": "rejected", "traffic_percent": 0.0,
                                   "gate": GATE}), (out, err)
    code, out, err = await _command_ends(capsys, db_url, ["sql-model", "retrain", "--wait", "--json"], "sql_retrain",
                                         SKIPPED, why="only 1 new correction")
    assert (code, json.loads(out)) == (0, {"job": _queued(err, "sql_retrain"), "outcome": "skipped",
                                           "skip_reason": "only 1 new correction", **sql_nothing}), (out, err)


async def test_retrain_wait_reports_its_own_job_s_version_not_one_a_retrain_running_meanwhile_registered(db_url):
    """`retrain --wait` reports the version its own job registered, not one another retrain (a worker's, started
    once this one was queued) registered first. Each job is ended here as a worker would end it, the other one
    first."""
    with psycopg.connect(db_url, autocommit=True) as c:
        _example(c)
    theirs = {**GATE, "reasons": ["the running retrain's reason"]}
    mine = {**GATE, "reasons": ["this retrain's reason"]}
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1"}
    conn = await aconn(db_url)
    with subprocess.Popen([sys.executable, "-m", "pgsynapse", "retrain", "--wait", "--json"], env=env, cwd="/tmp",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True) as cli:
        await wait_until(conn, "SELECT EXISTS (SELECT 1 FROM pgsynapse.jobs WHERE kind = 'retrain' AND status ="
                         " 'pending')", channel="pgsynapse_jobs")
        job = (await (await conn.execute("SELECT id FROM pgsynapse.jobs WHERE kind = 'retrain' AND status ="
                                         " 'pending'")).fetchone())["id"]
        running = (await (await conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id, payload, status, attempts)"
                                             " VALUES ('retrain', 1, '{}', 'running', 1) RETURNING id")).fetchone())["id"]
        await conn.execute(REJECTED_VERSION, {"job": running, "metrics": json.dumps({"gate": theirs})})
        await conn.execute(REJECTED_VERSION, {"job": job, "metrics": json.dumps({"gate": mine})})
        await conn.execute("SELECT pg_notify('pgsynapse_jobs', '{}')")
        out, err = await anyio.to_thread.run_sync(lambda: cli.communicate(timeout=120))
    [their_version, my_version] = [r["model_version_id"] for r in await (await conn.execute(
        "SELECT model_version_id FROM pgsynapse.model_events WHERE event = 'rejected' ORDER BY id")).fetchall()]
    await conn.close()
    assert their_version < my_version
    assert (cli.returncode, json.loads(out)) == (1, {"job": job, "outcome": "done", "version": my_version,
                                                     "status": "rejected", "gate": mine}), (out, err)


def test_a_retrain_asked_for_while_one_runs_or_waits_queues_none_and_says_so(db_url, capsys):
    """One retrain at a time, as the feedback trigger queues them: `pgsynapse retrain` while one runs queued a
    second, which trained again on the same feedback (identical gate figures), and said nothing of the first; while
    one was pending its --json said "queued" where stderr said "already pending". Now it queues none, says which job
    runs or waits (exit 0: a retrain is under way), and --json's outcome says the same. `sql-model retrain` too."""
    with psycopg.connect(db_url, autocommit=True) as c:
        _example(c)
        _correction(c)
    nothing = {"version": None, "status": None, "gate": None}
    sql_nothing = {"sql_model": None, "status": None, "traffic_percent": None, "gate": None}
    for kind, command, empty in (("retrain", ["retrain"], nothing), ("sql_retrain", ["sql-model", "retrain"],
                                                                       sql_nothing)):
        with psycopg.connect(db_url, autocommit=True) as c:
            running = c.execute("INSERT INTO pgsynapse.jobs (kind, ref_id, payload, status, attempts) VALUES"
                                " (%s, 0, '{}', 'running', 1) RETURNING id", (kind,)).fetchone()[0]
        said = (f"a {kind} is already running (job {running}): nothing was queued (one at a time: it trains on what "
                "there was when it started; --wait waits for it)")
        r = _here(capsys, db_url, *command, "--json")
        assert (r.returncode, json.loads(r.stdout)) == (0, {"job": running, "outcome": "already_running", **empty}), (
            r.stdout, r.stderr)
        assert r.stderr.splitlines()[-1] == said, r.stderr
        r = _here(capsys, db_url, *command)
        assert (r.returncode, r.stdout.splitlines()) == (0, [said]), (r.stdout, r.stderr)
        with psycopg.connect(db_url, autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM pgsynapse.jobs WHERE kind = %s", (kind,)).fetchone() == (1,)
            c.execute("UPDATE pgsynapse.jobs SET status = 'done', finished_at = now() WHERE id = %s", (running,))
            pending = queue_retrain(c, kind)
        r = _here(capsys, db_url, *command, "--json")
        assert (r.returncode, json.loads(r.stdout)) == (0, {"job": pending, "outcome": "already_pending", **empty}), (
            r.stdout, r.stderr)
        assert r.stderr.splitlines()[-1] == (f"a {kind} is already pending (job {pending}): nothing was queued (it "
                                             "trains on what there is when it starts; --wait waits for it)"), r.stderr
        with psycopg.connect(db_url, autocommit=True) as c:
            assert c.execute("SELECT count(*) FROM pgsynapse.jobs WHERE kind = %s", (kind,)).fetchone() == (2,)


def test_a_forced_retrain_asked_for_while_an_unforced_one_waits_forces_that_one_or_says_why_not(db_url, capsys):
    """`sql-model retrain --force` while the threshold's sql_retrain (unforced) was pending queued none and dropped
    the --force without a word: the pending job registered nothing if it failed its gate. Now the pending job takes
    the flags asked for (and says so); a running one cannot, so it says that one is not forced and what to do.
    `pgsynapse retrain` ("now, whatever retrain_min_feedback") forces a pending threshold retrain too."""
    with psycopg.connect(db_url, autocommit=True) as c:
        _correction(c)
        _example(c)
        # as the triggers queue them at their thresholds: no flags
        sql_job, retrain_job = (c.execute("INSERT INTO pgsynapse.jobs (kind, ref_id) VALUES (%s, 0) RETURNING id",
                                          (kind,)).fetchone()[0] for kind in ("sql_retrain", "retrain"))
    r = _here(capsys, db_url, "sql-model", "retrain", "--force")
    assert (r.returncode, r.stdout.splitlines()) == (0, [
        f"a sql_retrain is already pending (job {sql_job}): nothing was queued; it now runs with --force (it trains "
        "on what there is when it starts; --wait waits for it)"]), (r.stdout, r.stderr)
    r = _here(capsys, db_url, "retrain")
    assert (r.returncode, r.stdout.splitlines()) == (0, [
        f"a retrain is already pending (job {retrain_job}): nothing was queued (it trains on what there is when it "
        "starts; --wait waits for it)"]), (r.stdout, r.stderr)
    with psycopg.connect(db_url, autocommit=True) as c:
        payloads = dict(c.execute("SELECT kind, payload FROM pgsynapse.jobs WHERE kind LIKE '%retrain'").fetchall())
        assert payloads == {"sql_retrain": {"force": True, "now": True}, "retrain": {"force": True}}, payloads
        c.execute("UPDATE pgsynapse.jobs SET status = 'running', attempts = 1, payload = '{}' WHERE id = %s",
                  (sql_job,))
    r = _here(capsys, db_url, "sql-model", "retrain", "--force")
    assert (r.returncode, r.stdout.splitlines()) == (0, [
        f"a sql_retrain is already running (job {sql_job}) without --force: nothing was queued (one at a time: it "
        "trains on what there was when it started, and registers its model only if it passes its gate; run "
        "`pgsynapse sql-model retrain --force` again once it ends; --wait waits for it)"]), (r.stdout, r.stderr)
    with psycopg.connect(db_url, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM pgsynapse.jobs WHERE kind LIKE '%retrain'").fetchone() == (2,)


async def test_sql_model_retrain_wait_reports_its_own_job_s_model_not_one_another_sql_retrain_registered(db_url):
    """`sql-model retrain --wait` reports the SQL model its own job registered: it took the first gated model
    registered after it was queued, so another sql_retrain's model, registered first, was printed (and exited by)
    as its own. Each job is ended here as a worker would end it, the other one first."""
    with psycopg.connect(db_url, autocommit=True) as c:
        _correction(c)
    theirs = {**GATE, "reasons": ["the other sql_retrain's reason"]}
    mine = {**GATE, "passed": True, "reasons": ["this sql_retrain's reason"], "delta": 0.5, "candidate": 0.5,
            "active": 0.0, "heldout": 2, "wins": 1, "losses": 0}
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1"}
    conn = await aconn(db_url)
    with subprocess.Popen([sys.executable, "-m", "pgsynapse", "sql-model", "retrain", "--wait", "--json"], env=env,
                          cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          text=True) as cli:
        await wait_until(conn, "SELECT EXISTS (SELECT 1 FROM pgsynapse.jobs WHERE kind = 'sql_retrain' AND status ="
                         " 'pending')", channel="pgsynapse_jobs")
        job = (await (await conn.execute("SELECT id FROM pgsynapse.jobs WHERE kind = 'sql_retrain' AND status ="
                                         " 'pending'")).fetchone())["id"]
        # another sql_retrain (a worker's, started meanwhile) registers its rejected model first
        other = (await (await conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id, payload, status, attempts)"
                                           " VALUES ('sql_retrain', 1, '{}', 'running', 1) RETURNING id")).fetchone())["id"]
        await conn.execute(REJECTED_SQL_MODEL, {"job": other, "metrics": json.dumps({"gate": theirs})})
        await conn.execute(REJECTED_SQL_MODEL.replace("'rejected'", "'candidate'"),
                           {"job": job, "metrics": json.dumps({"gate": mine})})
        await conn.execute("SELECT pg_notify('pgsynapse_jobs', '{}')")
        out, err = await anyio.to_thread.run_sync(lambda: cli.communicate(timeout=120))
    [their_model, my_model] = [r["id"] for r in await (await conn.execute(
        "SELECT id FROM pgsynapse.sql_models ORDER BY id")).fetchall()]
    await conn.close()
    assert (cli.returncode, json.loads(out)) == (0, {"job": job, "outcome": "done", "sql_model": my_model,
                                                     "status": "candidate", "traffic_percent": 0.0, "gate": mine}), (
        their_model, out, err)


async def test_retrain_wait_without_a_worker_that_takes_retrains_says_so_at_once(db_url, capsys):
    """`retrain --wait` with no running worker that takes retrain jobs waited without a word for ever; it says at
    once (on stderr: stdout under --json stays the one JSON document) that the retrain runs once `pgsynapse run`
    does, as `ingest --follow` and `model add --follow` say it for their jobs."""
    with psycopg.connect(db_url, autocommit=True) as c:
        _example(c)
    code, out, err = await _command_ends(capsys, db_url, ["retrain", "--wait", "--json"], "retrain", FAILED, why="OOM")
    assert (code, json.loads(out)["outcome"]) == (1, "failed"), (out, err)
    assert ("pgsynapse: no running worker takes retrain jobs: it runs once `pgsynapse run` does (waiting; Ctrl-C "
            "stops waiting, the retrain stays queued)") in err.splitlines(), err
    # with JSON logs (the systemd unit's) the note is a JSON event too: it was the one plain line among them
    code, out, err = await _command_ends(capsys, db_url, ["retrain", "--wait", "--log-format", "json"], "retrain", FAILED,
                                         why="OOM")
    assert code == 1 and out.startswith("retrain queued"), (out, err)
    [waiting] = [json.loads(line) for line in err.splitlines()]
    assert {"event": "retrain_waiting", "level": "warning", "kind": "retrain"}.items() <= waiting.items(), waiting
    assert waiting["note"].startswith("no running worker takes retrain jobs: it runs once `pgsynapse run` does"), waiting
    # --json with JSON logs: stdout is the one JSON document and every stderr line an event; the lines for people,
    # written to stderr under --json (the job queued, its failure), were plain text there
    code, out, err = await _command_ends(capsys, db_url, ["retrain", "--wait", "--json", "--log-format", "json",
                                                  "--log-level", "info"], "retrain", FAILED, why="OOM")
    events = [json.loads(line) for line in err.splitlines()]
    assert (code, json.loads(out)["outcome"]) == (1, "failed"), (out, err)
    assert [e["event"] for e in events if e["event"].startswith("retrain_")] == [
        "retrain_queued", "retrain_waiting", "retrain_failed"], events
    assert events[0]["job"] == json.loads(out)["job"] and events[0]["note"] == f"retrain queued (job {events[0]['job']})"


async def test_a_candidate_whose_active_version_changed_during_its_retrain_is_rejected_saying_so(
        db_url, models, tmp_path):
    """A retrain's gate compares its candidate with the version active when it started; when another version was
    promoted meanwhile (an A/B decision, by hand), the candidate was registered on a verdict against a version no
    longer active, then A/B tested against the new one. Now it is rejected, the reason first in its gate and in its
    registry event, and its examples stay untrained, so the next retrain (the feedback trigger's, or `pgsynapse
    retrain`) judges one against the new active version. The real retrain job's load, trainer and write."""
    pages = _pages()[:4]
    conn = await aconn(db_url)
    await conn.execute(
        "INSERT INTO pgsynapse.documents (source, title, body) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])",
        ([p["id"] for p in pages], [p["title"] for p in pages], [p["text"] for p in pages]))
    # the gate off: on v1's figures alone the candidate would be registered
    settings = fast_settings(db_url, kinds=("embed",), data_dir=str(tmp_path / "data"), retrain_synthetic_pairs=0,
                             retrain_batch_size=8, retrain_margin=-1)
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.documents WHERE status <> 'embedded'")
    await _helpful_feedback(conn, pages)
    # another version, backfilled and ready, that an A/B decision promotes while the retrain trains
    other = (await (await conn.execute(
        "INSERT INTO pgsynapse.model_versions (name, kind, runtime, dim, status, backfilled_at) VALUES"
        " ('other', 'embedding', 'torch', 384, 'candidate', now()) RETURNING id")).fetchone())["id"]
    job = (await (await conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id, payload, status, attempts, worker,"
                                     " started_at) VALUES ('retrain', 0, '{\"force\": true}', 'running', 1, 'w1',"
                                     " now()) RETURNING id, started_at")).fetchone())
    handler = RetrainHandler(settings, models)
    claimed = Job(job["id"], "retrain", 0, {"force": True}, 1, job["started_at"], job["started_at"])
    work, _ = await handler.load(conn, [claimed])
    [outcome] = await anyio.to_thread.run_sync(handler.compute, work)
    assert outcome.error is None, outcome.error
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as sync:
        promote(sync, other, reason="auto", actor="w2")
    with capture_logs() as logs:
        async with conn.transaction():
            await handler.write(conn, [outcome])
    row = await (await conn.execute("SELECT id, status, metrics->'gate' AS gate, artifact_path FROM"
                                    " pgsynapse.model_versions WHERE id > %s", (other,))).fetchone()
    said = (f"the active version changed during the retrain (version 1 when it started, version {other} now): its "
            f"gate compared the candidate with version 1, not with version {other}: retrain again")
    assert (row["status"], row["gate"]["passed"], row["gate"]["reasons"][0]) == ("rejected", False, said), row
    [event] = await (await conn.execute("SELECT event, reason, figures FROM pgsynapse.model_events WHERE"
                                        " model_version_id = %s", (row["id"],))).fetchall()
    assert (event["event"], event["reason"].split("; ")[0]) == ("rejected", said), event
    assert (event["figures"]["gated_against"], event["figures"]["active"]) == (1, other), event
    # its examples are new to the next retrain, which a rejection on its own verdict would not leave them
    untrained = (await (await conn.execute(q("feedback_progress", "learning.sql"))).fetchone())
    assert untrained["untrained"] == untrained["examples"] == 12, untrained
    assert not list(Path(row["artifact_path"]).rglob("*.safetensors"))  # it never serves: its weights go
    [changed] = [e for e in logs if e["event"] == "retrain_active_changed"]
    assert (changed["job"], changed["gated_against"], changed["active"]) == (job["id"], 1, other), changed
    await conn.close()


async def test_a_retrain_registration_waiting_for_the_registry_lock_says_so(db_url, models):
    """A retrain's write takes the registry's table lock before it registers its candidate, and so waits for every
    transaction holding the table (a promote left open in psql): the write waited without a word, as the registry
    commands did before they logged registry_lock_waiting. The write's own lock step, on the real registry."""
    handler = RetrainHandler(fast_settings(db_url), models)
    now = datetime.now(UTC)
    job = Job(1, "retrain", 0, {}, 1, now, now)
    conn = await aconn(db_url)
    moved: list[int | None] = []

    async def register() -> None:
        async with conn.transaction():
            moved.append(await handler._active_moved(conn, job, 1, {"passed": True, "reasons": []}))

    with psycopg.connect(db_url) as holder, logs_until("registry_lock_waiting") as (logs, logged):
        holder.execute("LOCK TABLE pgsynapse.model_versions IN SHARE ROW EXCLUSIVE MODE")  # in its transaction
        async with anyio.create_task_group() as tg:
            tg.start_soon(register)
            said = await anyio.to_thread.run_sync(logged, 60)  # the log event ends the wait
            assert said["table"] == "pgsynapse.model_versions", said
            assert holder.info.backend_pid in [h["pid"] for h in said["holders"]], said
            holder.commit()  # the registration goes on
    assert moved == [None]  # version 1 still active: nothing moved
    await conn.close()
