"""The extractive answerer on real passages with the real default model (issue 18 item 2): best passage first,
sentences with their subject and in document order, sources in rank order and only those quoted."""

from __future__ import annotations

import re

import pytest

from pgsynapse.answerers import NOT_FOUND, ExtractiveAnswerer, Passage, Request
from pgsynapse.answerers.extractive import dangling, defined_term, defines
from pgsynapse.chunking import Chunker
from pgsynapse.corpus import shipped_pages

VERSION = {"id": 1, "name": "all-MiniLM-L6-v2", "artifact_path": None, "runtime": "torch", "dim": 384}

# passages as the PostgreSQL 15 docs word them (sql-rollback.html, sql-savepoint.html, sql-rollback-to.html,
# sql-commit.html)
ROLLBACK = ("ROLLBACK\nROLLBACK — abort the current transaction\nDescription\nROLLBACK rolls back the current transaction "
            "and causes all the updates made by the transaction to be discarded.\nParameters\nWORK\nTRANSACTION\n"
            "Optional key words. They have no effect.\nNotes\nUse COMMIT to successfully terminate a transaction.\n"
            "Issuing ROLLBACK outside of a transaction block emits a warning and otherwise has no effect.\nExamples\n"
            "To abort all changes:\nROLLBACK;\nCompatibility\nThe command ROLLBACK conforms to the SQL standard. "
            "The form ROLLBACK TRANSACTION is a PostgreSQL extension.")
SAVEPOINT = ("SAVEPOINT\nSAVEPOINT — define a new savepoint within the current transaction\nDescription\nSAVEPOINT "
             "establishes a new savepoint within the current transaction.\nA savepoint is a special mark inside a "
             "transaction that allows all commands that are executed after it was established to be rolled back, "
             "restoring the transaction state to what it was at the time of the savepoint.\nNotes\nUse ROLLBACK TO to "
             "rollback to a savepoint. Use RELEASE SAVEPOINT to destroy a savepoint, keeping the effects of commands "
             "executed after it was established.")
ROLLBACK_TO = ("ROLLBACK TO SAVEPOINT\nROLLBACK TO SAVEPOINT — roll back to a savepoint\nDescription\nRoll back all "
               "commands that were executed after the savepoint was established. The savepoint remains valid and can "
               "be rolled back to again later, if needed.\nROLLBACK TO SAVEPOINT implicitly destroys all savepoints "
               "that were established after the named savepoint.")
COMMIT = ("COMMIT\nCOMMIT — commit the current transaction\nDescription\nCOMMIT commits the current transaction. All "
          "changes made by the transaction become visible to others and are guaranteed to be durable if a crash "
          "occurs.")
# mvcc-intro.html's first sentences: MiniLM scores them 0.33 for "What is MVCC?", under not_found_threshold
MVCC = ("13.1. Introduction\nPostgreSQL provides a rich set of tools for developers to manage concurrent access to data. "
        "Internally, data consistency is maintained by using a multiversion model (Multiversion Concurrency Control, "
        "MVCC). This means that each SQL statement sees a snapshot of data (a database version) as it was some time "
        "ago, regardless of the current state of the underlying data.")
# mvcc-intro.html's first two paragraphs as the docs word them: the sentence that defines MVCC is the second
MVCC_INTRO = (
    "13.1. Introduction\nPostgreSQL provides a rich set of tools for developers to manage concurrent access to data. "
    "Internally, data consistency is maintained by using a multiversion model (Multiversion Concurrency Control, MVCC). "
    "This means that each SQL statement sees a snapshot of data (a database version) as it was some time ago, regardless "
    "of the current state of the underlying data. This prevents statements from viewing inconsistent data produced by "
    "concurrent transactions performing updates on the same data rows, providing transaction isolation for each "
    "database session. MVCC, by eschewing the locking methodologies of traditional database systems, minimizes lock "
    "contention in order to allow for reasonable performance in multiuser environments.\nThe main advantage of using "
    "the MVCC model of concurrency control rather than locking is that in MVCC locks acquired for querying (reading) "
    "data do not conflict with locks acquired for writing data, and so reading never blocks writing and writing never "
    "blocks reading.")
