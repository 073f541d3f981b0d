"""The roles of migration 0007, tested with real LOGIN roles: an application writes its rows and reads results,
the triggers queue its jobs with their owner's rights, and everything else is refused; a worker and an admin
role do their whole job with exactly their grants (a missing GRANT shows up here, not in production)."""

from __future__ import annotations

import json
import shutil
import uuid

import anyio
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from pgsynapse.app import ask
from pgsynapse.cli import main
from pgsynapse.client import Client
from pgsynapse.config import load_settings
from pgsynapse.db import next_notifies
from pgsynapse.errors import DatabaseSetupError, InputError
from pgsynapse.images import registry as image_registry
from pgsynapse.learning.cli import queue_retrain
from pgsynapse.learning.registry import promote, retire, rollback, set_traffic
from pgsynapse.migrate import available, migrate
from pgsynapse.search import search
from pgsynapse.textsql.cli import correct
from tests.helpers import SAFETY_TIMEOUT, aconn, fast_settings, running_worker, wait_until
from tests.image_models import coloured_image, png_bytes

pytestmark = pytest.mark.anyio

# What an application must never do, each refused with InsufficientPrivilege (SQLSTATE 42501).
APP_REFUSED = [
    "SELECT id, last_error FROM pgsynapse.jobs",
    "INSERT INTO pgsynapse.jobs (kind, ref_id, payload) VALUES ('retrain', 0, '{\"force\": true}')",
    "INSERT INTO pgsynapse.jobs (kind, ref_id, payload) VALUES ('backfill', 1, '{\"traffic_percent\": 100}')",
    "UPDATE pgsynapse.jobs SET status = 'pending'",
    "UPDATE pgsynapse.model_versions SET traffic_percent = 50 WHERE id = 1",
    "UPDATE pgsynapse.model_versions SET status = 'retired' WHERE id = 1",
    "INSERT INTO pgsynapse.model_versions (name, dim) VALUES ('mine', 384)",
    "SELECT * FROM pgsynapse.training_examples",
    "SELECT * FROM pgsynapse.inference_cache",
    "SELECT * FROM pgsynapse.inference_log",
    "SELECT * FROM pgsynapse.workers",
    "SELECT * FROM pgsynapse.guardrail_rules",
    "UPDATE pgsynapse.learning_settings SET retrain_min_feedback = 1",
    "DELETE FROM pgsynapse.chunks",
    "DELETE FROM pgsynapse.embeddings",
    # results are pgsynapse's to write: an application writes only its input columns
    "UPDATE pgsynapse.documents SET status = 'embedded', embedded_hash = content_hash",
    "UPDATE pgsynapse.questions SET status = 'answered', answer = 'forged'",
    "INSERT INTO pgsynapse.questions (text, status, answer) VALUES ('q', 'answered', 'forged')",
    "SELECT pgsynapse.ensure_embedding_index(1)",
    "SELECT * FROM pgsynapse.answer_cache",
    "SELECT * FROM pgsynapse.model_events",
    "SELECT * FROM pgsynapse.canary_questions",
    "UPDATE pgsynapse.queue_settings SET notify_on_enqueue = false",
    "UPDATE pgsynapse.data_questions SET status = 'answered', sql = 'SELECT 1'",
    "UPDATE pgsynapse.sql_corrections SET approved = true",
    "UPDATE pgsynapse.sql_models SET status = 'active'",
    "UPDATE pgsynapse.ranker_models SET status = 'active'",
    "UPDATE pgsynapse.feedback SET question_id = 1",
    "SELECT pgsynapse.wake_v1('embed', 1)",
    "SELECT pgsynapse.ensure_embedding_partition_v1(99)",
]


def _as(url: str, user: str) -> str:
    params = conninfo_to_dict(url)
    params.pop("password", None)
    return make_conninfo(**{**params, "user": user})


