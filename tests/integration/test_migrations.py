"""Migrations apply to an empty database, re-apply as a no-op, and leave the expected schema."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.answer_cache import lookup_sql
from pgsynapse.cli import main
from pgsynapse.errors import DatabaseError
from pgsynapse.migrate import _LOCK_KEY, Migration, available, migrate
from pgsynapse.queries import q
from tests.helpers import aconn, fast_settings, kill_and_see_its_backend_end, running_worker, wait_until


def _apply_below(url: str, version: int) -> Migration:
    """Apply the migrations before ``version`` as ``migrate`` would (the previous release's database); returns
    migration ``version``, still to apply."""
    migs = available()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.pgsynapse_migrations (version int PRIMARY KEY, name text NOT NULL,"
                     " applied_at timestamptz NOT NULL DEFAULT now())")
        for m in migs:
            if m.version >= version:
                break
            with conn.transaction():
                conn.execute(m.sql.encode())
                conn.execute("INSERT INTO public.pgsynapse_migrations VALUES (%s, %s)", (m.version, m.name))
    [target] = [m for m in migs if m.version == version]
    return target


def test_migrations_apply_to_empty_database_and_reapply_as_noop(new_db):
    url = new_db()
    applied = migrate(url)
    assert applied == [m.name for m in available()]
    assert migrate(url) == []
    with psycopg.connect(url) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'pgsynapse'")}
        assert {"documents", "chunks", "embeddings", "model_versions", "jobs"} <= tables
        versions = conn.execute("SELECT id, name, status, dim FROM pgsynapse.model_versions").fetchall()
        assert versions == [(1, "all-MiniLM-L6-v2", "active", 384)]
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'pgsynapse'")}
        assert {"embeddings_hnsw_v1", "jobs_claim", "jobs_pending_dedup"} <= indexes
        tracked = conn.execute("SELECT version FROM public.pgsynapse_migrations ORDER BY 1").fetchall()
        assert [r[0] for r in tracked] == [m.version for m in available()]


def test_each_migration_applies_on_top_of_the_previous_version(new_db):
    """Apply migrations one by one, as an upgrade from every earlier release would."""
    url = new_db()
    migs = available()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.pgsynapse_migrations (version int PRIMARY KEY, name text NOT NULL,"
                     " applied_at timestamptz NOT NULL DEFAULT now())")
        for m in migs[:-1]:
            with conn.transaction():
                conn.execute(m.sql.encode())
                conn.execute("INSERT INTO public.pgsynapse_migrations VALUES (%s, %s)", (m.version, m.name))
    assert migrate(url) == [migs[-1].name]
    assert migrate(url) == []


def test_concurrent_migrate_runs_do_not_collide(new_db):
    import threading

    url = new_db()
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(migrate(url))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # each migration applied once, by one of the runs (each run takes the lock again for each migration, and
    # checks under it whether another run applied it meanwhile); a run that collided raised (no result)
    assert len(results) == 3 and sorted(sum(results, [])) == [m.name for m in available()], results


def test_a_migrate_waiting_for_another_says_so(new_db):
    """`migrate` (or a worker's start) behind another one's migrations, minutes on a big table, waited on the lock
    without a word."""
    url = new_db()
    migrate(url)
    with psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        holder_pid = holder.info.backend_pid
        results: list[list[str]] = []
        with capture_logs() as logs:
            thread = threading.Thread(target=lambda: results.append(migrate(url)))
            thread.start()
            waiting = ("SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database ="
                       " (SELECT oid FROM pg_database WHERE datname = current_database()))")
            deadline = time.monotonic() + 60  # a safety net: the row state ends the wait
            while not holder.execute(waiting).fetchone()[0] and time.monotonic() < deadline:
                thread.join(0.05)
            holder.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
            thread.join(60)
    assert results == [[]]
    [said] = [e for e in logs if e["event"] == "migrate_waiting"]
    assert said["log_level"] == "info" and "another" in said["note"], said
    # who holds it, so that a lock left behind (a migrate through a transaction pooler unlocks on another server
    # session: the next migrate waited for ever, "applying migrations") can be found and ended
    assert said["holder_pid"] == holder_pid and said["holder_state"] == "idle", said
    assert "pg_terminate_backend" in said["note"] and "PGSYNAPSE_LISTEN_URL" in said["note"], said
    with capture_logs() as logs:
        assert migrate(url) == []
    assert not [e for e in logs if e["event"] == "migrate_waiting"]


def test_a_killed_migrate_s_lock_wait_ends_with_it(new_db):
    """A `migrate` (or a starting worker) waiting on the migration lock and then killed (Ctrl-C twice, SIGKILL, a
    systemd start timeout) left its server backend waiting on the lock until it was granted: a backend, and a
    waiter that `status` counted, for nobody. Now its wait ends within a second or so of the client going."""
    url = new_db()
    migrate(url)
    env = {**os.environ, "DATABASE_URL": url}
    with psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        proc = subprocess.Popen([sys.executable, "-m", "pgsynapse", "migrate"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            waiting = ("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid::bigint = %s"
                       " AND database = (SELECT oid FROM pg_database WHERE datname ="
                       " current_database())")
            deadline = time.monotonic() + 60  # a safety net: the row state ends the wait
            while not (row := holder.execute(waiting, (_LOCK_KEY,)).fetchone()):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr and proc.stderr.read()
                with pytest.raises(subprocess.TimeoutExpired):  # polled: a lock's waiter sends no event
                    proc.wait(0.05)
            kill_and_see_its_backend_end(proc, row[0], "migrate", "migration lock")
        finally:
            proc.kill()
            holder.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


def test_a_failing_migration_is_rolled_back_and_named(new_db):
    url = new_db()
    with psycopg.connect(url, autocommit=True) as conn:
        # a conflicting object makes 0001 fail half way
        conn.execute("CREATE SCHEMA pgsynapse; CREATE TABLE pgsynapse.documents (x int)")
    with pytest.raises(DatabaseError, match=r"migration 0001_init\.sql failed: .*already exists"):
        migrate(url)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('pgsynapse.jobs')").fetchone()[0] is None


def test_functions_that_run_with_their_owners_rights_are_safe_to_call_from_application_roles(db_url):
    """Every AFTER trigger on pgsynapse's tables writes on the caller's behalf (jobs, training examples), so it
    runs SECURITY DEFINER; every such function has a fixed search_path and is not executable by PUBLIC."""
    with psycopg.connect(db_url) as conn:
        triggers = conn.execute(
            "SELECT t.tgrelid::regclass::text || '.' || t.tgname, p.prosecdef FROM pg_trigger t"
            " JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_class c ON c.oid = t.tgrelid"
            " WHERE c.relnamespace = 'pgsynapse'::regnamespace AND NOT t.tgisinternal"
            " AND t.tgtype & (2 | 64) = 0").fetchall()  # neither BEFORE nor INSTEAD OF
        definers = conn.execute(
            "SELECT p.proname, coalesce(p.proconfig, '{}'),"
            " p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a"
            "                             WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')"
            " FROM pg_proc p WHERE p.pronamespace = 'pgsynapse'::regnamespace AND p.prosecdef").fetchall()
    assert {"pgsynapse.documents.documents_enqueue_insert", "pgsynapse.questions.questions_enqueue_insert",
            "pgsynapse.feedback.feedback_to_examples"} <= {name for name, _ in triggers}
    assert [name for name, secdef in triggers if not secdef] == []
    assert "ensure_embedding_index" in {name for name, _, _ in definers}
    for name, config, public in definers:
        assert "search_path=pg_catalog, pgsynapse, pg_temp" in config, name
        assert not public, f"{name} is executable by PUBLIC"


def test_an_edit_clears_flags_and_cached_from_with_the_answer(db_url):
    """0010: questions.flags (empty by default) records the answer's checks; 0011: cached_from names the question a
    cached answer came from. Questions v5 clears both, with the (partial or final) answer, when an edit asks the
    question again."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        first = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('what is a savepoint, first?') RETURNING id").fetchone()[0]
        qid = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('what is a savepoint?') RETURNING id").fetchone()[0]
        assert conn.execute("SELECT flags FROM pgsynapse.questions WHERE id = %s", (qid,)).fetchone()[0] == []
        conn.execute("UPDATE pgsynapse.questions SET status = 'answered', answer = 'A mark [7].', cached_from = %s, "
                     "flags = '{\"invalid_citations: [7] cited, passages 1 given\"}' WHERE id = %s", (first, qid))
        conn.execute("UPDATE pgsynapse.questions SET text = 'what is a subtransaction?' WHERE id = %s", (qid,))
        row = conn.execute("SELECT status, answer, flags, cached_from FROM pgsynapse.questions WHERE id = %s",
                           (qid,)).fetchone()
        assert row == ("pending", None, [], None)
        triggers = conn.execute("SELECT p.proname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid "
                                "WHERE t.tgname = 'questions_reask'").fetchall()
        assert triggers == [("questions_reask_v6",)]
        for old in ("questions_reask_v3", "questions_reask_v5"):
            assert conn.execute("SELECT to_regproc(%s)", (f"pgsynapse.{old}",)).fetchone()[0] is None


def test_the_answer_cache_migration_upgrades_a_database_with_versions_and_is_idempotent(new_db):
    """0011 on top of the previous version: every serving version gets its answer cache index (a candidate too),
    re-running it changes nothing, a new version gets both of its indexes and a retired one loses both."""
    url = new_db()
    cache_mig = _apply_below(url, 11)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgsynapse.model_versions (id, name, dim, status) VALUES (2, 'candidate', 384, 'candidate')")
        conn.execute("SELECT pgsynapse.ensure_embedding_index(2)")
        conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('asked before the upgrade')")
    assert cache_mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        def indexes() -> set[str]:
            return {r[0] for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'pgsynapse' AND indexname LIKE '%hnsw%'")}

        assert indexes() == {"embeddings_hnsw_v1", "embeddings_hnsw_v2", "answer_cache_hnsw_v1", "answer_cache_hnsw_v2"}
        with conn.transaction():
            conn.execute(cache_mig.sql.encode())  # idempotent: a second run changes nothing and fails on nothing
        assert conn.execute("SELECT cached_from FROM pgsynapse.questions").fetchall() == [(None,)]
        conn.execute("INSERT INTO pgsynapse.model_versions (id, name, dim, status) VALUES (3, 'next', 384, 'candidate')")
        conn.execute("SELECT pgsynapse.ensure_embedding_index(3)")
        conn.execute("UPDATE pgsynapse.model_versions SET status = 'retired' WHERE id = 2")
        assert indexes() == {"embeddings_hnsw_v1", "embeddings_hnsw_v3", "answer_cache_hnsw_v1", "answer_cache_hnsw_v3"}
        triggers = {r[0] for r in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'pgsynapse.documents'::regclass AND NOT tgisinternal")}
        assert {"documents_answer_cache_update", "documents_answer_cache_delete"} <= triggers
        # the lookup's plan uses the version's partial index once the planner thinks it worth it
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN " + lookup_sql({"id": 1, "dim": 384}).replace("%(query)s", "%(q)s"),
            {"q": "[" + ",".join(["0.1"] * 384) + "]", "k": 8, "threshold": 0.9, "settings_key": "", "rules_key": "",
             "max_age": 0}).fetchall())
        assert "answer_cache_hnsw_v1" in plan, plan


def test_the_canary_migration_upgrades_a_database_with_documents_and_is_idempotent(new_db):
    """0012 on top of 0011: an empty canary_questions table (the first retrain fills it), usable by the worker
    role, tied to documents and versions; re-running it changes nothing."""
    url = new_db()
    canary_mig = _apply_below(url, 12)
    with psycopg.connect(url, autocommit=True) as conn:
        doc = conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('VACUUM', 'VACUUM\nVACUUM — "
                           "garbage-collect a database') RETURNING id").fetchone()[0]
    assert canary_mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pgsynapse.canary_questions").fetchone()[0] == 0
        for role in ("pgsynapse_worker", "pgsynapse_admin"):
            assert conn.execute("SELECT has_table_privilege(%s, 'pgsynapse.canary_questions', 'INSERT, DELETE')"
                                " AND has_sequence_privilege(%s, 'pgsynapse.canary_questions_id_seq', 'USAGE')",
                                (role, role)).fetchone()[0], role
        assert not conn.execute("SELECT has_table_privilege('pgsynapse_app', 'pgsynapse.canary_questions', 'SELECT')"
                                ).fetchone()[0]
        conn.execute("INSERT INTO pgsynapse.canary_questions (question, document_id, origin, frozen_with_version)"
                     " VALUES ('Which command would garbage-collect a database?', %s, 'summary', 1)", (doc,))
        with pytest.raises(psycopg.errors.CheckViolation, match="canary_origin_known"):
            conn.execute("INSERT INTO pgsynapse.canary_questions (question, document_id, origin)"
                         " VALUES ('why?', %s, 'feedback')", (doc,))
        with conn.transaction():
            conn.execute(canary_mig.sql.encode())  # idempotent
        assert conn.execute("SELECT count(*) FROM pgsynapse.canary_questions").fetchone()[0] == 1
        conn.execute("DELETE FROM pgsynapse.documents WHERE id = %s", (doc,))
        assert conn.execute("SELECT count(*) FROM pgsynapse.canary_questions").fetchone()[0] == 0


def test_the_model_events_migration_upgrades_a_database_with_versions_and_is_idempotent(new_db):
    """0013 on top of the previous version: the versions already there are not runtime_pending (they keep their
    traffic), re-running it changes nothing, and the worker and admin roles may write events."""
    url = new_db()
    events_mig = _apply_below(url, 13)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgsynapse.model_versions (id, name, dim, status, traffic_percent, backfilled_at)"
                     " VALUES (2, 'candidate', 384, 'candidate', 10, now())")
    assert events_mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT id, runtime_pending FROM pgsynapse.model_versions ORDER BY id").fetchall() == [
            (1, False), (2, False)]
        conn.execute("INSERT INTO pgsynapse.model_events (model_version_id, event, actor) VALUES (2, 'promoted', 'cli')")
        with conn.transaction():
            conn.execute(events_mig.sql.encode())
        assert conn.execute("SELECT model_version_id, event, reason, figures FROM pgsynapse.model_events").fetchall() == [
            (2, "promoted", "", {})]
        grants = conn.execute(
            "SELECT grantee, privilege_type FROM information_schema.role_table_grants WHERE table_schema = 'pgsynapse'"
            " AND table_name = 'model_events' AND grantee LIKE 'pgsynapse_%' AND privilege_type = 'INSERT'"
            " ORDER BY 1").fetchall()
        assert grants == [("pgsynapse_admin", "INSERT"), ("pgsynapse_worker", "INSERT")]


