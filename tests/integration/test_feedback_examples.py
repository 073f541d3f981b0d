"""Feedback becomes training examples one per question, from its latest row (migration 0021, feedback_v4.sql), as
the A/B report counts verdicts: clicking twice does not count twice towards the retrain threshold nor train twice,
a changed verdict replaces the first, and deleting the later row lets the earlier one stand again."""

from __future__ import annotations

import argparse
import json

import psycopg
import pytest
from psycopg.rows import dict_row

from pgsynapse.errors import InputError
from pgsynapse.learning.cli import queue_retrain, run_learning_command
from pgsynapse.queries import q
from pgsynapse.status import render, snapshot
from tests.helpers import aconn, fast_settings, running_worker, wait_until


@pytest.fixture
def conn(db_url):
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
        c.execute("UPDATE pgsynapse.learning_settings SET retrain_min_feedback = 3")
        doc = c.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('t', 'b') RETURNING id").fetchone()["id"]
        chunks = [c.execute("INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start, char_end,"
                            " content_hash) VALUES (%s, %s, 'x', 1, 0, 1, 'h') RETURNING id", (doc, i)).fetchone()["id"]
                  for i in range(2)]
        c.chunks = chunks
        yield c


def _question(conn, text: str) -> int:
    return conn.execute("INSERT INTO pgsynapse.questions (text, status, answer, sources) VALUES (%s, 'answered', 'a',"
                        " jsonb_build_array(jsonb_build_object('chunk_id', %s::bigint))) RETURNING id",
                        (text, conn.chunks[0])).fetchone()["id"]


def _standing(conn) -> list[tuple[str, int]]:
    """What the retrain trains on (train.load_data's query) and the ranker too: (question, positive chunk)."""
    train = [(r["query"], r["positive_chunk_id"]) for r in conn.execute(q("feedback_examples", "learning.sql"))]
    ranker = [(r["query"], r["positive_chunk_id"]) for r in conn.execute(q("ranker_examples", "rankers.sql"))]
    assert train == ranker
    return train


def _untrained(conn) -> int:
    return conn.execute(q("feedback_progress", "learning.sql")).fetchone()["untrained"]


def _retrains(conn) -> int:
    return conn.execute("SELECT count(*) AS n FROM pgsynapse.jobs WHERE kind = 'retrain'").fetchone()["n"]


def test_one_question_clicked_many_times_is_one_example_and_does_not_reach_the_threshold(conn):
    a = _question(conn, "how do I vacuum?")
    for _ in range(5):  # five statements, as five clicks arrive
        conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, true)", (a,))
    # and several rows of one question in one statement
    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) SELECT %s, true FROM generate_series(1, 4)",
                 (a,))
    assert conn.execute("SELECT count(*) AS n FROM pgsynapse.training_examples").fetchone()["n"] == 9  # kept
    assert _untrained(conn) == 1 and _standing(conn) == [("how do I vacuum?", conn.chunks[0])]
    assert _retrains(conn) == 0  # 9 clicks, one question: under the threshold of 3
    b, c = _question(conn, "what is a checkpoint?"), _question(conn, "what is WAL?")
    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, true), (%s, true)", (b, c))
    assert _untrained(conn) == 3 and _retrains(conn) == 1  # three questions: the threshold
    # `pgsynapse status` says how near the next retrain is, counting as the trigger does
    snap = snapshot(conn)
    assert snap["feedback"] == {"rows": 11, "questions": 3, "untrained": 3, "examples": 3, "retrain_min_feedback": 3}
    assert "feedback       : 11 rows on 3 questions; 3 of 3 new examples for the next retrain (one per question)" \
        in render(snap)


def test_status_counts_one_feedback_row_and_one_question_in_the_singular(conn):
    """`pgsynapse status` said "feedback : 2 rows on 1 questions": each count takes its own number."""
    conn.execute("UPDATE pgsynapse.learning_settings SET retrain_min_feedback = 1")
    a = _question(conn, "how do I vacuum?")
    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, false)", (a,))
    assert "feedback       : 1 row on 1 question; 0 of 1 new example for the next retrain (one per question)" \
        in render(snapshot(conn)).splitlines()
    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, false)", (a,))
    assert "feedback       : 2 rows on 1 question; 0 of 1 new example for the next retrain (one per question)" \
        in render(snapshot(conn)).splitlines()