@pytest.fixture
def login_role(pg_url: str):
    """A factory of LOGIN roles granted one of pgsynapse's roles; returns ``url`` (a database) as that role.
    Roles are cluster-wide: each name is unique, and each role is dropped afterwards."""
    made: list[str] = []

    def make(granted: str, url: str) -> str:
        name = f"pgsynapse_t_{granted.removeprefix('pgsynapse_')}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute(f'CREATE ROLE "{name}" LOGIN')
            made.append(name)
            c.execute(f'GRANT "{granted}" TO "{name}"')
        return _as(url, name)

    yield make
    with psycopg.connect(pg_url, autocommit=True) as c:
        for name in made:
            c.execute(f'DROP ROLE "{name}"')


async def _notified(conn: psycopg.AsyncConnection, kind: str, count: int = 1) -> list[dict]:
    """The next ``count`` job NOTIFYs (one per statement that queued jobs), each of ``kind``."""
    msgs: list[dict] = []
    while len(msgs) < count:
        notices = await next_notifies(conn, SAFETY_TIMEOUT)
        assert notices, f"no NOTIFY for {kind}"
        msgs += [json.loads(n.payload) for n in notices]
    assert [m["kind"] for m in msgs] == [kind] * count, msgs
    return msgs


async def test_app_role_writes_its_rows_the_triggers_queue_the_jobs_and_the_queue_is_refused(db_url, login_role):
    app = await aconn(login_role("pgsynapse_app", db_url))
    su = await aconn(db_url)
    try:
        await su.execute("UPDATE pgsynapse.learning_settings SET retrain_min_feedback = 1")
        await app.execute("LISTEN pgsynapse_jobs")

        # documents: INSERT queues an embed job (the trigger runs with its owner's rights) and wakes the workers
        doc = (await (await app.execute(
            "INSERT INTO pgsynapse.documents (source, title, body, metadata) VALUES ('a.md', 'Vacuum', 'VACUUM reclaims.',"
            " '{\"k\": 1}') RETURNING id")).fetchone())["id"]
        assert [m["n"] for m in await _notified(app, "embed")] == [1]
        jobs = await (await su.execute("SELECT kind, ref_id, status FROM pgsynapse.jobs ORDER BY id")).fetchall()
        assert jobs == [{"kind": "embed", "ref_id": doc, "status": "pending"}]

        # a changed body queues the row again (once its first job is done) and puts it back to pending
        await su.execute("UPDATE pgsynapse.jobs SET status = 'done' WHERE ref_id = %s", (doc,))
        await su.execute("UPDATE pgsynapse.documents SET status = 'embedded' WHERE id = %s", (doc,))
        await app.execute("UPDATE pgsynapse.documents SET body = 'VACUUM reclaims storage.' WHERE id = %s", (doc,))
        await _notified(app, "embed")
        row = await (await app.execute("SELECT status FROM pgsynapse.documents WHERE id = %s", (doc,))).fetchone()
        assert row["status"] == "pending"

        # questions: an answer job and the session's conversation row, which the application may read
        qid = (await (await app.execute(
            "INSERT INTO pgsynapse.questions (session_id, text) VALUES ('s1', 'what does vacuum do?') RETURNING id"
        )).fetchone())["id"]
        await _notified(app, "answer")
        conv = await (await app.execute("SELECT turns FROM pgsynapse.conversations WHERE session_id = 's1'")).fetchone()
        assert conv["turns"] == 1

        # feedback (on its answer, which the worker writes): a training example, and at the threshold the retrain
        # job the application may not queue itself
        await su.execute("UPDATE pgsynapse.questions SET status = 'answered', answer = 'It reclaims storage.' "
                         "WHERE id = %s", (qid,))
        chunk = (await (await su.execute(
            "INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start, char_end, content_hash)"
            " VALUES (%s, 0, 'VACUUM reclaims storage.', 4, 0, 24, 'h') RETURNING id", (doc,))).fetchone())["id"]
        await app.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id, comment)"
                          " VALUES (%s, true, %s, 'good')", (qid, chunk))
        await _notified(app, "retrain")
        ex = await (await su.execute("SELECT question_id, positive_chunk_id FROM pgsynapse.training_examples")).fetchall()
        assert ex == [{"question_id": qid, "positive_chunk_id": chunk}]
        kinds = [r["kind"] for r in await (await su.execute("SELECT kind FROM pgsynapse.jobs ORDER BY id")).fetchall()]
        assert kinds == ["embed", "embed", "answer", "retrain"]

        # results are readable
        for table in ("chunks", "embeddings", "model_versions", "documents", "questions", "feedback"):
            await app.execute(f"SELECT * FROM pgsynapse.{table} LIMIT 1")

        refused = []
        for sql in APP_REFUSED:
            try:
                await app.execute(sql)
            except psycopg.errors.InsufficientPrivilege:
                continue
            refused.append(sql)
        assert refused == [], f"allowed to an application: {refused}"

        # deleting its rows cascades through pgsynapse's rows (the cascade runs with the owner's rights)
        await app.execute("DELETE FROM pgsynapse.questions WHERE id = %s", (qid,))
        await app.execute("DELETE FROM pgsynapse.documents WHERE id = %s", (doc,))
        left = await (await su.execute("SELECT (SELECT count(*) FROM pgsynapse.chunks) AS c,"
                                       " (SELECT count(*) FROM pgsynapse.training_examples) AS t")).fetchone()
        assert left == {"c": 0, "t": 0}
    finally:
        await app.close()
        await su.close()