def test_the_query_encoder_migration_keeps_existing_versions_self_encoding_and_is_idempotent(new_db):
    """0014 on top of 0013: versions already there encode their own chunks (no passage version); a new query
    encoder must name a version that exists; re-running it changes nothing."""
    url = new_db()
    query_mig = _apply_below(url, 14)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgsynapse.model_versions (id, name, dim, status) VALUES (2, 'candidate', 384, 'candidate')")
    assert query_mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT id, passage_version_id FROM pgsynapse.model_versions ORDER BY id").fetchall() == [
            (1, None), (2, None)]
        conn.execute("INSERT INTO pgsynapse.model_versions (id, name, dim, passage_version_id) VALUES (3, 'q', 384, 1)")
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("INSERT INTO pgsynapse.model_versions (id, name, dim, passage_version_id) VALUES (4, 'q', 384, 99)")
        with conn.transaction():
            conn.execute(query_mig.sql.encode())
        assert conn.execute("SELECT count(*) FROM pgsynapse.model_versions WHERE passage_version_id = 1").fetchone()[0] == 1


def test_the_images_migration_upgrades_a_database_with_documents_and_is_idempotent(new_db):
    """0015 on top of 0014: images link to the documents already there, their trigger queues embed_image jobs,
    an application role may write them; re-running it changes nothing."""
    url = new_db()
    images_mig = _apply_below(url, 15)
    with psycopg.connect(url, autocommit=True) as conn:
        doc = conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('t', 'b') RETURNING id").fetchone()[0]
    assert images_mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        img = conn.execute("INSERT INTO pgsynapse.images (data, document_id) VALUES ('\\x89504e47', %s) RETURNING id",
                           (doc,)).fetchone()[0]
        with pytest.raises(psycopg.errors.CheckViolation, match="images_need_data_or_path"):
            conn.execute("INSERT INTO pgsynapse.images (caption) VALUES ('neither bytes nor path')")
        with conn.transaction():
            conn.execute(images_mig.sql.encode())
        assert conn.execute("SELECT count(*) FROM pgsynapse.jobs WHERE kind = 'embed_image' AND ref_id = %s",
                            (img,)).fetchone()[0] == 1
        assert conn.execute("SELECT has_column_privilege('pgsynapse_app', 'pgsynapse.images', 'data', 'INSERT'),"
                            " has_column_privilege('pgsynapse_app', 'pgsynapse.images', 'status', 'UPDATE'),"
                            " has_table_privilege('pgsynapse_app', 'pgsynapse.image_embeddings', 'INSERT')"
                            ).fetchone() == (True, False, False)


def test_the_data_questions_migration_upgrades_a_database_and_is_idempotent(new_db):
    """0016 on top of 0015: a data question queues one sql_answer job, an edit re-asks it, corrections queue the one
    sql_retrain at the threshold, the reader role reads nothing of pgsynapse; re-running it changes nothing."""
    url = new_db()
    mig = _apply_below(url, 16)
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pgsynapse.learning_settings SET sql_retrain_min_corrections = 2")
        qid = conn.execute("INSERT INTO pgsynapse.data_questions (text) VALUES ('how many?') RETURNING id").fetchone()[0]
        conn.execute("UPDATE pgsynapse.data_questions SET status = 'answered', sql = 'SELECT 1' WHERE id = %s", (qid,))
        conn.execute("DELETE FROM pgsynapse.jobs")
        conn.execute("UPDATE pgsynapse.data_questions SET text = 'how many orders?' WHERE id = %s", (qid,))
        assert conn.execute("SELECT status, sql FROM pgsynapse.data_questions WHERE id = %s", (qid,)).fetchone() == (
            "pending", None)
        with conn.transaction():
            conn.execute(mig.sql.encode())
        assert conn.execute("SELECT count(*) FROM pgsynapse.jobs WHERE kind = 'sql_answer' AND ref_id = %s",
                            (qid,)).fetchone()[0] == 1
        with pytest.raises(psycopg.errors.CheckViolation, match="sql_corrections_sql_or_approved"):
            conn.execute("INSERT INTO pgsynapse.sql_corrections (question_id) VALUES (%s)", (qid,))
        # answered again (0033 refuses an approval of a question that was not answered)
        conn.execute("UPDATE pgsynapse.data_questions SET status = 'answered', sql = 'SELECT 1' WHERE id = %s", (qid,))
        conn.execute("INSERT INTO pgsynapse.sql_corrections (question_id, approved) VALUES (%s, true)", (qid,))
        assert conn.execute("SELECT count(*) FROM pgsynapse.jobs WHERE kind = 'sql_retrain'").fetchone()[0] == 0
        conn.execute("INSERT INTO pgsynapse.sql_corrections (question_id, corrected_sql) VALUES (%s, 'SELECT 2')", (qid,))
        conn.execute("INSERT INTO pgsynapse.sql_corrections (question_id, approved) VALUES (%s, true)", (qid,))
        assert conn.execute("SELECT count(*) FROM pgsynapse.jobs WHERE kind = 'sql_retrain'").fetchone()[0] == 1
        assert conn.execute(
            "SELECT has_schema_privilege('pgsynapse_reader', 'pgsynapse', 'USAGE'),"
            " pg_has_role('pgsynapse_worker', 'pgsynapse_reader', 'MEMBER'),"
            " has_column_privilege('pgsynapse_app', 'pgsynapse.data_questions', 'text', 'INSERT'),"
            " has_column_privilege('pgsynapse_app', 'pgsynapse.data_questions', 'sql', 'UPDATE'),"
            " has_table_privilege('pgsynapse_app', 'pgsynapse.sql_models', 'INSERT')").fetchone() == (
            False, True, True, False, False)


def test_the_queue_autovacuum_migration_sets_the_jobs_table_options_and_is_idempotent(new_db):
    """0017 on top of 0016: the job queue's autovacuum thresholds; re-running it changes nothing."""
    url = new_db()
    mig = _apply_below(url, 17)
    options = "SELECT coalesce(reloptions, '{}') FROM pg_class WHERE oid = 'pgsynapse.jobs'::regclass"
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute(options).fetchone()[0] == []
    assert mig.name in migrate(url)
    expected = ["autovacuum_vacuum_scale_factor=0.01", "autovacuum_vacuum_threshold=2000",
                "autovacuum_vacuum_insert_scale_factor=0.02", "autovacuum_analyze_scale_factor=0.02"]
    with psycopg.connect(url, autocommit=True) as conn:
        assert sorted(conn.execute(options).fetchone()[0]) == sorted(expected)
        with conn.transaction():
            conn.execute(mig.sql.encode())
        assert sorted(conn.execute(options).fetchone()[0]) == sorted(expected)