CAKE = ("Chocolate cake\nMix flour, sugar, cocoa and eggs, then bake the batter for forty minutes. Let the cake cool "
        "before you cut it.")


@pytest.fixture(scope="module")
def embedder(models):
    return models.get(VERSION)


def ask(embedder, question: str, passages: list[tuple[str, str, float]], **kw) -> tuple[str, list[dict]]:
    ps = [Passage(rank, 100 + rank, 200 + rank, title, f"{title.lower()}.html", text, score)
          for rank, (title, text, score) in enumerate(passages, 1)]
    answerer = ExtractiveAnswerer(embedder.encode, **kw)
    ans = answerer.answer(Request(question, ps, [], embedder.encode([question])[0]))
    return ans.text, ans.sources


def cited(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\[(\d+)\]", text)]


def test_the_demo_question_is_answered_by_the_savepoint_sentences_not_the_rollback_notes(embedder):
    """The demo's case (issue 18): the shipped docs' pages chunked as the worker chunks them, the 5 nearest
    chunks to the question; today's answerer quoted "The form ROLLBACK TRANSACTION is a PostgreSQL extension.".
    The product's own retrieval (full text fused) and answer of this question:
    test_answers.py's test_the_demo_question_through_the_product_is_answered_from_savepoints."""
    question = "How do I roll back part of a transaction?"
    pages = {p.source: p for p in shipped_pages()}
    chunker = Chunker(embedder.tokenizer, min(256, embedder.max_seq_length), 0)
    chunks = [(pages[s], c) for s in ("sql-rollback.html", "sql-commit.html", "tutorial-transactions.html",
                                      "sql-begin.html") for c in chunker.split(pages[s].title, pages[s].text)]
    qv = embedder.encode([question])[0]
    scores = embedder.encode([c.embed_text for _, c in chunks]) @ qv
    top = sorted(range(len(chunks)), key=lambda i: -scores[i])[:5]
    passages = [Passage(r, 1, i, chunks[i][0].title, chunks[i][0].source, chunks[i][1].text, float(scores[i]))
                for r, i in enumerate(top, 1)]
    assert passages[0].source == "sql-rollback.html"  # the retrieval of the demo: the ROLLBACK page first
    ans = ExtractiveAnswerer(embedder.encode).answer(Request(question, passages, [], qv))
    assert "PostgreSQL extension" not in ans.text, ans.text
    first = ans.text.split("[")[0]
    assert "savepoint" in first.lower(), ans.text
    assert passages[cited(ans.text)[0] - 1].source == "tutorial-transactions.html", ans.text


def test_sources_are_the_quoted_passages_only_in_rank_order(embedder):
    text, sources = ask(embedder, "How do I roll back part of a transaction?", [
        ("ROLLBACK", ROLLBACK, 0.62), ("Chocolate cake", CAKE, 0.40), ("ROLLBACK TO SAVEPOINT", ROLLBACK_TO, 0.58),
        ("SAVEPOINT", SAVEPOINT, 0.57)])
    ranks = [s["rank"] for s in sources]
    assert ranks == sorted(ranks), ranks
    assert set(ranks) == set(cited(text)), (ranks, text)
    assert 2 not in ranks  # the cake was retrieved (score over the threshold) but never quoted


def test_a_sentence_that_leans_on_its_predecessor_is_quoted_with_it(embedder):
    vacuum = ("VACUUM FULL rewrites the entire contents of the table into a new disk file with no extra space. It "
              "returns the unused space to the operating system. Plain VACUUM removes dead rows, but the space is not "
              "returned to the operating system. Dead rows take up disk space until they are vacuumed. The space of "
              "dead rows is reused by new rows.")
    text, _ = ask(embedder, "how do I give the disk space back to the operating system?", [("VACUUM", vacuum, 0.6)])
    assert "It returns the unused space to the operating system." in text, text
    assert "VACUUM FULL rewrites the entire contents of the table into a new disk file with no extra space. It returns" in text


def test_a_dangling_sentence_without_its_predecessor_in_the_passage_is_not_quoted(embedder):
    # the chunk starts mid-thought: its first sentence's subject is in the previous chunk
    cut = ("They are removed from the table when VACUUM runs and the space is reused. The ANALYZE command collects "
           "statistics about the contents of tables.")
    vacuum = "VACUUM reclaims storage occupied by dead tuples so that the space can be reused by new rows."
    text, _ = ask(embedder, "when are dead rows removed from the table?", [("Routine vacuuming", cut, 0.6),
                                                                           ("VACUUM", vacuum, 0.55)])
    assert "They are removed" not in text


def test_the_next_sentence_that_continues_the_thought_is_kept_in_document_order(embedder):
    passage = ("CREATE INDEX\nThe ANALYZE command is run by autovacuum on changed tables. CREATE UNIQUE INDEX causes "
               "the system to check for duplicate values in the table when the index is created and each time data "
               "is added. Attempts to insert or update data which would result in duplicate entries will generate an "
               "error. This also applies to the primary key constraint. Indexes on expressions are described in "
               "another section.")
    text, _ = ask(embedder, "how do I make an index reject duplicate values?", [("CREATE INDEX", passage, 0.6)])
    first = text.index("CREATE UNIQUE INDEX causes")
    assert first >= 0 and text.index("This also applies to the primary key constraint.") > first, text


def test_rank_weight_lets_retrieval_order_break_a_near_tie_and_a_clearly_better_passage_still_leads(embedder):
    """Two passages that both answer, scored alike: by content alone the closer one leads; with
    ``rank_weight`` the one retrieval ranked first does (its order fuses full text, which the cosine does not see).
    A passage that answers much better leads from rank 2 all the same. (The words' and the how-to weights are off:
    the content here is the cosines.)"""
    question = "how do I roll back to a savepoint"
    both = [("SAVEPOINT", SAVEPOINT, 0.5), ("ROLLBACK TO SAVEPOINT", ROLLBACK_TO, 0.5)]
    cosines = {"lexical_weight": 0, "how_to_weight": 0}
    assert cited(ask(embedder, question, both, **cosines)[0])[0] == 2
    assert cited(ask(embedder, question, both, **cosines, rank_weight=0.5)[0])[0] == 1
    text, _ = ask(embedder, "make a transaction durable", [("ROLLBACK", ROLLBACK, 0.5), ("COMMIT", COMMIT, 0.55)],
                  **cosines, rank_weight=0.5)
    assert cited(text)[0] == 2


def test_a_how_to_question_starts_from_the_sentence_that_tells_how(embedder):
    """"How do I roll back to a savepoint": SAVEPOINT's notes say how ("Use ROLLBACK TO to rollback to a
    savepoint."), ROLLBACK TO SAVEPOINT's description says what the command does; by the cosines alone the second
    leads, with the how-to weight (the default) the first."""
    question = "how do I roll back to a savepoint"
    both = [("SAVEPOINT", SAVEPOINT, 0.5), ("ROLLBACK TO SAVEPOINT", ROLLBACK_TO, 0.5)]
    text, _ = ask(embedder, question, both, lexical_weight=0)
    assert cited(text)[0] == 1 and text.startswith("Use ROLLBACK TO to rollback to a savepoint."), text
    assert cited(ask(embedder, question, both, lexical_weight=0, how_to_weight=0)[0])[0] == 2
    # a question that does not ask how is scored as before
    what = "what rolls back to a savepoint"
    assert ask(embedder, what, both, lexical_weight=0) == ask(embedder, what, both, lexical_weight=0, how_to_weight=0)


JSONB = ("GIN indexes can be used to efficiently search for keys or key/value pairs occurring within a large number of "
         "jsonb documents (datums). Two GIN operator classes are provided, offering different performance and "
         "flexibility trade-offs.\nThe default GIN operator class for jsonb supports queries with the key-exists "
         "operators ?, ?| and ?&, the containment operator @>, and the jsonpath match operators @? and @@.\nAlthough "
         "the jsonb_path_ops operator class supports only queries with the @>, @? and @@ operators, it has notable "
         "performance advantages over the default operator class jsonb_ops.")


def test_the_sentence_with_the_question_s_telling_word_leads(embedder):
    """"Containment" is in one sentence of the passage: by default the answer starts there; by the cosines alone
    (``lexical_weight`` 0) it starts from the sentence about the other operator class."""
    question = "Which index type supports JSON containment queries?"
    text, _ = ask(embedder, question, [("8.14. JSON Types", JSONB, 0.7)], max_sentences=1)
    assert text.startswith("The default GIN operator class for jsonb supports queries"), text
    plain, _ = ask(embedder, question, [("8.14. JSON Types", JSONB, 0.7)], max_sentences=1, lexical_weight=0)
    assert "containment" not in plain, plain


def test_nothing_relevant_is_not_found_with_no_sources(embedder):
    text, sources = ask(embedder, "What is the best recipe for chocolate cake?", [
        ("ROLLBACK", ROLLBACK, 0.12), ("COMMIT", COMMIT, 0.10)])
    assert text == NOT_FOUND and sources == []


def test_a_passage_with_every_word_of_the_question_is_relevant_under_the_threshold(embedder):
    """"What is MVCC?" was answered "not found": an acronym's question is all but one stop word, and MiniLM scores
    the page that defines it 0.33, under ``not_found_threshold`` (0.35). A passage that has every content word of
    the question is relevant down to ``named_floor`` (0.2); one without them, or far under, is not."""
    text, sources = ask(embedder, "What is MVCC?", [("13.1. Introduction", MVCC, 0.33), ("COMMIT", COMMIT, 0.31)])
    assert text != NOT_FOUND and "Multiversion Concurrency Control" in text, text
    assert [s["rank"] for s in sources] == [1]
    assert ask(embedder, "What is MVCC?", [("COMMIT", COMMIT, 0.33)])[0] == NOT_FOUND
    assert ask(embedder, "What is MVCC?", [("13.1. Introduction", MVCC, 0.15)])[0] == NOT_FOUND
    # every word: a question about MVCC in MySQL is not answered by PostgreSQL's MVCC passage at 0.33
    assert ask(embedder, "What is MVCC in MySQL?", [("13.1. Introduction", MVCC, 0.33)])[0] == NOT_FOUND


def test_a_definition_question_starts_from_the_sentence_that_defines_its_term(embedder):
    """"What is MVCC?" was answered from mvcc-intro.html by "MVCC, by eschewing the locking methodologies ...": a
    sentence about MVCC, not the one that says what it is ("... a multiversion model (Multiversion Concurrency
    Control, MVCC)"). A question asking what a term is prefers the sentences that define it (``definition_weight``);
    without it (0) the answer starts elsewhere."""
    defining = "Internally, data consistency is maintained by using a multiversion model"
    text, _ = ask(embedder, "What is MVCC?", [("13.1. Introduction", MVCC_INTRO, 0.5)], max_sentences=1)
    assert text.startswith(defining), text
    plain, _ = ask(embedder, "What is MVCC?", [("13.1. Introduction", MVCC_INTRO, 0.5)], max_sentences=1,
                   definition_weight=0)
    assert not plain.startswith(defining), plain


def test_the_term_of_a_definition_question_and_the_sentences_that_define_it():
    assert defined_term("What is MVCC?") == "MVCC" and defined_term("what's a CTE") == "CTE"
    assert defined_term("What does WAL stand for?") == "WAL" and defined_term("What is the free space map?") == "free space map"
    assert defined_term("What are savepoints?") == "savepoints" and defined_term("What does TOAST mean?") == "TOAST"
    assert defined_term("How do I create an index?") is None
    assert defined_term("What is the difference between json and jsonb in PostgreSQL?") is None  # not a term
    # sentences of the PostgreSQL 15 docs
    assert defines("MVCC", "Internally, data consistency is maintained by using a multiversion model (Multiversion "
                           "Concurrency Control, MVCC).")
    assert defines("WAL", "Write-Ahead Logging (WAL) is a standard method for ensuring data integrity.")
    assert defines("GIN", "GIN stands for Generalized Inverted Index.")
    assert defines("SP-GiST", "SP-GiST is an abbreviation for space-partitioned GiST.")
    assert defines("TOAST", "This section provides an overview of TOAST (The Oversized-Attribute Storage Technique).")
    assert defines("CTE", "These statements, which are often referred to as Common Table Expressions or CTEs, can be "
                          "thought of as defining temporary tables that exist just for one query.")
    assert defines("OID", "Object identifiers (OIDs) are used internally by PostgreSQL as primary keys for various "
                          "system tables.")
    assert defines("domain", "A domain is a user-defined data type that is based on another underlying type.")
    assert defines("savepoints", "A savepoint is a special mark inside a transaction that allows all commands that are "
                                 "executed after it was established to be rolled back.")
    assert not defines("MVCC", "MVCC, by eschewing the locking methodologies of traditional database systems, "
                               "minimizes lock contention in order to allow for reasonable performance.")
    assert not defines("MVCC", "However, proper use of MVCC will generally provide better performance than locks.")
    assert not defines("autovacuum", "autovacuum (boolean): Controls whether the server should run the autovacuum "
                                     "launcher daemon.")  # a setting's type, not an expansion
    assert not defines("OID", "If lobjId is InvalidOid (zero) then lo_import_with_oid assigns an unused OID (this is "
                              "the same behavior as lo_import).")  # words in parentheses, not an expansion
    assert not defines("visibility map", "The pg_visibility module provides a means for examining the visibility map "
                                         "(VM) and page-level visibility information of a table.")  # a mention
    assert not defines("GiST", "SP-GiST indexes, like GiST indexes, offer an infrastructure.")  # another term


def test_dangling_words():
    assert dangling("It reclaims space.") and dangling("However, this is rare.") and dangling("The above transaction.")
    assert not dangling("Items are stored in pages.") and not dangling("Thesaurus files are text.")


def test_a_sentence_that_names_its_subject_as_this_option_leans_on_its_predecessor():
    """A demonstrative in the first words ("Without this option ...", "Enabling this parameter ...") points back
    at what the previous sentence named: quoted alone, the reader is not told which option."""
    assert dangling("Without this option a refresh could block other connections.")
    assert dangling("Enabling this parameter can be helpful when the traffic is too high.")
    assert dangling("With these settings the server logs every statement.")
    assert dangling("All these functions return NULL when an argument is NULL.")
    assert not dangling("Tools such as pg_dump read the catalogs.")  # "such as" lists, it does not point back
    assert not dangling("Refresh the materialized view without locking out concurrent selects on it.")
    assert not dangling("The planner chooses the cheapest plan for this query shape among many candidates.")


def test_an_option_s_sentence_is_quoted_with_the_sentence_that_names_the_option(embedder):
    """sql-refreshmaterializedview.html as the docs word it: the question's words are in the sentence about the
    option ("block ... read"), the answer (CONCURRENTLY's own line) is the sentence before it."""
    refresh = ("CONCURRENTLY\nRefresh the materialized view without locking out concurrent selects on the "
               "materialized view. Without this option a refresh which affects a lot of rows will tend to use fewer "
               "resources and complete more quickly, but could block other connections which are trying to read from "
               "the materialized view. This option may be faster in cases where a small number of rows are affected.")
    text, _ = ask(embedder, "refresh a materialized view without blocking people reading it",
                  [("REFRESH MATERIALIZED VIEW", refresh, 0.7)])
    assert text.startswith("CONCURRENTLY: Refresh the materialized view without locking out concurrent selects"), text