def test_a_sessions_turns_are_its_questions_after_the_app_deletes_or_moves_them(db_url, login_role):
    """conversations.turns was counted up by a question's INSERT only: after the application deleted a question, or
    moved it to another session (an UPDATE of session_id), the session still counted it, and the session it went
    to had no row. Now every change of the questions keeps the count (questions_v9.sql, migration 0041); a session
    left with no question has no row, as a blank one (its id is not kept once its questions are gone)."""
    turns = "SELECT session_id, turns FROM pgsynapse.conversations ORDER BY 1"
    with psycopg.connect(login_role("pgsynapse_app", db_url), autocommit=True) as app:
        ids = [r[0] for r in app.execute(
            "INSERT INTO pgsynapse.questions (session_id, text) VALUES ('s1', 'a'), ('s1', 'b'), ('s1', 'c'),"
            " ('s2', 'd'), ('s2', 'e'), ('', 'f'), (NULL, 'g') RETURNING id").fetchall()]
        a, b, c, d, e, f, g = ids
        assert app.execute(turns).fetchall() == [("s1", 3), ("s2", 2)]
        app.execute("DELETE FROM pgsynapse.questions WHERE id = %s", (a,))
        assert app.execute(turns).fetchall() == [("s1", 2), ("s2", 2)]
        app.execute("UPDATE pgsynapse.questions SET session_id = 's2' WHERE id = %s", (b,))
        assert app.execute(turns).fetchall() == [("s1", 1), ("s2", 3)]
        # to a new session, to none (blank, NULL), from none; several in one statement; a text edit moves nothing
        app.execute("UPDATE pgsynapse.questions SET session_id = CASE id WHEN %s THEN 's3' WHEN %s THEN ' '"
                    " WHEN %s THEN NULL WHEN %s THEN 's1' ELSE 's3' END WHERE id = ANY(%s)",
                    (d, e, b, f, [d, e, b, f, g]))
        assert app.execute(turns).fetchall() == [("s1", 2), ("s3", 2)]
        app.execute("UPDATE pgsynapse.questions SET session_id = session_id, text = text || '?' WHERE id = ANY(%s)",
                    (ids,))
        assert app.execute(turns).fetchall() == [("s1", 2), ("s3", 2)]
        app.execute("DELETE FROM pgsynapse.questions WHERE session_id IN ('s1', ' ') OR id = %s", (d,))
        assert app.execute(turns).fetchall() == [("s3", 1)]
        left = app.execute("SELECT session_id, count(*) FROM pgsynapse.questions WHERE btrim(session_id) <> ''"
                           " GROUP BY 1 ORDER BY 1").fetchall()
        assert left == app.execute(turns).fetchall()


