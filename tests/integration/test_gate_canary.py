"""The retrain gate's canary set on real Postgres: built once from the corpus, frozen, rebuilt only on request
(`pgsynapse canary rebuild`), and its documents kept out of the trainer's corpus pairs."""

from __future__ import annotations

import threading

import psycopg
from psycopg.rows import dict_row

from pgsynapse.learning.canary import canary_command, ensure_canary, rebuild_canary
from pgsynapse.learning.train import synthetic_pairs
from tests.e2e.test_learning import _pages
from tests.helpers import pgsynapse


def _insert(conn: psycopg.Connection, pages: list[dict]) -> list[int]:
    return [r["id"] for r in conn.execute(
        "INSERT INTO pgsynapse.documents (source, title, body) SELECT * FROM unnest(%s::text[], %s::text[], %s::text[])"
        " RETURNING id", ([p["id"] for p in pages], [p["title"] for p in pages], [p["text"] for p in pages])).fetchall()]


def _canary(conn: psycopg.Connection) -> list[tuple]:
    return [tuple(r.values()) for r in conn.execute(
        "SELECT id, question, document_id, origin, frozen_with_version, created_at FROM pgsynapse.canary_questions"
        " ORDER BY id").fetchall()]


def test_the_canary_set_is_built_once_frozen_and_rebuilt_only_on_request(db_url):
    pages = _pages()
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        assert canary_command(conn, "show", 300).startswith("no canary set yet")
        ids = _insert(conn, pages[:12])
        # two workers' first retrains at once: one builds, the other finds it built
        results: list[dict] = []

        def build() -> None:
            with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
                results.append(ensure_canary(c, 1, 8))

        threads = [threading.Thread(target=build) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r["built"] for r in results) == [False, True]
        first = _canary(conn)
        assert len(first) == 8 and {r[2] for r in first} <= set(ids) and len({r[2] for r in first}) == 8
        assert {r[3] for r in first} == {"summary"} and all(r[4] == 1 for r in first)
        assert all(r[1].endswith("?") and r[1][0].isupper() for r in first)

        # more documents and a later retrain (another active version, another size): the set stays as it was
        _insert(conn, pages[12:20])
        assert ensure_canary(conn, 2, 30) == {"built": False, "questions": 0}
        assert _canary(conn) == first

        # the operator's rebuild: from today's corpus, frozen with the active version
        assert canary_command(conn, "show", 300).startswith("canary set: 8 questions (summary 8), frozen with model"
                                                            " version 1 at ")
        rebuilt = pgsynapse("canary", "rebuild", "--size", "15", url=db_url)
        assert rebuilt.returncode == 0 and "canary set rebuilt: 15 questions" in rebuilt.stdout, rebuilt.stderr
        second = _canary(conn)
        assert len(second) == 15 and min(r[0] for r in second) > max(r[0] for r in first)
        # deterministic: the same corpus gives the same questions for the same documents
        assert rebuild_canary(conn, 1, 15) == 15
        third = _canary(conn)
        assert [(r[1], r[2], r[3]) for r in third] == [(r[1], r[2], r[3]) for r in second]

        # a deleted document takes its question with it; the rest stays
        gone = third[0][2]
        conn.execute("DELETE FROM pgsynapse.documents WHERE id = %s", (gone,))
        assert _canary(conn) == [r for r in third if r[2] != gone]



def test_a_canary_set_emptied_on_request_stays_empty_until_rebuilt_with_a_size(db_url):
    """`canary rebuild --size 0`: no canary set, and none built by the next retrain either (never automatically);
    the rebuild is in the registry's history, and `canary rebuild` with a size builds one again."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        _insert(conn, _pages()[:12])
        assert ensure_canary(conn, 1, 8)["built"]
        emptied = pgsynapse("canary", "rebuild", "--size", "0", url=db_url)
        assert emptied.returncode == 0 and "canary set rebuilt: 0 questions" in emptied.stdout, emptied.stderr
        assert _canary(conn) == []
        shown = pgsynapse("canary", url=db_url)
        assert shown.stdout.startswith("no canary set: emptied by `pgsynapse canary rebuild` at "), shown.stdout
        # the next retrain (or ranker training) builds none: the gate checks no canary, saying so
        assert ensure_canary(conn, 1, 300) == {"built": False, "questions": 0}
        assert _canary(conn) == []
        [event] = conn.execute("SELECT model_version_id, event, figures, actor FROM pgsynapse.model_events"
                               " WHERE event = 'canary_rebuilt'").fetchall()
        assert event == {"model_version_id": 1, "event": "canary_rebuilt", "actor": "cli",
                         "figures": {"questions": 0, "replaced": 8, "size": 0}}
        # an operator's rebuild with a size builds one again
        rebuilt = pgsynapse("canary", "rebuild", "--size", "5", url=db_url)
        assert rebuilt.returncode == 0 and "canary set rebuilt: 5 questions" in rebuilt.stdout, rebuilt.stderr
        assert len(_canary(conn)) == 5


def test_a_rebuild_that_finds_no_question_in_the_corpus_says_why(db_url):
    """`canary rebuild --size 5` on a corpus whose documents give no canary question (one-word titles, no heading,
    parameter or summary line) said "0 questions: ... no retrain builds one (`pgsynapse canary rebuild --size N`
    does)": the command just run, as if the size had been 0."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        _insert(conn, [{"id": "vacuum.md", "title": "Vacuum", "text": "# Vacuum\n\nVACUUM reclaims storage."},
                       {"id": "indexes.md", "title": "Indexes", "text": "# Indexes\n\nA B-tree index sorts."}])
        said = canary_command(conn, "rebuild", 5)
        assert said == ("canary set rebuilt: 0 questions: no document of the corpus gives one (a canary question is "
                        "asked from a \"NAME — what it does\" line, a configuration parameter, a title of more than "
                        "one word or a numbered section heading), so the retrain gate checks no canary set; rebuild "
                        "it once the corpus has such documents"), said
        assert _canary(conn) == []


def test_a_retrain_that_finds_no_question_in_the_corpus_leaves_the_canary_set_to_the_next(db_url):
    """The first retrain on a corpus that gives no canary question builds none (the next one tries again): `pgsynapse
    canary` then still said "the first retrain builds it", after that retrain had run."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        _insert(conn, [{"id": "vacuum.md", "title": "Vacuum", "text": "# Vacuum\n\nVACUUM reclaims storage."}])
        assert ensure_canary(conn, 1, 300) == {"built": True, "questions": 0}
        assert _canary(conn) == []
        shown = canary_command(conn, "show", 300)
        assert shown == ("no canary set yet: the next retrain builds it from the corpus once its documents give "
                         "canary questions (or run `pgsynapse canary rebuild`)"), shown


def test_the_canary_documents_give_no_corpus_pairs():
    pages = _pages()[:20]
    docs = {i: (p["title"], p["text"]) for i, p in enumerate(pages)}
    doc_chunks = {i: [i] for i in docs}
    texts = [p["text"] for p in pages]
    everything = synthetic_pairs(docs, doc_chunks, texts, 1000, 0)
    canary_docs = {0, 3, 5, 7}
    kept = synthetic_pairs(docs, doc_chunks, texts, 1000, 0, exclude=canary_docs)
    assert canary_docs <= {d for _, d, _ in everything}
    assert kept and not {d for _, d, _ in kept} & canary_docs
    assert {d for _, d, _ in kept} == {d for _, d, _ in everything} - canary_docs