def test_the_enqueue_notify_migration_routes_every_enqueue_wake_up_through_wake_and_is_idempotent(new_db):
    """0018 on top of 0017: no trigger function NOTIFYs pgsynapse_jobs itself any more (only wake_v1 does), the
    switch is on, and off it queues the job without the NOTIFY; re-running it changes nothing."""
    url = new_db()
    mig = _apply_below(url, 18)
    direct = ("SELECT array_agg(DISTINCT p.proname) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
              " WHERE p.prosrc LIKE '%%pg_notify(''pgsynapse_jobs''%%'")
    with psycopg.connect(url, autocommit=True) as conn:
        assert len(conn.execute(direct).fetchone()[0]) == 9  # the nine enqueue functions, before
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(2):
            assert conn.execute(direct).fetchone()[0] is None
            assert conn.execute("SELECT notify_on_enqueue FROM pgsynapse.queue_settings").fetchall() == [(True,)]
            with conn.transaction():
                conn.execute(mig.sql.encode())
        listener = psycopg.connect(url, autocommit=True)
        listener.execute("LISTEN pgsynapse_jobs")
        conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('a', 'notified')")
        conn.execute("UPDATE pgsynapse.queue_settings SET notify_on_enqueue = false")
        conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('b', 'not notified')")
        conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('not notified either')")
        listener.execute("SELECT 1")  # both commits are done: their NOTIFYs, if any, have been delivered
        got = [n.payload for n in listener.notifies(timeout=0)]
        listener.close()
        assert got == ['{"kind" : "embed", "n" : 1}'], got
        assert conn.execute("SELECT count(*) FROM pgsynapse.jobs WHERE status = 'pending'").fetchone()[0] == 3


def test_the_embeddings_partition_migration_moves_every_vector_and_is_idempotent(new_db):
    """0019 on top of 0018: every vector of the versions that are not retired moves to its version's partition with
    its HNSW index (a kNN plan reads that index), a retired version's leftovers are dropped, a new version gets its
    partition at registration, retiring drops it; re-running the migration changes nothing."""
    url = new_db()
    mig = _apply_below(url, 19)
    vec = "[" + ",".join(["0.1"] * 384) + "]"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgsynapse.model_versions (id, name, dim, status) VALUES"
                     " (2, 'candidate', 384, 'candidate'), (3, 'old', 384, 'rejected')")
        doc = conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('t', 'b') RETURNING id").fetchone()[0]
        chunks = [conn.execute("INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start, char_end,"
                               " content_hash) VALUES (%s, %s, 'x', 1, 0, 1, 'h') RETURNING id", (doc, i)).fetchone()[0]
                  for i in range(3)]
        for version, n in ((1, 3), (2, 2), (3, 1)):
            for c in chunks[:n]:
                conn.execute("INSERT INTO pgsynapse.embeddings (chunk_id, model_version_id, embedding)"
                             " VALUES (%s, %s, %s::vector)", (c, version, vec))
        conn.execute("UPDATE pgsynapse.model_versions SET status = 'retired' WHERE id = 3")  # its index goes, not its row
    assert mig.name in migrate(url)
    per_partition = ("SELECT c.relname, count(e.*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                     " LEFT JOIN pgsynapse.embeddings e ON e.tableoid = c.oid"
                     " WHERE i.inhparent = 'pgsynapse.embeddings'::regclass GROUP BY 1 ORDER BY 1")
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(2):
            assert conn.execute(per_partition).fetchall() == [("embeddings_v1", 3), ("embeddings_v2", 2)]
            assert conn.execute("SELECT count(*) FROM pgsynapse.embeddings").fetchone()[0] == 5
            with conn.transaction():
                conn.execute(mig.sql.encode())
        hnsw = {r[0]: r[1] for r in conn.execute(
            "SELECT indexname, tablename FROM pg_indexes WHERE indexname LIKE 'embeddings_hnsw_v%'")}
        assert hnsw == {"embeddings_hnsw_v1": "embeddings_v1", "embeddings_hnsw_v2": "embeddings_v2"}
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_sort = off")  # three rows: a sort would win; the index must be there to be chosen
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT chunk_id FROM pgsynapse.embeddings e WHERE e.model_version_id = 2"
            " ORDER BY e.embedding::vector(384) <=> %s::vector(384) LIMIT 5", (vec,)))
        assert "embeddings_hnsw_v2" in plan and "embeddings_v1" not in plan, plan
        conn.execute("INSERT INTO pgsynapse.model_versions (id, name, dim, status) VALUES (4, 'new', 384, 'candidate')")
        conn.execute("INSERT INTO pgsynapse.embeddings (chunk_id, model_version_id, embedding) VALUES (%s, 4, %s)",
                     (chunks[0], vec))
        conn.execute("UPDATE pgsynapse.model_versions SET status = 'retired' WHERE id IN (2, 4)")
        assert conn.execute(per_partition).fetchall() == [("embeddings_v1", 3)]
        # a chunk's vectors still go with it (the foreign key reaches every partition)
        conn.execute("DELETE FROM pgsynapse.chunks WHERE id = %s", (chunks[0],))
        assert conn.execute("SELECT count(*) FROM pgsynapse.embeddings").fetchone()[0] == 2


def test_the_feedback_latest_migration_keeps_one_example_per_question_and_is_idempotent(new_db):
    """0021 on top of 0020: of the examples already there, each question's latest feedback's stands and the others
    are superseded (left out of the threshold's count and of training); the new trigger keeps it so; re-running the
    migration changes nothing."""
    url = new_db()
    mig = _apply_below(url, 21)
    standing = "SELECT te.question_id, f.helpful FROM pgsynapse.training_examples te JOIN pgsynapse.feedback f" \
               " ON f.id = te.feedback_id WHERE te.superseded_by IS NULL ORDER BY 1"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pgsynapse.learning_settings SET retrain_min_feedback = 1000")
        a, b = [conn.execute("INSERT INTO pgsynapse.questions (text, status, answer) VALUES (%s, 'answered', 'x') "
                             "RETURNING id", (t,)).fetchone()[0] for t in ("how do I vacuum?", "what is WAL?")]
        for qid, helpful in ((a, True), (a, True), (a, False), (b, True)):  # a: clicked helpful twice, then not
            conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, %s)", (qid, helpful))
        assert conn.execute("SELECT count(*) FROM pgsynapse.training_examples").fetchone()[0] == 4
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(2):
            assert conn.execute(standing).fetchall() == [(a, False), (b, True)]
            with conn.transaction():
                conn.execute(mig.sql.encode())
        conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, true)", (a,))
        assert conn.execute(standing).fetchall() == [(a, True), (b, True)]
        assert conn.execute("SELECT count(*) FROM pgsynapse.training_examples").fetchone()[0] == 5


def test_the_blank_sessions_migration_drops_the_blank_conversation_and_is_idempotent(new_db):
    """0022 on top of 0021: the conversation that blank session ids made is dropped and no new one is made; a named
    session still counts its turns; re-running the migration changes nothing."""
    url = new_db()
    mig = _apply_below(url, 22)
    turns = "SELECT session_id, turns FROM pgsynapse.conversations ORDER BY 1"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('', 'a'), (' ', 'b'), ('s1', 'c')")
        assert conn.execute(turns).fetchall() == [("", 1), (" ", 1), ("s1", 1)]
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(2):
            conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES ('', 'd'), ('s1', 'e')")
            with conn.transaction():
                conn.execute(mig.sql.encode())
        assert conn.execute(turns).fetchall() == [("s1", 3)]


def _status(capsys: pytest.CaptureFixture[str], url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """`pgsynapse status` run in this process (cli.main: its exit code, stdout and stderr), without a new
    interpreter's imports (seconds a command)."""
    capsys.readouterr()
    code = main(["--database-url", url, "status", *flags])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["pgsynapse", "status", *flags], code, out, err)


def test_status_on_a_database_a_migration_behind_names_the_migration(new_db, capsys):
    """`pgsynapse status` at 0022 met the missing jobs.skip_reason column and printed the server's error; then it
    named the migrations in an error, exit 69 ("unreachable, retry later"), while a schema behind by migrations it
    could read around was reported, exit 0. Now reported the same way: the schema line, and what is not shown."""
    url = new_db()
    _apply_below(url, 23)
    pending = [m.name for m in available() if m.version >= 23]
    r = _status(capsys, url)
    assert r.returncode == 0, r.stderr
    shown = ", ".join(pending[:3]) + (f" and {len(pending) - 3} more" if len(pending) > 3 else "")
    assert r.stdout.splitlines()[:2] == [
        f"schema         : migration 22 of {available()[-1].version}, {len(pending)} to apply ({shown}): run "
        "`pgsynapse migrate`",
        "not shown      : the queue, models, questions and workers: the status queries read what these migrations "
        "add"], r.stdout
    as_json = _status(capsys, url, "--json")
    assert as_json.returncode == 0, as_json.stderr
    snap = json.loads(as_json.stdout)
    assert snap["schema"]["pending"] == pending and snap["schema"]["applied"] == 22
    assert snap["incomplete"] == ("the queue, models, questions and workers: the status queries read what these "
                                  "migrations add")


def test_the_job_skip_reason_migration_keeps_the_queue_and_is_idempotent(new_db):
    """0023 on top of 0022: the jobs already there keep their state with no reason; re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 23)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('a', 'b'), ('c', 'd')")
        conn.execute("UPDATE pgsynapse.jobs SET status = 'done' WHERE id = (SELECT min(id) FROM pgsynapse.jobs)")
    assert mig.name in migrate(url)
    queue = "SELECT kind, status, skip_reason FROM pgsynapse.jobs ORDER BY id"
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute(queue).fetchall() == [("embed", "done", None), ("embed", "pending", None)]
        with conn.transaction():
            conn.execute(mig.sql.encode())
        assert conn.execute(queue).fetchall() == [("embed", "done", None), ("embed", "pending", None)]


def test_the_asked_at_migration_keeps_the_questions_and_is_idempotent(new_db):
    """0024 on top of 0023: the questions already there keep a NULL asked_at (latency counts from created_at for
    them); a new or edited question is asked now; re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 24)
    with psycopg.connect(url, autocommit=True) as conn:
        old = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('a') RETURNING id").fetchone()[0]
        data = conn.execute("INSERT INTO pgsynapse.data_questions (text) VALUES ('b') RETURNING id").fetchone()[0]
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(2):
            assert conn.execute("SELECT asked_at FROM pgsynapse.questions WHERE id = %s", (old,)).fetchone() == (None,)
            with conn.transaction():
                conn.execute(mig.sql.encode())
        with conn.transaction():  # one now()
            new = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('c') RETURNING id").fetchone()[0]
            conn.execute("UPDATE pgsynapse.questions SET text = 'a again' WHERE id = %s", (old,))
            conn.execute("UPDATE pgsynapse.data_questions SET text = 'b again' WHERE id = %s", (data,))
            asked = "SELECT bool_and(asked_at = now()) FROM pgsynapse.{} WHERE id = ANY(%s)"
            assert conn.execute(asked.format("questions"), ([old, new],)).fetchone() == (True,)
            assert conn.execute(asked.format("data_questions"), ([data],)).fetchone() == (True,)