async def test_worker_role_embeds_and_answers_for_an_app_role_that_asks_and_searches(db_url, login_role, models):
    worker_url, app_url = login_role("pgsynapse_worker", db_url), login_role("pgsynapse_app", db_url)
    settings = fast_settings(worker_url, kinds=("embed", "answer"))
    async with running_worker(settings, models):
        app = await aconn(app_url)
        try:
            await app.execute("LISTEN pgsynapse_documents")
            doc = (await (await app.execute(
                "INSERT INTO pgsynapse.documents (title, body) VALUES ('Vacuum', 'VACUUM reclaims storage occupied by"
                " dead tuples. Run VACUUM periodically on frequently updated tables.') RETURNING id")).fetchone())["id"]
            await wait_until(app, "SELECT status = 'embedded' FROM pgsynapse.documents WHERE id = %s", (doc,))
            async with Client(app_url) as client:
                r = await client.ask("how is storage of dead tuples reclaimed?", session_id="app")
                assert r.status == "answered", r
                # the passage cited [1] answered it: the same row an application would INSERT, as that application
                fb = await client.feedback(r.id, helpful=True, source=1)
                assert (fb.question_id, fb.helpful, fb.chunk_id) == (r.id, True, r.sources[0]["chunk_id"])
            assert r.sources and r.sources[0]["document_id"] == doc
            hits = await search(app, models, "reclaim storage from dead tuples", k=1)
            assert [h.document_id for h in hits] == [doc]
            # `pgsynapse ask`: its schema check, its look for a running worker, then the Client
            again = await anyio.to_thread.run_sync(
                lambda: ask(load_settings(environ={}, database_url=app_url), "how is dead tuple storage reclaimed?"))
            assert again.status == "answered" and again.sources[0]["document_id"] == doc
        finally:
            await app.close()
    with psycopg.connect(db_url) as su:
        done = su.execute("SELECT kind, status, completions FROM pgsynapse.jobs ORDER BY id").fetchall()
        examples = su.execute("SELECT positive_chunk_id FROM pgsynapse.training_examples").fetchall()
    assert done == [("embed", "done", 1), ("answer", "done", 1), ("answer", "done", 1)]
    assert examples == [(r.sources[0]["chunk_id"],)]


def test_admin_role_runs_the_registry_commands(db_url, login_role):
    admin_url, app_url = login_role("pgsynapse_admin", db_url), login_role("pgsynapse_app", db_url)
    worker_url = login_role("pgsynapse_worker", db_url)
    # an up-to-date schema: `migrate` (`pgsynapse run` without --no-migrate, `ask`) needs no DDL right
    assert [migrate(url) for url in (admin_url, app_url, worker_url)] == [[], [], []]
    with psycopg.connect(db_url, autocommit=True) as su:
        su.execute("INSERT INTO pgsynapse.model_versions (id, name, dim, status, backfilled_at) VALUES"
                   " (2, 'v2', 384, 'candidate', now()), (3, 'v3', 384, 'candidate', now())")
    with psycopg.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
        admin.execute("SELECT pgsynapse.ensure_embedding_index(2)")
        set_traffic(admin, 2, 10)
        retire(admin, 2)  # drops the version's partition and index, which only their owner may drop
        promote(admin, 3)
        rollback(admin)
        assert queue_retrain(admin) is not None
        admin.execute("INSERT INTO pgsynapse.guardrail_rules (text, action) VALUES ('forbidden topic', 'block')")
        versions = admin.execute("SELECT id, status, traffic_percent::float AS t FROM pgsynapse.model_versions"
                                 " ORDER BY id").fetchall()
        indexes = [r["indexname"] for r in admin.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename LIKE 'embeddings%%' AND indexname LIKE 'embeddings_hnsw_%%'"
            " ORDER BY 1")]
    assert versions == [{"id": 1, "status": "active", "t": 100.0}, {"id": 2, "status": "retired", "t": 0.0},
                        {"id": 3, "status": "candidate", "t": 0.0}]
    assert indexes == ["embeddings_hnsw_v1"]
    with psycopg.connect(app_url, autocommit=True, row_factory=dict_row) as app:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            set_traffic(app, 3, 50)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            promote(app, 3)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            queue_retrain(app)


