"""The online safety net (issue 23, item 4) on seeded A/B data: questions routed to each version with their
feedback rows, real workers deciding, real Postgres. Each test waits on row states, never on time."""

from __future__ import annotations

import json
import threading

import psycopg
import pytest
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from tests.helpers import aconn, adopt_runtime, fast_settings, logs_until, running_worker, wait_until
from pgsynapse.learning.abreport import ab_report
from pgsynapse.learning.abreport import render as render_ab
from pgsynapse.learning.autopromote import decide, detectable_drop, run_decisions
from pgsynapse.learning.registry import rollback, set_traffic
from pgsynapse.queries import q
from pgsynapse.status import render as render_status
from pgsynapse.status import snapshot

pytestmark = pytest.mark.anyio

# looks every maintenance tick (lease_seconds / 3 = 0.5 s); decided at 30 rated questions per side
AB = dict(lease_seconds=1.5, auto_promote_interval=0.1, auto_promote_min_rated=30, auto_promote_alpha=0.05)


def test_the_rule_decides_once_at_the_minimum_one_sided():
    assert decide(5, 29, 29, 29, min_rated=30, alpha=0.05).action is None  # however bad: not before the minimum
    worse = decide(9, 30, 24, 30, min_rated=30, alpha=0.05)  # 30 % vs 80 %
    assert worse.action == "rollback" and worse.z < -3.8 and worse.p_value < 1e-4
    same = decide(21, 30, 21, 30, min_rated=30, alpha=0.05)
    assert same.action == "promote" and same.z == 0 and same.p_value == 0.5
    better = decide(29, 30, 15, 30, min_rated=30, alpha=0.05)  # one-sided: a better candidate is never rolled back
    assert better.action == "promote" and better.p_value > 0.99
    # at the edge: z = -1.645 is the one-sided 5 % point
    edge = decide(140, 200, 156, 200, min_rated=200, alpha=0.05)
    assert edge.action == "rollback" and 0.02 < edge.p_value < 0.05
    assert decide(142, 200, 156, 200, min_rated=200, alpha=0.05).action == "promote"
    assert 0.11 < detectable_drop(0.6, 200, 0.05) < 0.13 and 0.05 < detectable_drop(0.6, 1000, 0.05) < 0.06


def _candidate(url: str, *, runtime_from: dict | None = None, pending: bool = False) -> int:
    """Version 2 in an A/B test with half of the sessions: a copy of the default model (on the exported INT8
    artifact of version 1 when ``runtime_from`` is given), backfilled as the backfill job leaves it."""
    with psycopg.connect(url, autocommit=True) as conn:
        runtime, path = ("torch", None) if runtime_from is None else (runtime_from["runtime"], runtime_from["artifact_path"])
        [vid] = conn.execute(
            "INSERT INTO pgsynapse.model_versions (name, base_version_id, artifact_path, runtime, dim, status,"
            " traffic_percent, backfilled_at, runtime_pending) VALUES ('fine-tuned', 1, %s, %s, 384, 'candidate', 50,"
            " now(), %s) RETURNING id", (path, runtime, pending)).fetchone()
        conn.execute("SELECT pgsynapse.ensure_embedding_index(%s)", (vid,))
    return vid


def _seed(url: str, version: int, rated: int, helpful: int) -> None:
    """``rated`` answered questions routed to ``version``, ``helpful`` of them rated helpful, the rest not."""
    with psycopg.connect(url, autocommit=True) as conn:
        ids = [r[0] for r in conn.execute(
            "INSERT INTO pgsynapse.questions (session_id, text, status, answer, model_version_id, answered_at)"
            " SELECT 'v' || %s || '-' || g, 'how do I vacuum a table', 'answered', 'VACUUM', %s, now()"
            " FROM generate_series(1, %s) g RETURNING id", (version, version, rated)).fetchall()]
        conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) SELECT * FROM unnest(%s::bigint[], %s::bool[])",
                     (ids, [i < helpful for i in range(rated)]))


async def _events(conn, version: int) -> list[dict]:
    return await (await conn.execute(
        "SELECT event, reason, figures, actor FROM pgsynapse.model_events WHERE model_version_id = %s ORDER BY id",
        (version,))).fetchall()