def test_a_follow_up_trains_on_what_was_searched_not_its_bare_text(conn):
    """A follow-up ("and what about heap tables?") is searched with its session's context (retrieval_query); its
    example trained the bare text, which does not say what it asks, nor what the served model was given."""
    searched = "how do I create an index? and what about heap tables?"
    follow_up = conn.execute(
        "INSERT INTO pgsynapse.questions (text, status, answer, sources, retrieval_query) VALUES ('and what about "
        "heap tables?', 'answered', 'a', jsonb_build_array(jsonb_build_object('chunk_id', %s::bigint)), %s) "
        "RETURNING id", (conn.chunks[1], searched)).fetchone()["id"]
    plain = _question(conn, "how do I vacuum?")
    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, true), (%s, true)",
                 (follow_up, plain))
    assert sorted(_standing(conn)) == [(searched, conn.chunks[1]), ("how do I vacuum?", conn.chunks[0])]


def test_a_changed_verdict_replaces_the_first_and_deleting_it_restores_the_first(conn):
    a = _question(conn, "how do I vacuum?")
    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id) VALUES (%s, true, %s)",
                 (a, conn.chunks[1]))
    assert _standing(conn) == [("how do I vacuum?", conn.chunks[1])]
    later = conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, false) RETURNING id",
                         (a,)).fetchone()["id"]
    assert _standing(conn) == [] and _untrained(conn) == 0  # the latest verdict: not helpful
    # feedback written with an earlier time (an import of older clicks) does not replace the latest
    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, created_at) VALUES"
                 " (%s, true, now() - interval '1 day')", (a,))
    assert _standing(conn) == []
    conn.execute("DELETE FROM pgsynapse.feedback WHERE id = %s", (later,))
    # the latest remaining row stands: the backdated click is older than the first
    assert _standing(conn) == [("how do I vacuum?", conn.chunks[1])] and _untrained(conn) == 1


def test_deleting_any_row_leaves_the_latest_remaining_one_standing(conn):
    a = _question(conn, "how do I vacuum?")
    rows = [conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id, comment) VALUES"
                         " (%s, true, %s, %s) RETURNING id", (a, conn.chunks[i % 2], str(i))).fetchone()["id"]
            for i in range(3)]
    assert _standing(conn) == [("how do I vacuum?", conn.chunks[0])] and _untrained(conn) == 1  # the third
    conn.execute("DELETE FROM pgsynapse.feedback WHERE id = %s", (rows[1],))  # a superseded one in the middle
    assert _standing(conn) == [("how do I vacuum?", conn.chunks[0])] and _untrained(conn) == 1
    conn.execute("DELETE FROM pgsynapse.feedback WHERE id = %s", (rows[2],))  # the latest: the first stands
    assert _untrained(conn) == 1
    assert conn.execute("SELECT f.comment FROM pgsynapse.training_examples te JOIN pgsynapse.feedback f"
                        " ON f.id = te.feedback_id WHERE te.superseded_by IS NULL").fetchall() == [{"comment": "0"}]
    conn.execute("DELETE FROM pgsynapse.questions WHERE id = %s", (a,))  # and with the question, everything goes
    assert _standing(conn) == [] and _untrained(conn) == 0


def test_a_manual_retrain_with_no_feedback_to_learn_from_is_refused_and_queues_nothing(conn):
    retrain = argparse.Namespace(command="retrain", wait=False, json=False)
    a = _question(conn, "how do I vacuum?")
    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, false)", (a,))  # no positive
    with pytest.raises(InputError, match="no feedback to learn from: no feedback row marks an answer helpful .*; nothing was queued"):
        run_learning_command(retrain, conn)
    assert _retrains(conn) == 0
    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, true)", (a,))
    assert run_learning_command(retrain, conn) == 0 and _retrains(conn) == 1  # under the threshold: forced