def test_app_role_gives_feedback_from_the_command_line(db_url, login_role, capsys):
    """`pgsynapse feedback` is an application's command (README): it records the row and says so, exit 0, without
    the retrain's progress, which reads training_examples (not the application's). It stopped at that read, after the
    row was written, with exit 78 and "lacks a privilege": the user gave the feedback again."""
    app_url = login_role("pgsynapse_app", db_url)
    with psycopg.connect(db_url, autocommit=True) as su:
        qid = su.execute("INSERT INTO pgsynapse.questions (text, status, answer) VALUES ('how?', 'answered', 'so')"
                         " RETURNING id").fetchone()[0]
    capsys.readouterr()
    assert main(["--database-url", app_url, "feedback", str(qid), "--helpful"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert out.startswith("feedback ") and f"on question {qid}: helpful" in out, out
    assert "new examples for the next retrain" not in out, out
    with psycopg.connect(db_url) as su:
        assert su.execute("SELECT question_id, helpful FROM pgsynapse.feedback").fetchall() == [(qid, True)]
    # an admin sees how near the next retrain is, as before
    admin_url = login_role("pgsynapse_admin", db_url)
    assert main(["--database-url", admin_url, "feedback", str(qid), "--not-helpful"]) == 0
    assert "new examples for the next retrain" in capsys.readouterr().out


def test_a_worker_role_that_adds_a_guardrail_is_told_to_use_the_admin_role(db_url, login_role, capsys):
    """Guardrail rules are the admin's to write (operations.md): the refusal named pgsynapse_admin "for
    promote/traffic/retire" only, so a worker's login role was not told which role writes guardrails."""
    worker_url = login_role("pgsynapse_worker", db_url)
    capsys.readouterr()
    assert main(["--database-url", worker_url, "guardrail", "add", "salaries"]) == 78
    said = capsys.readouterr().err
    assert "permission denied for table guardrail_rules" in said, said
    assert "pgsynapse_admin for guardrail, promote, rollback, traffic, retire" in said, said


@pytest.mark.parametrize("command, table", [("ask", "questions"), ("sql-ask", "data_questions")])
def test_an_app_role_asking_with_no_worker_running_is_told_its_own_worker_needs_the_worker_role(
        db_url, login_role, command, table, capsys):
    """`ask` and `sql-ask` are an application's commands (operations.md); with no worker running they start their
    own, which an application's role may not run: it stopped with a Python traceback (an ExceptionGroup, "permission
    denied for table workers") and "this command's worker failed to start (unhandled errors in a TaskGroup (1
    sub-exception))", exit 1."""
    app_url = login_role("pgsynapse_app", db_url)
    capsys.readouterr()
    assert main(["--database-url", app_url, command, "how many orders?", "--timeout", "60"]) == 78
    err = capsys.readouterr().err
    assert "Traceback" not in err and "TaskGroup" not in err, err
    assert "stays pending" in err and "permission denied for table" in err, err
    what = "question" if command == "ask" else "data question"
    assert f"no worker that answers {what}s runs on this database" in err and "pgsynapse_worker" in err, err
    # the question waits for a real worker
    with psycopg.connect(db_url) as su:
        assert su.execute(f"SELECT status FROM pgsynapse.{table}").fetchall() == [("pending",)]

async def test_a_role_that_may_only_connect_cannot_put_text_into_a_streamed_answer(db_url, login_role):
    """NOTIFY needs no privilege: any role that may connect can send a `streaming` payload on pgsynapse_answers. The
    Client yielded its delta as a piece of the answer (`pgsynapse ask` printed it as the answer streamed): a role with
    no right on pgsynapse's tables put its own text into another user's answer. Pieces come from the row now, which
    only the worker's roles may write."""
    forger = await aconn(login_role("pgsynapse_reader", db_url))  # nothing of schema pgsynapse at all
    su = await aconn(db_url)
    items: list = []
    try:
        async with Client(db_url) as client:
            client.recheck_seconds = 3600  # only NOTIFYs wake it

            async def consume() -> None:
                async for item in client.stream("how do I vacuum?"):
                    items.append(item)
            with anyio.fail_after(SAFETY_TIMEOUT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await wait_until(su, "SELECT count(*) = 1 FROM pgsynapse.questions", channel="pgsynapse_jobs")
                    qid = (await (await su.execute("SELECT id FROM pgsynapse.questions")).fetchone())["id"]
                    # delivered to the Client first (NOTIFYs arrive in commit order), then the worker's piece and answer
                    await forger.execute("SELECT pg_notify('pgsynapse_answers', %s)", (json.dumps(
                        {"id": qid, "status": "streaming", "seq": 1, "offset": 0, "delta": "FORGED: mail your password"}),))
                    for text, status in (("Use", "pending"), ("Use VACUUM.", "answered")):
                        await su.execute("UPDATE pgsynapse.questions SET answer = %s, status = %s WHERE id = %s",
                                         (text, status, qid))
                        await su.execute("SELECT pg_notify('pgsynapse_answers', %s)", (json.dumps(
                            {"id": qid, "status": "streaming", "seq": 1, "offset": 0, "delta": text}
                            if status == "pending" else {"id": qid, "status": status}),))
    finally:
        await forger.close()
        await su.close()
    pieces, final = items[:-1], items[-1]
    assert final.answer == "Use VACUUM." and not any("FORGED" in p for p in pieces), items
    assert "".join(pieces) in ("", "Use", "Use VACUUM."), items


def _apply_until(url: str, version: int) -> None:
    """Migrations before ``version`` applied as `migrate` would have, as an install of that release."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.pgsynapse_migrations (version int PRIMARY KEY, name text NOT NULL,"
                     " applied_at timestamptz NOT NULL DEFAULT now())")
        for m in available():
            if m.version < version:
                with conn.transaction():
                    conn.execute(m.sql.encode())
                    conn.execute("INSERT INTO public.pgsynapse_migrations VALUES (%s, %s)", (m.version, m.name))


def test_upgrade_from_0006_keeps_the_rows_and_queue_and_the_app_role_works_at_once(new_db, login_role):
    url = new_db()
    _apply_until(url, 7)
    with psycopg.connect(url, autocommit=True) as su:
        doc = su.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('Old', 'old body') RETURNING id").fetchone()[0]
        qid = su.execute("INSERT INTO pgsynapse.questions (text) VALUES ('old question') RETURNING id").fetchone()[0]
        su.execute("UPDATE pgsynapse.questions SET status = 'answered', answer = 'old answer' WHERE id = %s", (qid,))
        su.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, false)", (qid,))
    assert migrate(url)[0] == "0007_roles.sql"
    app_url = login_role("pgsynapse_app", url)
    with psycopg.connect(app_url, autocommit=True) as app:
        new = app.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('New', 'new body') RETURNING id").fetchone()[0]
        assert app.execute("SELECT title FROM pgsynapse.documents ORDER BY id").fetchall() == [("Old",), ("New",)]
        app.execute("INSERT INTO pgsynapse.feedback (question_id, rating) VALUES (%s, 5)", (qid,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT count(*) FROM pgsynapse.jobs")
    with psycopg.connect(url) as su:
        jobs = su.execute("SELECT kind, ref_id, status FROM pgsynapse.jobs ORDER BY id").fetchall()
        examples = su.execute("SELECT count(*) FROM pgsynapse.training_examples").fetchone()[0]
    assert jobs == [("embed", doc, "pending"), ("answer", qid, "pending"), ("embed", new, "pending")]
    assert examples == 2


def test_migrate_as_a_non_superuser_owner_then_an_app_role_writes(pg_url, new_db, login_role):
    """The documented set-up: a superuser creates the extension and an owner role with CREATE on the database
    and on schema public; the owner migrates; the SECURITY DEFINER triggers then run with the owner's rights."""
    url = new_db()
    owner = f"pgsynapse_t_owner_{uuid.uuid4().hex[:8]}"
    dbname = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(url, autocommit=True) as su:
        su.execute("CREATE EXTENSION vector")
        su.execute(f'CREATE ROLE "{owner}" LOGIN')
        su.execute(f'GRANT CREATE ON DATABASE "{dbname}" TO "{owner}"')
        su.execute(f'GRANT CREATE ON SCHEMA public TO "{owner}"')
    try:
        assert migrate(_as(url, owner)) == [m.name for m in available()]
        app_url = login_role("pgsynapse_app", url)
        with psycopg.connect(app_url, autocommit=True) as app:
            app.execute("LISTEN pgsynapse_jobs")
            doc = app.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('t', 'b') RETURNING id").fetchone()[0]
            assert [json.loads(n.payload)["kind"] for n in app.notifies(timeout=SAFETY_TIMEOUT, stop_after=1)] == ["embed"]
        with psycopg.connect(url) as su:
            assert su.execute("SELECT kind, ref_id FROM pgsynapse.jobs").fetchall() == [("embed", doc)]
            definers = su.execute("SELECT DISTINCT pg_get_userbyid(p.proowner) FROM pg_trigger t"
                                  " JOIN pg_proc p ON p.oid = t.tgfoid WHERE p.prosecdef").fetchall()
        assert definers == [(owner,)]
    finally:
        with psycopg.connect(url, autocommit=True) as su:
            su.execute(f'DROP OWNED BY "{owner}"')
        with psycopg.connect(pg_url, autocommit=True) as su:
            su.execute(f'DROP ROLE "{owner}"')


def test_migrate_without_the_extension_says_who_must_create_it(pg_url, new_db):
    """The owner of the database may not create pgvector (not a trusted extension): the error says to have a superuser
    create it, not to migrate as the owner (which this user is: it said so before)."""
    url = new_db()
    owner = f"pgsynapse_t_owner_{uuid.uuid4().hex[:8]}"
    dbname = conninfo_to_dict(url)["dbname"]
    with psycopg.connect(url, autocommit=True) as su:
        su.execute(f'CREATE ROLE "{owner}" LOGIN')
        su.execute(f'ALTER DATABASE "{dbname}" OWNER TO "{owner}"')
    try:
        with pytest.raises(DatabaseSetupError) as raised:
            migrate(_as(url, owner))
        said = str(raised.value)
        assert said.startswith('migration 0001_init.sql failed: permission denied to create extension "vector"'), said
        assert ("- pgvector is not a trusted extension: have a superuser (on a managed service, its admin role) run "
                "CREATE EXTENSION vector; in this database, then run `pgsynapse migrate` again") in said, said
        assert "run `pgsynapse migrate` as the database owner" not in said
    finally:
        with psycopg.connect(url, autocommit=True) as su:
            su.execute(f'ALTER DATABASE "{dbname}" OWNER TO CURRENT_USER')
            su.execute(f'DROP OWNED BY "{owner}"')
        with psycopg.connect(pg_url, autocommit=True) as su:
            su.execute(f'DROP ROLE "{owner}"')


async def test_image_roles_an_app_writes_images_a_worker_embeds_them_an_admin_manages_models(
        db_url, login_role, models, tiny_clip_path, tmp_path):
    admin_url, app_url, worker_url = (login_role(r, db_url) for r in ("pgsynapse_admin", "pgsynapse_app", "pgsynapse_worker"))
    with psycopg.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
        first = image_registry.add(admin, tiny_clip_path)
        second = image_registry.add(admin, shutil.copytree(tiny_clip_path, tmp_path / "second"), name="second")
    app = await aconn(app_url)
    await app.execute("LISTEN pgsynapse_jobs")
    ids = [(await (await app.execute(
        "INSERT INTO pgsynapse.images (data, caption) VALUES (%s, %s) RETURNING id",
        (png_bytes(coloured_image(c, seed=i)), c))).fetchone())["id"] for i, c in enumerate(["red", "blue"])]
    assert [m["n"] for m in await _notified(app, "embed_image", count=2)] == [1, 1]  # two statements
    for sql in ("UPDATE pgsynapse.images SET status = 'embedded'",
                "INSERT INTO pgsynapse.image_models (name, kind, artifact_path, dim) VALUES ('x', 'clip', '/x', 3)",
                "INSERT INTO pgsynapse.image_embeddings (image_id, model_id, embedding) VALUES (1, 1, '[1,2,3]')",
                "SELECT pgsynapse.ensure_image_index(1)"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await app.execute(sql)
    async with running_worker(fast_settings(worker_url, kinds=("embed_image",)), models):
        await wait_until(app, "SELECT count(*) = 0 FROM pgsynapse.images WHERE status = 'pending'", channel="pgsynapse_images")
    rows = await (await app.execute("SELECT image_id FROM pgsynapse.similar_images(%s, 5)", (ids[0],))).fetchall()
    assert [r["image_id"] for r in rows] == [ids[1]]
    await app.close()
    with psycopg.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
        assert image_registry.promote(admin, second["id"])["previous"] == first["id"]
        assert image_registry.retire(admin, first["id"]) == 2  # its index goes with it (the owner's trigger)
        assert not admin.execute("SELECT 1 FROM pg_indexes WHERE indexname = %s",
                                 (f"image_embeddings_hnsw_m{first['id']}",)).fetchone()


def test_sql_correct_runs_a_correction_as_the_reader_role_or_says_what_it_needs(db_url, login_role, capsys):
    """`pgsynapse sql-correct` runs a corrected statement as the retrain will (read-only, as pgsynapse_reader) and
    refuses one that fails in PostgreSQL; it recorded `SELECT nocol ...` and the retrain dropped it later. A user that
    may not SET ROLE to the reader (an application role) runs it as itself; when it may not read the tables either,
    the correction is recorded with a note naming the GRANT that lets it be checked."""
    admin_url, app_url = login_role("pgsynapse_admin", db_url), login_role("pgsynapse_app", db_url)
    app_user = conninfo_to_dict(app_url)["user"]
    with psycopg.connect(db_url, autocommit=True) as su:
        su.execute("CREATE SCHEMA shop; CREATE TABLE shop.orders (id int, region text);"
                   " INSERT INTO shop.orders VALUES (1, 'north'), (2, 'south');"
                   " GRANT USAGE ON SCHEMA shop TO pgsynapse_reader; GRANT SELECT ON shop.orders TO pgsynapse_reader")
        question = su.execute("INSERT INTO pgsynapse.data_questions (text, target_schema) VALUES"
                              " ('which regions?', 'shop') RETURNING id").fetchone()[0]
    with psycopg.connect(admin_url, autocommit=True) as admin:  # a member of the reader role: run as it
        with pytest.raises(InputError, match=f'data question {question}: the corrected statement failed in '
                           'PostgreSQL: column "nocol" does not exist'):
            correct(admin, question, "SELECT nocol FROM shop.orders", False)
        assert correct(admin, question, "SELECT region FROM shop.orders", False)[1] is None
    # an application role is not a member, and may not read shop.orders: recorded unchecked, with what would let it
    # be checked
    with psycopg.connect(app_url, autocommit=True) as app:
        _, note = correct(app, question, "SELECT region FROM shop.orders", False)
        assert note and "recorded without being run" in note and f"GRANT pgsynapse_reader TO {app_user}" in note
        # the command says it on stderr: a warning event with JSON logs (a plain `note: ...` line among them)
        capsys.readouterr()
        assert main(["--database-url", app_url, "--log-format", "json", "sql-correct", str(question), "--sql",
                     "SELECT region FROM shop.orders"]) == 0
        said = capsys.readouterr()
        assert said.out.startswith("correction "), said
        [said] = [json.loads(line) for line in said.err.splitlines()]
        assert {"event": "sql_correct_not_run", "level": "warning"}.items() <= said.items(), said
        assert said["note"].startswith("the corrected statement was recorded without being run"), said
        with psycopg.connect(db_url, autocommit=True) as su:
            su.execute(f'GRANT USAGE ON SCHEMA shop TO "{app_user}"; GRANT SELECT ON shop.orders TO "{app_user}"')
        # once it may read them, it runs the statement as itself
        with pytest.raises(InputError, match='column "nocol" does not exist'):
            correct(app, question, "SELECT nocol FROM shop.orders", False)
        assert correct(app, question, "SELECT region FROM shop.orders", False)[1] is None
        with psycopg.connect(db_url, autocommit=True) as su:
            su.execute(f'REVOKE ALL ON shop.orders FROM "{app_user}"; REVOKE ALL ON SCHEMA shop FROM "{app_user}"')
    with psycopg.connect(db_url) as su:
        assert su.execute("SELECT count(*) FROM pgsynapse.sql_corrections").fetchone()[0] == 4  # with the command's