async def test_a_candidate_not_worse_is_promoted_at_the_minimum_and_serves_on_int8(db_url, models, default_runtime):
    adopt_runtime(db_url, default_runtime)
    cand = _candidate(db_url, runtime_from=default_runtime, pending=True)  # exported already: nothing to export again
    _seed(db_url, cand, 29, 19)  # 65.5 %
    _seed(db_url, 1, 40, 28)  # 70 %: not significantly better than the candidate
    conn = await aconn(db_url)
    settings = fast_settings(db_url, runtime="onnx-int8", kinds=("answer",), data_dir=default_runtime["data_dir"], **AB)
    with capture_logs() as logs:
        async with running_worker(settings, models) as worker:
            # a look at 29 rated questions decides nothing
            await wait_until(conn, "SELECT (metrics->'ab'->>'cand_rated')::int = 29 FROM pgsynapse.model_versions"
                                   " WHERE id = %s", (cand,))
            v = await (await conn.execute("SELECT status, traffic_percent::float AS t, runtime_pending, metrics->'ab' AS ab"
                                          " FROM pgsynapse.model_versions WHERE id = %s", (cand,))).fetchone()
            assert (v["status"], v["t"], v["runtime_pending"], v["ab"]["decision"]) == ("candidate", 50.0, False, None)
            assert [e["event"] for e in await _events(conn, cand)] == []
            with psycopg.connect(db_url, row_factory=dict_row) as sync:
                assert "A/B 29 vs 40 rated of 30 needed" in render_status(snapshot(sync))
            _seed(db_url, cand, 1, 1)  # the 30th: the decision point
            await wait_until(conn, "SELECT status = 'active' FROM pgsynapse.model_versions WHERE id = %s", (cand,),
                             channel="pgsynapse_models")
            # the promoted version answers on the runtime it was tested on: no export, no torch
            await conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('new user', 'vacuum')")
            await wait_until(conn, "SELECT count(*) = 0 FROM pgsynapse.questions WHERE status = 'pending'",
                             channel="pgsynapse_answers")
            await wait_until(conn, "SELECT models @> %s::jsonb FROM pgsynapse.workers WHERE worker_id = %s",
                             (json.dumps([{"version": cand, "runtime": default_runtime["runtime"]}]), worker.worker_id))
    [event] = await _events(conn, cand)
    assert event["event"] == "auto_promoted" and event["actor"] == worker.worker_id
    f = event["figures"]
    assert (f["cand_rated"], f["cand_helpful"], f["active_rated"], f["active_helpful"]) == (30, 20, 40, 28)
    assert f["p_value"] >= 0.05 and f["previous"] == 1 and f["runtime"] == default_runtime["runtime"]
    [logged] = [e for e in logs if e["event"] == "model_auto_promoted"]
    assert logged["version"] == cand and logged["cand_rated"] == 30
    assert not [e for e in logs if e["event"] == "runtime_export_started"]
    loaded = [e for e in logs if e["event"] == "model_loaded" and e.get("version") == cand]
    assert loaded and {e["runtime"] for e in loaded} == {default_runtime["runtime"]}
    answered = await (await conn.execute(
        "SELECT model_version_id FROM pgsynapse.questions WHERE session_id = 'new user'")).fetchone()
    assert answered["model_version_id"] == cand
    old = await (await conn.execute("SELECT status, traffic_percent::float AS t FROM pgsynapse.model_versions"
                                    " WHERE id = 1")).fetchone()
    assert old == {"status": "candidate", "t": 0.0}  # kept for `pgsynapse rollback`
    await conn.close()