def test_the_queued_at_migration_keeps_the_queue_and_is_idempotent(new_db):
    """0027 on top of 0026: the jobs already there keep a NULL queued_at (read as created_at) and are claimed as
    before; re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 27)
    with psycopg.connect(url, autocommit=True) as conn:
        doc = conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('a', 'b') RETURNING id").fetchone()[0]
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        for _ in range(2):
            with conn.transaction():
                conn.execute(mig.sql.encode())
            job = conn.execute("SELECT status, queued_at, created_at FROM pgsynapse.jobs WHERE kind = 'embed' "
                               "AND ref_id = %s", (doc,)).fetchone()
            assert job["status"] == "pending" and job["queued_at"] is None, job
        claim = {"kind": "embed", "limit": 10, "worker": "test", "lease": 30}
        [claimed] = conn.execute(q("claim_jobs"), claim).fetchall()
        assert claimed["queued_at"] == job["created_at"], claimed


def test_the_feedback_check_migration_keeps_the_feedback_and_is_idempotent(new_db):
    """0025 on top of 0024: feedback already there (even on a question with no answer) stays; from now on such
    feedback is refused; re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 25)
    with psycopg.connect(url, autocommit=True) as conn:
        qid = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('a') RETURNING id").fetchone()[0]
        conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, true)", (qid,))
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(2):
            assert conn.execute("SELECT count(*) FROM pgsynapse.feedback").fetchone() == (1,)
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, true)", (qid,))
            with conn.transaction():
                conn.execute(mig.sql.encode())


def test_the_feedback_consistent_migration_keeps_the_rows_there_and_refuses_a_contradiction(new_db):
    """0028 on top of 0027: feedback already there that says helpful and rates 1 stays, and neither blocks the
    upgrade nor the deletion of the passage it names (its chunk_id set to NULL); from now on helpful and a rating
    that disagree are refused, by INSERT or UPDATE; re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 28)
    with psycopg.connect(url, autocommit=True) as conn:
        doc = conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('t', 'b') RETURNING id").fetchone()[0]
        chunk = conn.execute("INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start, char_end,"
                             " content_hash) VALUES (%s, 0, 'x', 1, 0, 1, 'h') RETURNING id", (doc,)).fetchone()[0]
        qid = conn.execute("INSERT INTO pgsynapse.questions (text, status, answer) VALUES ('a', 'answered', 'b')"
                           " RETURNING id").fetchone()[0]
        old = conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, rating, chunk_id) VALUES"
                           " (%s, true, 1, %s) RETURNING id", (qid, chunk)).fetchone()[0]
    assert mig.name in migrate(url)
    write = "INSERT INTO pgsynapse.feedback (question_id, helpful, rating) VALUES (%s, %s, %s)"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM pgsynapse.chunks WHERE id = %s", (chunk,))  # a document edit replaces its chunks
        conn.execute("UPDATE pgsynapse.feedback SET comment = 'kept' WHERE id = %s", (old,))
        for _ in range(2):
            assert conn.execute("SELECT helpful, rating, chunk_id, comment FROM pgsynapse.feedback").fetchall() == [
                (True, 1, None, "kept")]
            for helpful, rating, said in ((True, 1, "helpful"), (True, 3, "helpful"), (False, 4, "not helpful")):
                with pytest.raises(psycopg.errors.CheckViolation, match=f"says {said} and rates it {rating}: a rating "
                                   "of 4 or 5 counts as helpful") as exc:
                    conn.execute(write, (qid, helpful, rating))
                assert exc.value.diag.constraint_name == "feedback_helpful_agrees_with_rating"
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("UPDATE pgsynapse.feedback SET rating = 2 WHERE id = %s", (old,))
            for helpful, rating in ((True, 4), (False, 3), (None, 1), (True, None)):
                conn.execute(write, (qid, helpful, rating))
            conn.execute("DELETE FROM pgsynapse.feedback WHERE id <> %s", (old,))
            with conn.transaction():
                conn.execute(mig.sql.encode())


def test_the_follow_up_examples_migration_keeps_the_examples_there_and_is_idempotent(new_db):
    """0029 on top of 0028: the examples already there keep their query; a follow-up's feedback from now on trains
    on what it was searched with; re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 29)
    insert = ("INSERT INTO pgsynapse.questions (text, status, answer, retrieval_query) VALUES (%s, 'answered', 'b', "
              "'how do I create an index? ' || %s) RETURNING id")
    with psycopg.connect(url, autocommit=True) as conn:
        before = conn.execute(insert, ("and on a heap?", "and on a heap?")).fetchone()[0]
        conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, false)", (before,))
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for run in (1, 2):
            after = conn.execute(insert, ("and a view?", "and a view?")).fetchone()[0]
            conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, false)", (after,))
            queries = [r[0] for r in conn.execute("SELECT query FROM pgsynapse.training_examples ORDER BY id")]
            assert queries == ["and on a heap?"] + ["how do I create an index? and a view?"] * run
            with conn.transaction():
                conn.execute(mig.sql.encode())


def test_the_workers_taking_migration_counts_for_an_application_role_and_is_idempotent(new_db):
    """0030 on top of 0029: an application role may not read pgsynapse.workers, and asks through the function
    whether a worker takes a kind; re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 30)
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgsynapse.workers (worker_id, host, pid, kinds) VALUES ('w1', 'h', 1, '{embed}'),"
                     " ('w2', 'h', 2, '{embed,answer}')")
        conn.execute("UPDATE pgsynapse.workers SET heartbeat_at = now() - interval '1 hour' WHERE worker_id = 'w2'")
        for _ in range(2):
            with conn.transaction():
                conn.execute("SET LOCAL ROLE pgsynapse_app")
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    with conn.transaction():
                        conn.execute("SELECT count(*) FROM pgsynapse.workers")
                counts = conn.execute(q("workers_answering", "ops.sql"), {"kind": "answer"}).fetchone()
                assert counts[1:] == (1, 0)  # one seen lately, and it only embeds: w2 is stale
            with conn.transaction():
                conn.execute(mig.sql.encode())


def test_the_asked_again_migration_times_a_question_put_back_by_any_release(new_db):
    """0026 on top of 0025: a failed question set back to pending by an UPDATE that does not touch asked_at (the
    retry-failed of a release before 0024, run beside this one during an upgrade) is asked again now; re-running
    the migration changes nothing."""
    url = new_db()
    mig = _apply_below(url, 26)
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(2):
            for table in ("questions", "data_questions"):
                qid = conn.execute(f"INSERT INTO pgsynapse.{table} (text) VALUES ('a') RETURNING id").fetchone()[0]
                conn.execute(f"UPDATE pgsynapse.{table} SET status = 'failed', asked_at = now() - interval '1 hour' "
                             "WHERE id = %s", (qid,))
                with conn.transaction():  # one now()
                    conn.execute(f"UPDATE pgsynapse.{table} SET status = 'pending', error = NULL WHERE id = %s",
                                 (qid,))
                    assert conn.execute(f"SELECT asked_at = now() FROM pgsynapse.{table} WHERE id = %s",
                                        (qid,)).fetchone() == (True,), table
            with conn.transaction():
                conn.execute(mig.sql.encode())


def test_status_says_where_the_schema_stands(db_url, capsys):
    """`pgsynapse status` said nothing of the schema: a migration whose tables the status queries do not read
    (0026 changed a trigger) left an upgraded database a release behind without a word."""
    url = db_url  # migrated: a clone of the session's template, which `migrate` made from empty
    before, last = available()[-2:]  # not last.version - 1: a number may be skipped (one left to another branch)
    with psycopg.connect(url, autocommit=True) as conn:  # the last one not recorded: status reads the record
        conn.execute("DELETE FROM public.pgsynapse_migrations WHERE version = %s", (last.version,))
    r = _status(capsys, url, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["schema"] == {"applied": before.version, "latest": last.version,
                                              "pending": [last.name], "newer": []}
    assert (f"schema         : migration {before.version} of {last.version}, 1 to apply ({last.name}): run "
            "`pgsynapse migrate`") in _status(capsys, url).stdout
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO public.pgsynapse_migrations VALUES (%s, %s)", (last.version, last.name))
    assert f"schema         : migration {last.version} (up to date)" in _status(capsys, url).stdout
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO public.pgsynapse_migrations VALUES (9999, '9999_from_the_future.sql')")
    r = _status(capsys, url)
    assert r.returncode == 0, r.stderr
    assert f"schema         : migration 9999, NEWER than this release (it knows up to {last.version})" in r.stdout


def test_a_database_migrated_by_a_newer_release_is_said_so(db_url, capsys):
    """An older release's worker or `migrate` on a database a newer one migrated said "up to date" and nothing else
    (an upgrade rolled back, a host left behind)."""
    url = db_url  # migrated: a clone of the session's template
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO public.pgsynapse_migrations VALUES (9999, '9999_from_the_future.sql')")
    capsys.readouterr()
    code = main(["--database-url", url, "--log-format", "json", "migrate"])  # in-process: no interpreter to start
    out, err = capsys.readouterr()
    assert code == 0 and out.strip() == "database schema is up to date", err
    warned = [e for e in map(json.loads, err.splitlines()) if e["event"] == "database_schema_newer"]
    assert len(warned) == 1 and warned[0]["unknown_migrations"] == [9999] and warned[0]["level"] == "warning"


def test_the_blank_texts_migration_refuses_tabs_and_line_breaks_and_keeps_the_rows_there(new_db):
    """0031 on top of 0030: a question, a data question or a guardrail of nothing but white space (tabs and line
    breaks too: ``btrim`` trimmed spaces only, and data questions had no check) is refused when written; a row
    already there stays (its job fails it, as before) and its other columns can still be updated; re-running
    changes nothing."""
    url = new_db()
    mig = _apply_below(url, 31)
    said = {"questions": "a question", "data_questions": "a data question", "guardrail_rules": "a guardrail rule"}
    blanks = ("\t", "\n", " \r\n\t ")
    with psycopg.connect(url, autocommit=True) as conn:
        old = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (E'\\t\\n') RETURNING id").fetchone()[0]
        conn.execute("INSERT INTO pgsynapse.data_questions (text) VALUES ('')")
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(2):
            for table, constraint, extra in (("questions", "questions_text_not_empty", ""),
                                             ("data_questions", "data_questions_text_not_empty", ""),
                                             ("guardrail_rules", "guardrail_text_not_empty", ", 'block'")):
                cols = "text, action" if extra else "text"
                for blank in ("", *blanks):
                    with pytest.raises(psycopg.errors.CheckViolation) as exc:
                        conn.execute(f"INSERT INTO pgsynapse.{table} ({cols}) VALUES (%s{extra})", (blank,))
                    assert exc.value.diag.constraint_name == constraint
                    assert exc.value.diag.message_primary == (f"{said[table]} needs text: the text written is empty or only white"
                                              " space (spaces, tabs, line breaks)")
                conn.execute(f"INSERT INTO pgsynapse.{table} ({cols}) VALUES (%s{extra})", ("\tx\n",))
            conn.execute("UPDATE pgsynapse.questions SET status = 'failed', error = 'x' WHERE id = %s", (old,))
            with pytest.raises(psycopg.errors.CheckViolation, match="only"):
                conn.execute("UPDATE pgsynapse.questions SET text = E' \\n' WHERE id = %s", (old,))
            with conn.transaction():
                conn.execute(mig.sql.encode())
        assert conn.execute("SELECT count(*) FROM pgsynapse.questions WHERE id = %s", (old,)).fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM pgsynapse.data_questions WHERE text = ''").fetchone()[0] == 1


def test_the_feedback_updates_migration_rebuilds_an_updated_example_and_is_idempotent(new_db):
    """0032 on top of 0031: an example already there follows an UPDATE of its feedback's verdict from now on; a
    bulk load of rows whose first id keys a pending bulk job joins it; re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 32)
    with psycopg.connect(url, autocommit=True) as conn:
        doc = conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('t', 'b') RETURNING id").fetchone()[0]
        chunk = conn.execute("INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start, char_end,"
                             " content_hash) VALUES (%s, 0, 'x', 1, 0, 1, 'h') RETURNING id", (doc,)).fetchone()[0]
        qid = conn.execute("INSERT INTO pgsynapse.questions (text, status, answer, sources) VALUES ('a', 'answered',"
                           " 'b', jsonb_build_array(jsonb_build_object('chunk_id', %s::bigint))) RETURNING id",
                           (chunk,)).fetchone()[0]
        fid = conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, false) RETURNING id",
                           (qid,)).fetchone()[0]
        conn.execute("CREATE OR REPLACE FUNCTION pgsynapse.bulk_enqueue_rows() RETURNS bigint LANGUAGE sql"
                     " IMMUTABLE AS 'SELECT 2::bigint'")
    assert mig.name in migrate(url)
    example = "SELECT positive_chunk_id, negative_chunk_ids FROM pgsynapse.training_examples WHERE feedback_id = %s"
    load = "INSERT INTO pgsynapse.documents (id, title, body) SELECT 500 + g, 't', 'b' || g FROM generate_series(1, 3) g"
    with psycopg.connect(url, autocommit=True) as conn:
        for helpful in (True, False):
            conn.execute("UPDATE pgsynapse.feedback SET helpful = %s WHERE id = %s", (helpful, fid))
            assert conn.execute(example, (fid,)).fetchone() == ((chunk, []) if helpful else (None, [chunk]))
            with conn.transaction():
                for _ in range(2):
                    conn.execute("DELETE FROM pgsynapse.documents WHERE id > 500")
                    conn.execute(load)
            with conn.transaction():
                conn.execute(mig.sql.encode())
        assert conn.execute("SELECT ref_id, cardinality(ref_ids) FROM pgsynapse.jobs WHERE ref_id < 0").fetchall() == [
            (-501, 3)]


