"""Migration 0046: one SQL function says whether a job's row was removed (the lease reaper's and the writer's
queries called the same CASE written out twice), and answers that recorded as their ranker the teacher version
that answered them (promoted since) record none."""

from __future__ import annotations

import psycopg

from pgsynapse.migrate import migrate
from pgsynapse.queries import q
from tests.integration.test_migrations import _apply_below

# the CASE as reap_expired_leases and close_job_of_removed_row wrote it out before 0046
WRITTEN_OUT = """ref_ids IS NULL AND CASE kind
    WHEN 'embed' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.documents r WHERE r.id = ref_id)
    WHEN 'answer' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.questions r WHERE r.id = ref_id)
    WHEN 'embed_image' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.images r WHERE r.id = ref_id)
    WHEN 'sql_answer' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.data_questions r WHERE r.id = ref_id)
    ELSE false
END"""
JUDGED = "SELECT id, kind, ref_ids IS NOT NULL, {} FROM pgsynapse.jobs ORDER BY id"
CALLED = "pgsynapse.job_row_removed_v1(kind, ref_id, ref_ids)"


def _rows_and_jobs(conn: psycopg.Connection) -> None:
    """A row of each kind kept and one removed, a bulk load's job, a job of a kind with no row (a retrain)."""
    def insert(table: str, column: str, value: str) -> int:
        return conn.execute(f"INSERT INTO pgsynapse.{table} ({column}) VALUES (%s) RETURNING id",
                            (value,)).fetchone()[0]

    docs = [insert("documents", "body", b) for b in ("kept", "gone")]
    for table, column in (("questions", "text"), ("data_questions", "text"), ("images", "path")):
        gone = insert(table, column, "/photos/a.png" if table == "images" else "what?")
        insert(table, column, "/photos/b.png" if table == "images" else "why?")
        conn.execute(f"DELETE FROM pgsynapse.{table} WHERE id = %s", (gone,))
    conn.execute("DELETE FROM pgsynapse.documents WHERE id = %s", (docs[1],))
    conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id, ref_ids, status) VALUES ('embed', %s, %s, 'done'),"
                 " ('embed', 0, %s, 'done'), ('retrain', 424242, NULL, 'done'), ('sql_answer', 424242, NULL, 'done')",
                 (docs[1], [docs[1]], [docs[0]]))


def test_the_removed_rows_migration_says_what_the_written_out_case_said_for_every_kind(new_db):
    """0046 on top of 0045: job_row_removed_v1 judges every job as the CASE of reap_expired_leases and
    close_job_of_removed_row did (a row of each kind kept or deleted, a bulk load's job, a kind with no row), for
    the worker's role; both queries call it instead of writing it out; re-running the migration changes nothing."""
    url = new_db()
    mig = _apply_below(url, 46)
    with psycopg.connect(url, autocommit=True) as conn:
        _rows_and_jobs(conn)
        before = conn.execute(JUDGED.format(WRITTEN_OUT)).fetchall()
    assert {(kind, bulk, removed) for _, kind, bulk, removed in before} == {
        (k, False, r) for k in ("embed", "answer", "embed_image", "sql_answer") for r in (False, True)} | {
        ("embed", True, False), ("retrain", False, False)}
    assert migrate(url)[0] == mig.name  # and any later ones
    with psycopg.connect(url, autocommit=True) as conn:
        for run in (1, 2):
            with conn.transaction():
                conn.execute("SET LOCAL ROLE pgsynapse_worker")
                assert conn.execute(JUDGED.format(CALLED)).fetchall() == before
            with conn.transaction():
                conn.execute(mig.sql.encode())
    for name in ("reap_expired_leases", "close_job_of_removed_row"):
        assert "pgsynapse.job_row_removed_v1(" in q(name) and "WHEN 'sql_answer'" not in q(name), name


def test_the_removed_rows_migration_applies_to_an_empty_database(new_db):
    url = new_db()
    assert "0046_job_row_removed_and_teacher_rankers.sql" in migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        _rows_and_jobs(conn)
        with conn.transaction():
            conn.execute("SET LOCAL ROLE pgsynapse_worker")
            assert conn.execute(JUDGED.format(CALLED)).fetchall() == conn.execute(JUDGED.format(WRITTEN_OUT)).fetchall()


def test_the_removed_rows_migration_clears_the_ranker_of_answers_their_own_teacher_version_ordered(new_db):
    """Before the answer handler dropped it (rescore.rescores), an answer whose ranker was a teacher ranker
    (runtime version, path version:N) that is the model version N that answered it (promoted since: its own
    vectors found the candidates, so it left their order as it was) recorded that ranker, and ab-report credited
    it. 0046 clears those, as the handler records them now; every other answer keeps its ranker."""
    url = new_db()
    mig = _apply_below(url, 46)
    with psycopg.connect(url, autocommit=True) as conn:
        v2 = conn.execute("INSERT INTO pgsynapse.model_versions (name, dim, status, backfilled_at)"
                          " VALUES ('teacher', 384, 'candidate', now()) RETURNING id").fetchone()[0]
        rankers = {path: conn.execute("INSERT INTO pgsynapse.ranker_models (name, path, runtime) VALUES (%s, %s, %s)"
                                      " RETURNING id", (path, path, runtime)).fetchone()[0]
                   for path, runtime in ((f"version:{v2}", "version"), ("version:1", "version"),
                                         ("version:01", "version"), ("/models/version:1", "torch"))}
        answers = [(1, rankers[f"version:{v2}"]), (v2, rankers[f"version:{v2}"]), (1, rankers["version:1"]),
                   (v2, rankers["version:1"]), (1, rankers["version:01"]), (1, rankers["/models/version:1"]),
                   (v2, None), (None, rankers[f"version:{v2}"])]
        ids = [conn.execute("INSERT INTO pgsynapse.questions (text, status, answer, model_version_id, ranker_id)"
                            " VALUES ('what?', 'answered', 'this', %s, %s) RETURNING id", a).fetchone()[0]
               for a in answers]
    assert migrate(url)[0] == mig.name  # and any later ones
    expected = [(i, v, None if (v, r) in ((v2, rankers[f"version:{v2}"]), (1, rankers["version:1"]),
                                          (1, rankers["version:01"])) else r)
                for i, (v, r) in zip(ids, answers)]
    recorded = "SELECT id, model_version_id, ranker_id FROM pgsynapse.questions ORDER BY id"
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute(recorded).fetchall() == expected
        with conn.transaction():
            conn.execute(mig.sql.encode())
        assert conn.execute(recorded).fetchall() == expected