async def test_a_worse_candidate_is_rolled_back_by_one_of_two_workers_and_not_while_auto_promote_is_off(db_url, models):
    cand = _candidate(db_url)
    _seed(db_url, cand, 30, 9)  # 30 %
    _seed(db_url, 1, 30, 24)  # 80 %
    conn = await aconn(db_url)
    # auto_promote off: the worker looks at nothing, whatever the figures say
    off = fast_settings(db_url, kinds=("backfill",), **{**AB, "auto_promote": False})
    async with running_worker(off, models) as worker:
        await wait_until(conn, "SELECT heartbeat_at - started_at > interval '1.5 s' FROM pgsynapse.workers"
                               " WHERE worker_id = %s", (worker.worker_id,))
    v = await (await conn.execute("SELECT status, traffic_percent::float AS t, metrics FROM pgsynapse.model_versions"
                                  " WHERE id = %s", (cand,))).fetchone()
    assert (v["status"], v["t"], "ab" in (v["metrics"] or {})) == ("candidate", 50.0, False)
    assert await _events(conn, cand) == []

    on = fast_settings(db_url, kinds=("backfill",), **AB)
    with capture_logs() as logs:
        async with running_worker(on, models) as first, running_worker(on, models) as second:
            await wait_until(conn, "SELECT status = 'rejected' FROM pgsynapse.model_versions WHERE id = %s", (cand,),
                             channel="pgsynapse_models")
            # both have looked since (every heartbeat starts a look): still one decision
            for w in (first, second):
                await wait_until(conn, "SELECT heartbeat_at > (SELECT max(at) + interval '0.6 s' FROM pgsynapse.model_events)"
                                       " FROM pgsynapse.workers WHERE worker_id = %s", (w.worker_id,))
    [event] = await _events(conn, cand)
    assert event["event"] == "auto_rolled_back" and event["actor"] in (first.worker_id, second.worker_id)
    f = event["figures"]
    assert (f["cand_rated"], f["cand_helpful"], f["active_rated"], f["active_helpful"]) == (30, 9, 30, 24)
    assert f["p_value"] < 0.05 and "significantly worse" in event["reason"]
    assert len([e for e in logs if e["event"] == "model_auto_rolled_back"]) == 1
    v = await (await conn.execute("SELECT status, traffic_percent::float AS t FROM pgsynapse.model_versions"
                                  " WHERE id = %s", (cand,))).fetchone()
    assert v == {"status": "rejected", "t": 0.0}
    with psycopg.connect(db_url, row_factory=dict_row) as sync:
        assert [r["id"] for r in sync.execute(q("routable_versions", "answers.sql"))] == [1]
        # a second look finds nothing to decide: the decision is made once
        assert run_decisions(sync, min_rated=30, alpha=0.05, actor="test") == []
        # the operator sees it in `status` and `ab-report`
        assert f"v{cand}    auto_rolled_back" in render_status(snapshot(sync))
        assert "significantly worse" in render_ab(ab_report(sync))
    await conn.close()


def test_feedback_given_before_a_question_was_asked_again_counts_for_no_version(db_url):
    """A question edited (asked again) is answered anew, maybe by another version: the verdicts on its earlier
    answer are about another text and another answer. They count neither for the version of the new answer nor in
    its A/B window, which starts when the candidate's first question was asked, not when its row was created."""
    cand = _candidate(db_url)
    ask = ("INSERT INTO pgsynapse.questions (session_id, text, status, answer, model_version_id, created_at, asked_at,"
           " answered_at) VALUES (%s, %s, 'answered', 'an answer', %s, now() - %s::interval, now() - %s::interval,"
           " now() - %s::interval) RETURNING id")
    rate = "INSERT INTO pgsynapse.feedback (question_id, helpful, created_at) VALUES (%s, %s, now() - %s::interval)"
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        # two days ago the active version answered it, and a user found that answer helpful
        old = conn.execute(ask, ("a", "What does amcheck lock?", 1, "2 days", "2 days", "2 days")).fetchone()["id"]
        conn.execute(rate, (old, True, "2 days"))
        # a day ago, before the candidate's A/B test: another of the active version's answers, not helpful
        before = conn.execute(ask, ("b", "vacuum?", 1, "1 day", "1 day", "1 day")).fetchone()["id"]
        conn.execute(rate, (before, False, "1 day"))
        # today the first question is asked again and the candidate answers it; nobody has rated that answer yet
        conn.execute("UPDATE pgsynapse.questions SET text = 'What does bt_index_check lock?' WHERE id = %s", (old,))
        conn.execute("UPDATE pgsynapse.questions SET status = 'answered', answer = 'a share lock', model_version_id = %s,"
                     " answered_at = now() WHERE id = %s", (cand, old))
        # and the active version answers a new question, found helpful
        today = conn.execute(ask, ("c", "analyze?", 1, "0 s", "0 s", "0 s")).fetchone()["id"]
        conn.execute(rate, (today, True, "0 s"))

        rows = {r["version"]: r for r in ab_report(conn)["versions"]}
        assert (rows[cand]["questions"], rows[cand]["rated"], rows[cand]["helpful"]) == (1, 0, 0)
        assert (rows[1]["questions"], rows[1]["rated"], rows[1]["helpful"]) == (2, 2, 1)
        [d] = conn.execute(q("ab_decisions", "learning.sql")).fetchall()
        asked = conn.execute("SELECT asked_at FROM pgsynapse.questions WHERE id = %s", (old,)).fetchone()["asked_at"]
        assert d["since"] == asked  # not the row's creation two days ago
        assert (d["cand_rated"], d["cand_helpful"], d["active_rated"], d["active_helpful"]) == (0, 0, 1, 1)

        # a verdict on the new answer counts, for the version that gave it
        conn.execute(rate, (old, False, "0 s"))
        rows = {r["version"]: r for r in ab_report(conn)["versions"]}
        assert (rows[cand]["rated"], rows[cand]["helpful"]) == (1, 0)
        [d] = conn.execute(q("ab_decisions", "learning.sql")).fetchall()
        assert (d["cand_rated"], d["cand_helpful"], d["active_rated"], d["active_helpful"]) == (1, 0, 1, 1)
        # each training example keeps the text its feedback was about (the latest stands)
        assert [(r["query"], r["superseded_by"] is None) for r in conn.execute(
            "SELECT query, superseded_by FROM pgsynapse.training_examples WHERE question_id = %s ORDER BY id",
            (old,))] == [("What does amcheck lock?", False), ("What does bt_index_check lock?", True)]