def test_the_sql_corrections_migration_refuses_what_can_never_train_and_counts_what_does(new_db):
    """0033 on top of 0032: a correction that could never train is refused when written (a blank statement, one
    that is not a SELECT, an approval of a question that failed or was refused), and the retrain is queued when
    sql_retrain_min_corrections questions have a correction that trains (it counted rows: each of these, and every
    correction of one question); the rows already there stay; re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 33)
    ask = "INSERT INTO pgsynapse.data_questions (text, status, sql) VALUES (%s, %s, %s) RETURNING id"
    correct = "INSERT INTO pgsynapse.sql_corrections (question_id, corrected_sql, approved) VALUES (%s, %s, %s)"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pgsynapse.learning_settings SET sql_retrain_min_corrections = 2")
        failed = conn.execute(ask, ("how many?", "failed", None)).fetchone()[0]
        refused = conn.execute(ask, ("drop it", "refused", "DELETE FROM orders")).fetchone()[0]
        answered = conn.execute(ask, ("how many orders?", "answered", "SELECT count(*) FROM orders")).fetchone()[0]
        conn.execute(correct, (failed, None, True))  # from before: it stays, and is not counted
        conn.execute("DELETE FROM pgsynapse.jobs")
    assert mig.name in migrate(url)
    retrains = "SELECT count(*) FROM pgsynapse.jobs WHERE kind = 'sql_retrain'"
    with psycopg.connect(url, autocommit=True) as conn:
        for question, sql, approved, said in [
                (failed, None, True, f"data question {failed} cannot be approved: no statement could be made for it "
                                     "(status failed, its error says why)"),
                (refused, None, True, f"data question {refused} cannot be approved: its statement was refused by the "
                                      "safety check"),
                (answered, "", False, f"the correction of data question {answered} has an empty statement"),
                (answered, " \n\t", True, f"the correction of data question {answered} has an empty statement"),
                (answered, "DELETE FROM orders", False,
                 f"the correction of data question {answered} is not a SELECT: corrected_sql begins with 'DELETE FROM"),
                (answered, "-- the count\n/* all */ (UPDATE orders SET x = 1)", False, "is not a SELECT"),
                (answered, "-- only a comment", False, "begins with nothing but comments")]:
            with pytest.raises(psycopg.errors.CheckViolation, match=re.escape(said)) as refusal:
                conn.execute(correct, (question, sql, approved))
            assert refusal.value.diag.message_hint
        assert conn.execute("SELECT count(*) FROM pgsynapse.sql_corrections").fetchone()[0] == 1
        conn.execute(correct, (answered, None, True))
        conn.execute(correct, (answered, "-- per order\n(SELECT count(id) FROM orders)", False))
        conn.execute(correct, (answered, "WITH o AS (SELECT 1) SELECT count(*) FROM o", False))
        assert conn.execute(retrains).fetchone()[0] == 0  # three corrections, one question: one pair
        # an edit asks it again: the corrections before it were for the old text
        conn.execute("UPDATE pgsynapse.data_questions SET text = 'how many orders shipped?' WHERE id = %s", (answered,))
        conn.execute("UPDATE pgsynapse.data_questions SET status = 'answered', sql = 'SELECT 1' WHERE id = %s",
                     (answered,))
        other = conn.execute(ask, ("how many regions?", "answered", "SELECT count(*) FROM regions")).fetchone()[0]
        conn.execute(correct, (other, "select count(DISTINCT region) FROM orders", False))
        assert conn.execute(retrains).fetchone()[0] == 0
        conn.execute(correct, (answered, None, True))
        assert conn.execute(retrains).fetchone()[0] == 1
        with conn.transaction():
            conn.execute(mig.sql.encode())
        with pytest.raises(psycopg.errors.CheckViolation, match="is not a SELECT") as refusal:
            conn.execute("UPDATE pgsynapse.sql_corrections SET corrected_sql = 'TRUNCATE orders' WHERE question_id = %s",
                         (other,))
        assert refusal.value.diag.constraint_name == "sql_corrections_statement"
        conn.execute("UPDATE pgsynapse.sql_corrections SET trained_in_model = NULL")  # the retrain's write: not checked


def test_the_identifier_limits_migration_names_the_limit_and_keeps_the_rows_there(new_db):
    """0034 on top of 0033: a session id over 1,000 bytes or a document source over 2,000, written by SQL, is refused
    by a check that names its limit (the Client's own, results.MAX_SESSION_BYTES); it failed on the btree's "index
    row size 3024 exceeds btree version 4 maximum 2704" past 2,704 and was stored under it. A row already there
    stays, and its job can still write it; re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 34)
    with psycopg.connect(url, autocommit=True) as conn:
        old = conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES (repeat('s', 1500), 'q')"
                           " RETURNING id").fetchone()[0]
    assert mig.name in migrate(url)
    cases = (("questions", "session_id", "questions_session_id_length", 1000, ", text", ", 'q'"),
             ("data_questions", "session_id", "data_questions_session_id_length", 1000, ", text", ", 'q'"),
             ("documents", "source", "documents_source_length", 2000, ", body", ", 'b'"))
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(2):
            for table, column, constraint, limit, more, values in cases:
                write = f"INSERT INTO pgsynapse.{table} ({column}{more}) VALUES (%s{values})"
                for value in ("é" * (limit // 2 + 1), "x" * (limit + 1), md5_noise(3000)):
                    with pytest.raises(psycopg.errors.CheckViolation) as exc:
                        conn.execute(write, (value,))
                    assert exc.value.diag.constraint_name == constraint
                    assert exc.value.diag.message_primary == (
                        f"{table}.{column} is {len(value.encode()):,} bytes long (UTF-8): at most {limit:,}")
                conn.execute(write, ("é" * (limit // 2),))
            conn.execute("UPDATE pgsynapse.questions SET status = 'failed', error = 'x' WHERE id = %s", (old,))
            with conn.transaction():
                conn.execute(mig.sql.encode())


def md5_noise(n: int) -> str:
    """``n`` characters that do not compress (a long value that compresses fits the btree, and hides its limit)."""
    return "".join(hashlib.md5(str(i).encode()).hexdigest() for i in range(n // 32 + 1))[:n]


def test_the_similar_images_migration_names_a_missing_model_and_is_idempotent(new_db):
    """0035 on top of 0034: similar_images() names a model id that does not exist (it said "no active image model"),
    and still answers as before where there is something to compare; re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 35)
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(2):
            with pytest.raises(psycopg.errors.RaiseException, match="image model 99 does not exist"):
                conn.execute("SELECT * FROM pgsynapse.similar_images(1, 5, 99)")
            with pytest.raises(psycopg.errors.RaiseException, match="no active image model"):
                conn.execute("SELECT * FROM pgsynapse.similar_images(1)")
            with conn.transaction():
                conn.execute(mig.sql.encode())


@pytest.mark.anyio
async def test_the_duplicate_chunks_migration_queues_a_reembed_that_stores_each_text_once(new_db, models):
    """0036 on top of 0035: a document embedded before identical chunk texts were stored once has its duplicates (the
    text of a body that repeats itself, one chunk row each) until re-embedded by hand; the migration queues its
    embed job, once (a document that had one pending keeps that one; a clean document gets none), and wakes the
    workers, and the worker's embed stores each text once. Re-running queues nothing more."""
    url = new_db()
    mig = _apply_below(url, 36)
    body = "the same sentence again. " * 800  # as the docs' own test of duplicate_chunks_dropped: windows alike
    with psycopg.connect(url, autocommit=True) as conn:
        dup, clean, waiting = [conn.execute("INSERT INTO pgsynapse.documents (source, body) VALUES (%s, %s)"
                                            " RETURNING id", (source, text)).fetchone()[0]
                               for source, text in (("dup", body), ("clean", "one text."), ("waiting", body))]
        conn.execute("UPDATE pgsynapse.jobs SET status = 'done' WHERE ref_id <> %s", (waiting,))
        conn.execute("UPDATE pgsynapse.documents SET status = 'embedded' WHERE id IN (%s, %s)", (dup, clean))
        # chunk rows as a release before 0036 stored them: one row per window, the same text in each
        for doc, texts in ((dup, ["the same sentence again."] * 5 + ["the end."]), (clean, ["one text."]),
                           (waiting, ["the same sentence again."] * 3)):
            for ord_, text in enumerate(texts):
                conn.execute("INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start,"
                             " char_end, content_hash) VALUES (%s, %s, %s, 5, 0, 24, 'old')", (doc, ord_, text))
        conn.execute("LISTEN pgsynapse_jobs")
        assert mig.name in migrate(url)
        woken = [json.loads(n.payload) for n in conn.notifies(timeout=5, stop_after=1)]
        assert woken == [{"kind": "embed", "n": 1}]
        pending = "SELECT ref_id, count(*) FROM pgsynapse.jobs WHERE status = 'pending' GROUP BY 1 ORDER BY 1"
        assert conn.execute(pending).fetchall() == [(dup, 1), (waiting, 1)]
        with conn.transaction():
            conn.execute(mig.sql.encode())
        assert conn.execute(pending).fetchall() == [(dup, 1), (waiting, 1)]
        clean_chunks = conn.execute("SELECT id FROM pgsynapse.chunks WHERE document_id = %s", (clean,)).fetchall()
    aconnection = await aconn(url)
    async with running_worker(fast_settings(url), models):
        await wait_until(aconnection, "SELECT NOT EXISTS (SELECT FROM pgsynapse.jobs WHERE status <> 'done')")
    counts = await (await aconnection.execute(
        "SELECT document_id, count(*) = count(DISTINCT text) AS once FROM pgsynapse.chunks GROUP BY 1 ORDER BY 1"
    )).fetchall()
    assert counts == [{"document_id": d, "once": True} for d in sorted((dup, clean, waiting))]
    assert await (await aconnection.execute(
        "SELECT array_agg(id) FROM pgsynapse.chunks WHERE document_id = %s", (clean,))).fetchone() == {
            "array_agg": [r[0] for r in clean_chunks]}
    await aconnection.close()


def _lock_waits(conn: psycopg.Connection, thread: threading.Thread, n: int) -> None:
    """Return once ``n`` backends of this database wait on a lock (the row state ends the wait; 60 s: a net)."""
    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
               " AND wait_event_type = 'Lock'")
    deadline = time.monotonic() + 60
    while conn.execute(waiting).fetchone()[0] < n and time.monotonic() < deadline:
        thread.join(0.05)
    assert conn.execute(waiting).fetchone()[0] == n


def test_the_answer_cache_migration_locks_a_documents_entries_in_id_order_as_answer_writes_do(new_db):
    """0037 on top of 0036: an edit of a document deleted the cache entries citing it in the order it found them,
    and an answer write locks the entries it counts hits on in id order (answer_cache.sql's lock_entries): with
    entries y < w < z, the write holding y and waiting for w (another transaction's), the edit locking z then
    waiting for y, the write then waiting for z, PostgreSQL aborted one as a deadlock: the application's UPDATE
    failed. The edit now locks its entries in id order too. Re-running the migration changes nothing."""
    url = new_db()
    mig = _apply_below(url, 37)
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        cited, other = [conn.execute("INSERT INTO pgsynapse.documents (source, body) VALUES (%s, 'b') RETURNING id",
                                     (s,)).fetchone()[0] for s in ("cited", "other")]
        y, w, z = [conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (%s) RETURNING id",
                                (t,)).fetchone()[0] for t in ("y?", "w?", "z?")]
        for qid, doc in ((z, cited), (y, cited), (w, other)):  # stored z first: the edit's scan finds it first
            conn.execute("INSERT INTO pgsynapse.answer_cache (question_id, model_version_id, settings_key,"
                         " rules_key, question, embedding, answer, sources, document_ids, document_hashes)"
                         " VALUES (%s, 1, 's', 'r', 'q', array_fill(1::real, ARRAY[384])::vector, 'a', '[]', ARRAY[%s]::bigint[], ARRAY['h'])",
                         (qid, doc))
        for run in (1, 2):
            errors: list[BaseException] = []

            def run_in(target, *args):
                def body():
                    try:
                        target(*args)
                    except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                        errors.append(exc)
                thread = threading.Thread(target=body)
                thread.start()
                return thread

            def answer_write():
                with psycopg.connect(url) as c:
                    c.execute(q("lock_entries", "answer_cache.sql"), {"ids": [y, w, z]})
                    c.execute("UPDATE pgsynapse.answer_cache SET hit_count = hit_count + 1"
                              " WHERE question_id = ANY(%s)", ([y, w, z],))

            def edit():
                with psycopg.connect(url) as c:
                    c.execute("UPDATE pgsynapse.documents SET body = %s WHERE id = %s", (f"edited {run}", cited))

            with psycopg.connect(url) as holder:
                holder.execute("SELECT FROM pgsynapse.answer_cache WHERE question_id = %s FOR UPDATE", (w,))
                writing = run_in(answer_write)
                _lock_waits(conn, writing, 1)  # the write holds y and waits for w
                editing = run_in(edit)
                _lock_waits(conn, editing, 2)  # the edit waits too: for y (in id order), after locking z before
            for thread in (writing, editing):
                thread.join(60)
            assert errors == []
            # the edit removed the two entries citing its document, after the write counted them
            assert conn.execute("SELECT question_id FROM pgsynapse.answer_cache").fetchall() == [(w,)]
            conn.execute("UPDATE pgsynapse.answer_cache SET hit_count = 0")
            for qid in (z, y):
                conn.execute("INSERT INTO pgsynapse.answer_cache (question_id, model_version_id, settings_key,"
                             " rules_key, question, embedding, answer, sources, document_ids, document_hashes)"
                             " VALUES (%s, 1, 's', 'r', 'q', array_fill(1::real, ARRAY[384])::vector, 'a', '[]', ARRAY[%s]::bigint[],"
                             " ARRAY['h'])", (qid, cited))
            with conn.transaction():
                conn.execute(mig.sql.encode())


def test_the_version_routed_migration_routes_what_the_written_out_rule_routed_and_is_inlined(new_db):
    """0038 on top of 0037: version_routed_v1, the one rule of which model versions serve traffic, says what the
    rule written out in routable_versions said for every status, backfill, share and runtime_pending; the planner
    inlines it (the plan filters on the columns, no function call on the answer path); an application role may
    call it; re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 38)
    assert mig.name in migrate(url)
    written_out = ("status = 'active' OR (status = 'candidate' AND backfilled_at IS NOT NULL AND traffic_percent > 0"
                   " AND NOT runtime_pending)")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgsynapse.model_versions (name, dim, status, backfilled_at, traffic_percent,"
                     " runtime_pending)"
                     " SELECT 'v', 384, s, b, t, p FROM unnest(ARRAY['training', 'candidate', 'rejected', 'retired']) s,"
                     " unnest(ARRAY[NULL, now()]) b, unnest(ARRAY[0, 0.01, 100]) t, unnest(ARRAY[false, true]) p")
        for run in (1, 2):
            with conn.transaction():
                conn.execute("SET LOCAL ROLE pgsynapse_app")
                routed = conn.execute("SELECT id, pgsynapse.version_routed_v1(v) FROM pgsynapse.model_versions v"
                                      " ORDER BY id").fetchall()
                rule = conn.execute(f"SELECT id, {written_out} FROM pgsynapse.model_versions ORDER BY id").fetchall()
                assert routed == rule and sum(r for _, r in routed) == 1 + 2  # the active v1; two candidates
                ids = [r[0] for r in conn.execute(q("routable_versions", "answers.sql"))]
                assert ids == [i for i, r in routed if r]
                plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (VERBOSE, COSTS OFF) "
                                                            + q("routable_versions", "answers.sql")))
                assert "version_routed_v1" not in plan and "(v.backfilled_at IS NOT NULL)" in plan, plan
            if run == 1:
                with conn.transaction():
                    conn.execute(mig.sql.encode())


WRITTEN_OUT_VERDICTS = (  # the latest feedback per question, as ab_report, ab_decisions and ab_report_rankers had it
    "SELECT DISTINCT ON (fb.question_id) fb.question_id, qq.model_version_id, coalesce(fb.helpful, fb.rating >= 4)"
    " FROM pgsynapse.feedback fb JOIN pgsynapse.questions qq ON qq.id = fb.question_id"
    " WHERE qq.model_version_id IS NOT NULL AND fb.created_at >= coalesce(qq.asked_at, qq.created_at)"
    " ORDER BY fb.question_id, fb.created_at DESC, fb.id DESC")


def test_the_question_verdicts_migration_keeps_the_verdicts_the_reports_counted_and_filters_before_sorting(new_db):
    """0039 on top of 0038: question_verdicts_v1 keeps, per question, the feedback row the three queries that wrote
    the rule out kept: the latest (a tie on created_at: the higher id), given since the question was last asked,
    on a question a version answered; a deleted question has none. ab_decisions' window reaches the questions'
    scan, below the sort. Re-running changes nothing."""
    url = new_db()
    mig = _apply_below(url, 39)
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        qids = [conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (%s) RETURNING id", (t,)).fetchone()[0]
                for t in ("tie?", "edited?", "deleted?", "no version?", "rated?")]
        conn.execute("UPDATE pgsynapse.questions SET status = 'answered', answer = 'a', model_version_id = 1,"
                     " answered_at = now() WHERE id = ANY(%s)", (qids,))
        tie, edited, deleted, unversioned, rated = qids
        for qid, helpful, rating, at in ((tie, True, None, "2026-01-01"), (tie, False, None, "2026-01-01"),
                                         (edited, True, None, "2000-01-01"), (edited, None, 2, "2000-01-01"),
                                         (deleted, True, None, None), (unversioned, True, None, None),
                                         (rated, None, 5, None), (rated, False, None, "2015-01-01")):
            conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, rating, created_at)"
                         " VALUES (%s, %s, %s, coalesce(%s::timestamptz, now()))", (qid, helpful, rating, at))
        conn.execute("UPDATE pgsynapse.questions SET asked_at = CASE id WHEN %s THEN '2020-01-01'::timestamptz"
                     " ELSE '2010-01-01' END WHERE id = ANY(%s)", (edited, qids))
        conn.execute("UPDATE pgsynapse.questions SET model_version_id = NULL WHERE id = %s", (unversioned,))
        conn.execute("DELETE FROM pgsynapse.questions WHERE id = %s", (deleted,))
        for run in (1, 2):
            with conn.transaction():
                conn.execute("SET LOCAL ROLE pgsynapse_app")
                verdicts = conn.execute("SELECT question_id, version, helpful FROM pgsynapse.question_verdicts_v1"
                                        " ORDER BY question_id").fetchall()
            assert verdicts == conn.execute(WRITTEN_OUT_VERDICTS).fetchall() == [(tie, 1, False), (rated, 1, True)]
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (VERBOSE, COSTS OFF) " + q("ab_decisions", "learning.sql")))
            questions_scan = plan[plan.index("Sort Key: fb.question_id"):]
            assert "(COALESCE(qq.asked_at, qq.created_at) >= (InitPlan" in questions_scan, plan
            if run == 1:
                with conn.transaction():
                    conn.execute(mig.sql.encode())


def test_the_deleted_rows_migration_closes_a_deleted_rows_failed_jobs_by_index_and_is_idempotent(new_db):
    """0040 on top of 0039: a deleted row's failed job stayed failed (`status` listed it) until retry-failed closed
    it. The migration closes those of rows already deleted, a DELETE closes its rows' own (looked up by the index
    jobs_failed_ref, not a scan of the queue's done jobs); data questions get the guardrail column and the 'blocked'
    status, which an edit clears. Re-running the migration changes nothing."""
    url = new_db()
    mig = _apply_below(url, 40)
    with psycopg.connect(url, autocommit=True) as conn:
        doc, gone, kept = [conn.execute("INSERT INTO pgsynapse.documents (body) VALUES (%s) RETURNING id",
                                        (b,)).fetchone()[0] for b in ("a", "b", "c")]
        asked = conn.execute("INSERT INTO pgsynapse.data_questions (text) VALUES ('how many?') RETURNING id").fetchone()[0]
        conn.execute("UPDATE pgsynapse.jobs SET status = 'failed', last_error = 'InputError: too long'")
        conn.execute("DELETE FROM pgsynapse.documents WHERE id = %s", (gone,))  # before 0040: its job stays failed
    assert mig.name in migrate(url)
    queue = "SELECT kind, ref_id, status, skip_reason FROM pgsynapse.jobs ORDER BY id"
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute(queue).fetchall() == [
            ("embed", doc, "failed", None), ("embed", gone, "done", "its row was deleted"),
            ("embed", kept, "failed", None), ("sql_answer", asked, "failed", None)]
        # a queue of many done jobs, and many failed ones of each kind (a bad release's): the DELETE's lookup is the
        # index of failed jobs by (kind, ref_id), not a scan of them
        conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id, status) SELECT 'embed', g, 'done'"
                     " FROM generate_series(1000, 50999) g")
        conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id, status) SELECT k, g, 'failed'"
                     " FROM generate_series(100000, 119999) g, unnest(ARRAY['embed', 'sql_answer']) k")
        conn.execute("ANALYZE pgsynapse.jobs")
        conn.execute("SET stats_fetch_consistency = none")

        def scans():  # the scans of the index jobs_failed_ref, and of the jobs table
            conn.execute("SELECT pg_stat_force_next_flush()")  # this backend's, flushed when this statement ends
            return conn.execute("SELECT i.idx_scan, t.seq_scan FROM pg_stat_user_indexes i JOIN pg_stat_user_tables t"
                                " USING (relid) WHERE i.indexrelname = 'jobs_failed_ref'").fetchone()

        before = scans()
        conn.execute("DELETE FROM pgsynapse.documents WHERE id = %s", (doc,))
        conn.execute("DELETE FROM pgsynapse.data_questions WHERE id = %s", (asked,))
        after = scans()
        assert (after[0] - before[0], after[1] - before[1]) == (2, 0)  # two index lookups, no scan of the jobs
        expected = [("embed", doc, "done", "its row was deleted"), ("embed", gone, "done", "its row was deleted"),
                    ("embed", kept, "failed", None), ("sql_answer", asked, "done", "its row was deleted")]
        assert conn.execute(queue + " LIMIT 4").fetchall() == expected
        blocked = conn.execute("INSERT INTO pgsynapse.data_questions (text) VALUES ('q') RETURNING id").fetchone()[0]
        conn.execute("UPDATE pgsynapse.data_questions SET status = 'blocked', guardrail = '{\"rule_id\": 1}'")
        with conn.transaction():
            conn.execute(mig.sql.encode())
        assert conn.execute(queue + " LIMIT 4").fetchall() == expected
        assert conn.execute("SELECT status, guardrail FROM pgsynapse.data_questions").fetchall() == [
            ("blocked", {"rule_id": 1})]
        conn.execute("UPDATE pgsynapse.data_questions SET text = 'edited' WHERE id = %s", (blocked,))
        assert conn.execute("SELECT status, guardrail FROM pgsynapse.data_questions").fetchall() == [("pending", None)]


def test_the_truncated_rows_migration_closes_a_truncated_tables_failed_jobs_and_shows_the_app_its_retries(new_db):
    """0043 on top of 0041: a TRUNCATE fires no DELETE trigger, so the failed jobs of the truncated rows stayed failed
    (`status` listed them) until retry-failed. The migration closes those of rows truncated before it; a TRUNCATE
    closes its own, those of a cascade too. During retries a row stays pending with error NULL: the view
    job_retries_v1 shows the application (which may not read the queue) its rows' jobs tried again. Re-running the
    migration changes nothing."""
    url = new_db()
    mig = _apply_below(url, 43)
    queue = "SELECT kind, status, skip_reason FROM pgsynapse.jobs ORDER BY id"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO pgsynapse.documents (body) VALUES ('a')")
        conn.execute("UPDATE pgsynapse.jobs SET status = 'failed', last_error = 'InputError: too long'")
        conn.execute("TRUNCATE pgsynapse.documents CASCADE")  # before 0043: its job stays failed
        assert conn.execute(queue).fetchall() == [("embed", "failed", None)]
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute(queue).fetchall() == [("embed", "done", "its row was deleted")]
        for table in ("questions", "images", "data_questions"):
            conn.execute(f"INSERT INTO pgsynapse.{table} (text) VALUES ('what?')" if table != "images" else
                         "INSERT INTO pgsynapse.images (path) VALUES ('/photos/a.png')")
        conn.execute("UPDATE pgsynapse.jobs SET status = 'failed' WHERE status = 'pending'")
        kept = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('again?') RETURNING id").fetchone()[0]
        conn.execute("UPDATE pgsynapse.jobs SET attempts = 2, last_error = 'RuntimeError: endpoint down',"
                     " run_after = now() + interval '8 seconds' WHERE status = 'pending'")
        conn.execute("TRUNCATE pgsynapse.documents CASCADE")  # and the images, which reference documents
        conn.execute("TRUNCATE pgsynapse.data_questions CASCADE")
        conn.execute("DELETE FROM pgsynapse.questions WHERE id <> %s", (kept,))
        expected = [("embed", "done", "its row was deleted"), ("answer", "done", "its row was deleted"),
                    ("embed_image", "done", "its row was deleted"), ("sql_answer", "done", "its row was deleted"),
                    ("answer", "pending", None)]
        assert conn.execute(queue).fetchall() == expected
        with conn.transaction():
            conn.execute("SET LOCAL ROLE pgsynapse_app")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                with conn.transaction():
                    conn.execute("SELECT 1 FROM pgsynapse.jobs")
            retries = conn.execute("SELECT row_table, row_id, kind, status, attempts, last_error,"
                                   " next_attempt_after > now() FROM pgsynapse.job_retries_v1").fetchall()
        assert retries == [("questions", kept, "answer", "pending", 2, "RuntimeError: endpoint down", True)]
        with conn.transaction():
            conn.execute(mig.sql.encode())
        assert conn.execute(queue).fetchall() == expected


def test_the_turns_migration_recounts_the_sessions_and_keeps_them_counted_without_deadlocks(new_db):
    """0041 on top of 0040: conversations.turns counted a session's questions
    up on their INSERT only, so a question deleted or moved to another session stayed counted where it had been,
    and the session it moved to had no row. The migration recounts (a session with no question left has no row),
    and from then on a DELETE and an UPDATE of session_id keep the counts. Two statements moving questions between
    the same two sessions in opposite directions lock the rows in session_id order: one waits for the other, neither
    is aborted as a deadlock. Re-running the migration changes nothing."""
    url = new_db()
    mig = _apply_below(url, 41)
    turns = "SELECT session_id, turns FROM pgsynapse.conversations ORDER BY 1"
    with psycopg.connect(url, autocommit=True) as conn:
        ids = [r[0] for r in conn.execute(
            "INSERT INTO pgsynapse.questions (session_id, text) VALUES ('s1', 'a'), ('s1', 'b'), ('s1', 'c'),"
            " ('s2', 'd'), ('s2', 'e'), ('gone', 'f') RETURNING id").fetchall()]
        conn.execute("DELETE FROM pgsynapse.questions WHERE id = ANY(%s)", ([ids[0], ids[5]],))
        conn.execute("UPDATE pgsynapse.questions SET session_id = 's4' WHERE id = %s", (ids[4],))
        stale = conn.execute(turns).fetchall()
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for run in (1, 2):
            assert stale != [("s1", 2), ("s2", 1), ("s4", 1)] == conn.execute(turns).fetchall()
            errors: list[BaseException] = []

            def move(qid: int, to: str) -> threading.Thread:
                def body():
                    try:
                        with psycopg.connect(url) as c:
                            c.execute("UPDATE pgsynapse.questions SET session_id = %s WHERE id = %s", (to, qid))
                    except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                        errors.append(exc)
                thread = threading.Thread(target=body)
                thread.start()
                return thread

            with psycopg.connect(url) as holder:
                holder.execute("SELECT FROM pgsynapse.conversations WHERE session_id = 's2' FOR UPDATE")
                there = move(ids[1], "s2")  # s1 -> s2: locks s1, waits for s2
                _lock_waits(conn, there, 1)
                back = move(ids[3], "s1")  # s2 -> s1: waits for s1 (first in order), holding nothing
                _lock_waits(conn, back, 2)
            for thread in (there, back):
                thread.join(60)
            assert errors == []
            assert conn.execute(turns).fetchall() == [("s1", 2), ("s2", 1), ("s4", 1)]
            conn.execute("UPDATE pgsynapse.questions SET session_id = CASE id WHEN %s THEN 's1' ELSE 's2' END"
                         " WHERE id = ANY(%s)", (ids[1], [ids[1], ids[3]]))
            with conn.transaction():
                conn.execute(mig.sql.encode())


def test_the_turns_migration_says_a_rating_off_the_scale_is_one_whatever_helpful_says(new_db):
    """0041: feedback that says helpful and rates 0 (or not helpful and rates 6) was refused as a contradiction
    ("says helpful and rates it 0: a rating of 4 or 5 counts as helpful ..."), where the rating alone is refused as
    off the scale (feedback_rating_between_1_and_5): it is refused as that now, by INSERT and UPDATE
    (feedback_consistent_v2.sql); a rating on the scale that disagrees is refused as before."""
    url = new_db()
    mig = _apply_below(url, 41)
    assert mig.name in migrate(url)
    write = "INSERT INTO pgsynapse.feedback (question_id, helpful, rating) VALUES (%s, %s, %s)"
    with psycopg.connect(url, autocommit=True) as conn:
        qid = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('a') RETURNING id").fetchone()[0]
        conn.execute("UPDATE pgsynapse.questions SET status = 'answered', answer = 'b' WHERE id = %s", (qid,))
        fb = conn.execute(write + " RETURNING id", (qid, True, 5)).fetchone()[0]
        for run in (1, 2):
            for helpful, rating in ((True, 0), (False, 6), (None, 0), (True, -3)):
                with pytest.raises(psycopg.errors.CheckViolation, match="feedback_rating_between_1_and_5") as exc:
                    conn.execute(write, (qid, helpful, rating))
                assert exc.value.diag.constraint_name == "feedback_rating_between_1_and_5"
            with pytest.raises(psycopg.errors.CheckViolation, match="feedback_rating_between_1_and_5"):
                conn.execute("UPDATE pgsynapse.feedback SET rating = 0 WHERE id = %s", (fb,))
            with pytest.raises(psycopg.errors.CheckViolation, match="says helpful and rates it 2") as exc:
                conn.execute(write, (qid, True, 2))
            assert exc.value.diag.constraint_name == "feedback_helpful_agrees_with_rating"
            if run == 1:
                with conn.transaction():
                    conn.execute(mig.sql.encode())


def test_the_blocked_corrections_migration_refuses_a_correction_of_a_blocked_question_and_is_idempotent(new_db):
    """0042 on top of 0041: a correction of a blocked data question (a guardrail rule matched it: no statement was
    generated) was taken, and counted towards sql_retrain_min_corrections (it queued a retrain, which dropped it).
    It is refused when written; one written before stays and no longer counts. Re-running it changes nothing."""
    url = new_db()
    mig = _apply_below(url, 42)
    retrains = "SELECT count(*) FROM pgsynapse.jobs WHERE kind = 'sql_retrain' AND status = 'pending'"
    correct = "INSERT INTO pgsynapse.sql_corrections (question_id, corrected_sql, approved) VALUES (%s, %s, %s)"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pgsynapse.learning_settings SET sql_retrain_min_corrections = 1")
        blocked = conn.execute("INSERT INTO pgsynapse.data_questions (text) VALUES ('q') RETURNING id").fetchone()[0]
        conn.execute("UPDATE pgsynapse.data_questions SET status = 'blocked', guardrail = '{\"rule_id\": 1}'")
        conn.execute(correct, (blocked, "SELECT 1", False))  # before 0042: taken, and it queued a retrain
        assert conn.execute(retrains).fetchone()[0] == 1
        conn.execute("DELETE FROM pgsynapse.jobs WHERE kind = 'sql_retrain'")
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        def refused() -> None:
            for sql, approved in (("SELECT 2", False), (None, True)):
                with pytest.raises(psycopg.errors.CheckViolation,
                                   match=f"^data question {blocked} was blocked by (guardrail rule 1, so no "
                                         "statement was generated|a guardrail rule): a correction "):
                    conn.execute(correct, (blocked, sql, approved))
            pairs = conn.execute(q("sql_training_pairs", "textsql_models.sql")).fetchall()
            assert blocked not in [p[1] for p in pairs]

        refused()
        assert conn.execute(q("sql_corrections_count", "textsql_models.sql")).fetchone()[0] == 0
        answered = conn.execute("INSERT INTO pgsynapse.data_questions (text, status, sql) VALUES ('r', 'answered',"
                                " 'SELECT 3') RETURNING id").fetchone()[0]
        conn.execute(correct, (answered, None, True))  # a question that was answered still takes one, and queues
        assert conn.execute(retrains).fetchone()[0] == 1
        with conn.transaction():
            conn.execute(mig.sql.encode())  # 0042's own trigger again, with its own words (0045 has newer ones)
        refused()
        assert conn.execute(q("sql_corrections_count", "textsql_models.sql")).fetchone()[0] == 1  # the answered one
        assert conn.execute(q("new_sql_corrections", "textsql_models.sql")).fetchone()[0] == 1
        assert conn.execute(retrains).fetchone()[0] == 1


def test_the_truncated_questions_migration_recounts_the_sessions_and_a_truncate_empties_them(new_db):
    """0044 on top of 0043: a TRUNCATE of questions fires no DELETE trigger, so conversations kept every session's
    turns though no question was left. The migration recounts (a session with no question left loses its row, as
    0041's recount does), and from then on a TRUNCATE of questions (or one that cascades to them) leaves no session:
    the questions asked after it, in the same transaction too, are counted from 0. Re-running it changes nothing."""
    url = new_db()
    mig = _apply_below(url, 44)
    turns = "SELECT session_id, turns FROM pgsynapse.conversations ORDER BY 1"
    ask = "INSERT INTO pgsynapse.questions (session_id, text) VALUES (%s, 'a')"
    with psycopg.connect(url, autocommit=True) as conn:
        for session in ("s1", "s1", "s2"):
            conn.execute(ask, (session,))
        conn.execute("TRUNCATE pgsynapse.questions CASCADE")  # before 0044: the turns stay counted
        conn.execute(ask, ("s2",))
        assert conn.execute(turns).fetchall() == [("s1", 2), ("s2", 2)]
    assert mig.name in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for run in (1, 2):
            assert conn.execute(turns).fetchall() == [("s2", 1)]
            for session in ("s1", "s1", "s3"):
                conn.execute(ask, (session,))
            conn.execute("TRUNCATE pgsynapse.questions CASCADE")
            assert conn.execute(turns).fetchall() == []
            with conn.transaction():
                conn.execute(ask, ("s1",))
                conn.execute("TRUNCATE pgsynapse.questions RESTART IDENTITY CASCADE")
                conn.execute(ask, ("s2",))
            assert conn.execute(turns).fetchall() == [("s2", 1)]
            with conn.transaction():
                conn.execute(mig.sql.encode())


def test_the_corrections_wording_migration_says_what_sql_correct_says_and_is_idempotent(new_db):
    """0045 on top of 0044: an approval written in SQL of a question that did not run said "data question 5 has no
    statement that ran to approve (it is failed)", a correction of a blocked one did not name its rule; both say
    what `pgsynapse sql-correct` says now (textsql/cli.py). Re-running it changes nothing."""
    url = new_db()
    mig = _apply_below(url, 45)
    approve = "INSERT INTO pgsynapse.sql_corrections (question_id, approved) VALUES (%s, true)"
    ask = "INSERT INTO pgsynapse.data_questions (text, status, sql) VALUES (%s, %s, %s) RETURNING id"
    with psycopg.connect(url, autocommit=True) as conn:
        failed = conn.execute(ask, ("how many?", "failed", "SELECT nocol FROM orders")).fetchone()[0]
        blocked = conn.execute(ask, ("drop it", "pending", None)).fetchone()[0]
        conn.execute("UPDATE pgsynapse.data_questions SET status = 'blocked', guardrail = '{\"rule_id\": 7}' "
                     "WHERE id = %s", (blocked,))
        with pytest.raises(psycopg.errors.CheckViolation, match="has no statement that ran to approve"):
            conn.execute(approve, (failed,))  # before 0045
    assert migrate(url)[0] == mig.name  # and any later ones
    with psycopg.connect(url, autocommit=True) as conn:
        for run in (1, 2):
            with pytest.raises(psycopg.errors.CheckViolation) as refused:
                conn.execute(approve, (failed,))
            assert refused.value.diag.message_primary == (
                f"data question {failed} cannot be approved: its statement failed when it ran (status failed, its "
                "error says why), and an approval keeps a statement that ran as the right answer to train on")
            assert refused.value.diag.constraint_name == "sql_corrections_approval"
            with pytest.raises(psycopg.errors.CheckViolation) as refused:
                conn.execute(approve, (blocked,))
            assert refused.value.diag.message_primary == (
                f"data question {blocked} was blocked by guardrail rule 7, so no statement was generated: a "
                "correction would teach the model to answer what the rule blocks")
            assert conn.execute("SELECT count(*) FROM pgsynapse.sql_corrections").fetchone()[0] == 0
            with conn.transaction():
                conn.execute(mig.sql.encode())