def test_a_refused_retrain_with_json_prints_one_json_document_saying_so(conn, capsys):
    """README: with --json, stdout is one JSON document (the outcome ...). A retrain refused for want of helpful
    feedback printed nothing on stdout: it prints the outcome "refused" and the reason, still exits 1 (InputError)
    with the reason on stderr (cli.main)."""
    a = _question(conn, "how do I vacuum?")
    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, false)", (a,))
    with pytest.raises(InputError, match="no feedback to learn from: .*; nothing was queued") as refused:
        run_learning_command(argparse.Namespace(command="retrain", wait=True, json=True), conn)
    assert json.loads(capsys.readouterr().out) == {"job": None, "outcome": "refused", "reason": str(refused.value),
                                                   "version": None, "status": None, "gate": None}
    assert _retrains(conn) == 0


@pytest.mark.anyio
async def test_a_queued_retrain_with_no_example_to_learn_from_is_skipped_saying_why(db_url, models, tmp_path):
    # a retrain queued by other means than the CLI (SQL, a script, the threshold before the feedback was deleted)
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
        doc = c.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('t', 'b') RETURNING id").fetchone()["id"]
        chunk = c.execute("INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start, char_end,"
                          " content_hash) VALUES (%s, 0, 'x', 1, 0, 1, 'h') RETURNING id", (doc,)).fetchone()["id"]
        a = c.execute("INSERT INTO pgsynapse.questions (text, status, answer) VALUES ('how do I vacuum?',"
                      " 'answered', 'a') RETURNING id").fetchone()["id"]
        c.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id) VALUES (%s, false, %s)", (a, chunk))
        job = queue_retrain(c)
    settings = fast_settings(db_url, kinds=("retrain",), data_dir=str(tmp_path / "data"))
    conn = await aconn(db_url)
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT status = 'done' FROM pgsynapse.jobs WHERE id = %s", (job,),
                         channel="pgsynapse_models")
    # nothing trained, registered or frozen: a rejected version 2 and a canary set built from whatever corpus
    # there was would be all a retrain without examples could make
    assert (await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.model_versions")).fetchone())["n"] == 1
    assert (await (await conn.execute("SELECT count(*) AS n FROM pgsynapse.canary_questions")).fetchone())["n"] == 0
    row = await (await conn.execute("SELECT skip_reason FROM pgsynapse.jobs WHERE id = %s", (job,))).fetchone()
    assert row["skip_reason"].startswith("no feedback to learn from: no feedback row marks an answer helpful")
    await conn.close()


def test_feedback_through_sql_on_a_question_with_no_answer_is_refused_saying_so(conn):
    """As `pgsynapse feedback` and Client.feedback refuse it (migration 0025): a pending, failed or blocked question
    has no answer, and its feedback became a training example whose query was never answered."""
    answered = _question(conn, "how do I vacuum?")
    for status in ("pending", "failed", "blocked"):
        qid = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (%s) RETURNING id",
                           (f"a question now {status}",)).fetchone()["id"]
        conn.execute("UPDATE pgsynapse.questions SET status = %s WHERE id = %s", (status, qid))
        with pytest.raises(psycopg.errors.CheckViolation) as refused:
            conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id) VALUES (%s, true, %s)",
                         (qid, conn.chunks[1]))
        assert str(refused.value).startswith(f"question {qid} is {status}: it has no answer to give feedback on")
        assert refused.value.diag.constraint_name == "feedback_needs_an_answer"
        # nor can a row of an answered question be moved onto it
        row = conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, true) RETURNING id",
                           (answered,)).fetchone()["id"]
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE pgsynapse.feedback SET question_id = %s WHERE id = %s", (qid, row))
    # an answered question takes feedback naming any passage, cited or not (a correction): it is the positive
    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, chunk_id) VALUES (%s, true, %s)",
                 (answered, conn.chunks[1]))
    assert _standing(conn) == [("how do I vacuum?", conn.chunks[1])]
    assert conn.execute("SELECT count(*) AS n FROM pgsynapse.training_examples WHERE query LIKE 'a question now%'"
                        ).fetchone()["n"] == 0