def test_a_version_rolled_back_by_hand_and_given_traffic_again_is_decided_on_new_questions_only(db_url):
    """A person rolls back a promoted version and gives it a share again to test it anew: the worker's next look
    must not promote it at once on the figures it was promoted on before the rollback. Its A/B window starts
    again when it left the active status; the active version's questions before that do not count either."""
    cand = _candidate(db_url)
    _seed(db_url, cand, 30, 21)
    _seed(db_url, 1, 30, 21)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        [first] = run_decisions(conn, min_rated=30, alpha=0.05, actor="test")
        assert (first["version"], first["action"]) == (cand, "promote")
        rollback(conn)  # version 1 active again, the candidate at 0 %
        set_traffic(conn, cand, 10)  # back in an A/B test, with no question asked since the rollback
        assert run_decisions(conn, min_rated=30, alpha=0.05, actor="test") == []
        v = conn.execute("SELECT status, traffic_percent::float AS t FROM pgsynapse.model_versions WHERE id = %s",
                         (cand,)).fetchone()
        assert v == {"status": "candidate", "t": 10.0}
        assert conn.execute(q("ab_decisions", "learning.sql")).fetchall() == []  # no question of its new test yet
        # nor does `status` show the figures of the test that promoted it as this test's
        [line] = [ln for ln in render_status(snapshot(conn)).splitlines() if ln.startswith(f"model v{cand} ")]
        assert line.endswith("10% traffic, backfill done"), line
    _seed(db_url, cand, 30, 9)  # 30 % since the rollback
    _seed(db_url, 1, 30, 24)  # 80 %
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        [second] = run_decisions(conn, min_rated=30, alpha=0.05, actor="test")
        assert (second["version"], second["action"]) == (cand, "rollback")
        assert (second["cand_rated"], second["cand_helpful"], second["active_rated"], second["active_helpful"]) == (
            30, 9, 30, 24)
        events = [r["event"] for r in conn.execute(
            "SELECT event FROM pgsynapse.model_events WHERE model_version_id = %s ORDER BY id", (cand,))]
    assert events == ["auto_promoted", "rolled_back", "traffic_set", "auto_rolled_back"]


def test_a_decision_waiting_for_the_registry_lock_says_so(db_url):
    """A decision due takes the registry's table lock, which waits for every transaction holding the table (a
    promote left open in psql, a worker's registration): the worker's maintenance step waited without a word, as
    the registry commands did before they logged registry_lock_waiting."""
    cand = _candidate(db_url)
    _seed(db_url, cand, 30, 21)
    _seed(db_url, 1, 30, 21)
    results: list[list[dict]] = []

    def decide_now() -> None:
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
            results.append(run_decisions(conn, min_rated=30, alpha=0.05, actor="test"))

    with psycopg.connect(db_url, autocommit=True) as holder, logs_until("registry_lock_waiting") as (logs, logged):
        with holder.transaction():
            holder.execute("LOCK TABLE pgsynapse.model_versions IN SHARE ROW EXCLUSIVE MODE")
            thread = threading.Thread(target=decide_now)
            thread.start()
            said = logged(60)  # the log event ends the wait
            assert said["table"] == "pgsynapse.model_versions", said
            assert holder.info.backend_pid in [h["pid"] for h in said["holders"]], said
        thread.join(60)
    [[done]] = results
    assert (done["version"], done["action"]) == (cand, "promote")