def test_feedback_through_sql_with_a_rating_off_the_scale_is_refused_as_that_whatever_helpful_says(conn):
    """A rating of 0 with helpful set was refused as a contradiction ("says helpful and rates it 0: a rating of 4 or 5
    counts as helpful, 1 to 3 as not helpful"), which sent the user to fix the wrong thing: the rating alone is off
    the scale, and is refused as that (feedback_rating_between_1_and_5), helpful or not (migration 0041)."""
    qid = _question(conn, "how do I vacuum?")
    row = conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, true) RETURNING id",
                       (qid,)).fetchone()["id"]
    for helpful in (True, False, None):
        for rating in (0, 6):
            with pytest.raises(psycopg.errors.CheckViolation) as refused:
                conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful, rating) VALUES (%s, %s, %s)",
                             (qid, helpful, rating))
            assert refused.value.diag.constraint_name == "feedback_rating_between_1_and_5", str(refused.value)
    with pytest.raises(psycopg.errors.CheckViolation) as refused:
        conn.execute("UPDATE pgsynapse.feedback SET rating = 0 WHERE id = %s", (row,))
    assert refused.value.diag.constraint_name == "feedback_rating_between_1_and_5", str(refused.value)


def test_a_verdict_changed_by_an_update_trains_the_new_verdict(conn):
    """An application may UPDATE a feedback row's helpful, rating and chunk_id (pgsynapse_app's grant, a user who
    changes their click): its example follows, and counts as new again. It was built on INSERT only, so the retrain
    learnt the old verdict."""
    qs = [_question(conn, f"how do I vacuum table {i}?") for i in range(3)]
    rows = [conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, false) RETURNING id",
                         (a,)).fetchone()["id"] for a in qs]
    assert _standing(conn) == [] and _untrained(conn) == 0 and _retrains(conn) == 0
    conn.execute("UPDATE pgsynapse.feedback SET helpful = true, chunk_id = %s WHERE id = %s", (conn.chunks[1], rows[0]))
    assert _standing(conn) == [("how do I vacuum table 0?", conn.chunks[1])] and _untrained(conn) == 1
    assert conn.execute("SELECT negative_chunk_ids FROM pgsynapse.training_examples WHERE feedback_id = %s",
                        (rows[0],)).fetchone()["negative_chunk_ids"] == []
    conn.execute("UPDATE pgsynapse.feedback SET helpful = NULL, rating = 5 WHERE id = ANY(%s)", (rows[1:],))
    assert _untrained(conn) == 3 and _retrains(conn) == 1  # the threshold of 3, reached by the updates
    # trained, then an update that does not change what it teaches (the comment, the same verdict): still trained
    conn.execute("UPDATE pgsynapse.training_examples SET trained_in_version = 1")
    conn.execute("UPDATE pgsynapse.feedback SET comment = 'thanks', rating = 4 WHERE id = %s", (rows[1],))
    assert _untrained(conn) == 0
    # trained, then the verdict taken back: the question has no positive any more, and teaches no vector
    conn.execute("UPDATE pgsynapse.feedback SET rating = 1 WHERE id = %s", (rows[1],))
    assert sorted(_standing(conn)) == [("how do I vacuum table 0?", conn.chunks[1]),
                                       ("how do I vacuum table 2?", conn.chunks[0])]
    ex = conn.execute("SELECT positive_chunk_id, negative_chunk_ids, trained_in_version FROM"
                      " pgsynapse.training_examples WHERE feedback_id = %s", (rows[1],)).fetchone()
    assert ex == {"positive_chunk_id": None, "negative_chunk_ids": [conn.chunks[0]], "trained_in_version": None}
    # a passage deleted (a document edit) sets the row's chunk_id to NULL: that is no new verdict
    conn.execute("DELETE FROM pgsynapse.chunks WHERE id = %s", (conn.chunks[1],))
    assert conn.execute("SELECT positive_chunk_id, trained_in_version FROM pgsynapse.training_examples"
                        " WHERE feedback_id = %s", (rows[0],)).fetchone() == {"positive_chunk_id": None,
                                                                               "trained_in_version": 1}
