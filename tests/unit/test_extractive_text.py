"""The extractive answerer's text handling that needs no model: prose lines joined again, code and what a colon
introduces kept apart, and the question's informative words (src/pgsynapse/answerers/base.py, extractive.py)."""

from pgsynapse.answerers.base import Passage, sentence_runs
from pgsynapse.answerers.extractive import _HOW_TO_QUESTION, _TELLS_HOW, ExtractiveAnswerer, _Sentence, dangling, terms

JSONB = (
    "The default GIN operator class for jsonb supports queries with the containment operator @>. (For details of "
    "the semantics that these operators implement, see Table 9.46.) An example of creating an index with this "
    "operator class is:\n"
    "CREATE INDEX idxgin ON api USING GIN (jdoc);\n"
    "The non-default GIN operator class jsonb_path_ops does not support the key-exists operators, but it does "
    "support @>, @? and @@. An example of creating an index with this operator class is:\n"
    "CREATE INDEX idxginp ON api USING GIN (jdoc jsonb_path_ops);\n"
)


def test_code_after_a_colon_is_not_joined_into_the_sentences_around_it():
    runs = sentence_runs(JSONB)
    texts = [s for s, _ in runs]
    assert texts == [
        "The default GIN operator class for jsonb supports queries with the containment operator @>.",
        "(For details of the semantics that these operators implement, see Table 9.46.)",
        "The non-default GIN operator class jsonb_path_ops does not support the key-exists operators, but it does "
        "support @>, @? and @@.",
    ]
    assert [f for _, f in runs] == [False, True, False]  # the code between them is left out


def test_a_hard_wrapped_sentence_is_still_joined_also_after_a_colon_in_lower_case():
    text = ("The options that this command accepts are listed in the table below, and the one that matters most:\n"
            "the name of the savepoint to roll back to.\n"
            "Short heading\n"
            "VACUUM reclaims storage occupied by dead tuples; it can run alongside\n"
            "normal reading and writing of the table.\n")
    assert [s for s, _ in sentence_runs(text)] == [
        "The options that this command accepts are listed in the table below, and the one that matters most: the "
        "name of the savepoint to roll back to.",
        "VACUUM reclaims storage occupied by dead tuples; it can run alongside normal reading and writing of the "
        "table.",
    ]


def test_a_synopsis_line_is_not_joined_into_the_sentence_after_it():
    text = ("UNIQUE [ NULLS [ NOT ] DISTINCT ] ( column_name [, ... ] ) [ INCLUDE ( column_name [, ...]) ] (table "
            "constraint)\nThe UNIQUE constraint specifies that a group of one or more columns of a table can contain "
            "only unique values.\n")
    assert sentence_runs(text) == [("The UNIQUE constraint specifies that a group of one or more columns of a table "
                                    "can contain only unique values.", False)]


def test_a_description_under_the_name_it_describes_is_quoted_with_that_name():
    """A setting's, an option's or a flag's description has no subject of its own ("Sets the base maximum amount
    of memory ..."): the line above it names what it is about, and the sentence is quoted with it."""
    text = ("work_mem (integer)\nSets the base maximum amount of memory to be used by a query operation. If this "
            "value is specified without units, it is taken as kilobytes.\n"
            "Parameters\nCONCURRENTLY\nDrop the index without locking out concurrent selects on the table.\n"
            "IF EXISTS\nDo not throw an error if the index does not exist.\n"
            "-j njobs\n--jobs=njobs\nRun the dump in parallel by dumping njobs tables simultaneously.\n"
            "Description\nDROP INDEX drops an existing index from the database system.\n")
    assert [s for s, _ in sentence_runs(text)] == [
        "work_mem (integer): Sets the base maximum amount of memory to be used by a query operation.",
        "If this value is specified without units, it is taken as kilobytes.",
        "CONCURRENTLY: Drop the index without locking out concurrent selects on the table.",
        "IF EXISTS: Do not throw an error if the index does not exist.",
        "--jobs=njobs: Run the dump in parallel by dumping njobs tables simultaneously.",
        "DROP INDEX drops an existing index from the database system.",  # a section heading is no name
    ]


def test_a_description_that_says_this_option_stands_once_it_comes_with_the_option_s_name():
    """"This option specifies ..." leans on the line above it; quoted with that line (the flag's name) it stands:
    it is quotable, where alone it was not (199 of the docs' 1,865 such descriptions start that way)."""
    text = "--pgdata=directory\nThis option specifies the directory where the database cluster should be stored.\n"
    [(sentence, follows)] = sentence_runs(text)
    assert sentence == "--pgdata=directory: This option specifies the directory where the database cluster should be stored."
    assert not follows and not dangling(sentence)
    assert dangling("This option specifies the directory where the database cluster should be stored.")
    assert dangling("In this case: the option is ignored.")  # a colon after words that name nothing


def test_terms_are_content_words_stemmed():
    assert terms("How do I roll back part of a transaction?") == {"roll", "back", "part", "transaction"}
    assert terms("Savepoints discard parts of transactions") == {"savepoint", "discard", "part", "transaction"}


def test_the_rare_question_word_counts_most():
    p = Passage(1, 1, 1, "t", "s", "x", 0.5)
    cands = [_Sentence(p, i, text, False) for i, text in enumerate([
        "ROLLBACK rolls back the current transaction.",
        "Savepoints discard parts of the transaction.",
        "COMMIT commits the current transaction.",
        "The transaction is rolled back on error.",
        "ROLLBACK TO rolls back to a savepoint.",
    ])]
    lexical = ExtractiveAnswerer._lexical(cands, "How do I roll back part of a transaction?")
    # "transaction" is in four sentences, "roll back" in three, "part" in one: the savepoint sentence shares the
    # most telling word, and beats one with more but commoner words
    assert lexical.argmax() == 1 and lexical[1] > lexical[0]
    assert lexical[2] == min(lexical) > 0  # only "transaction"
    assert lexical[4] == min(lexical[i] for i in (0, 3, 4)) < lexical[0]  # no "transaction"
    assert list(ExtractiveAnswerer._lexical(cands, "what is it?")) == [0.0] * 5  # no content word


def test_a_how_to_question_and_the_sentences_that_tell_how():
    for q in ("How do I roll back part of a transaction?", "how can I make a column unique", "How to vacuum a table"):
        assert _HOW_TO_QUESTION.match(q), q
    for q in ("What does ROLLBACK do?", "Which index type supports JSON containment?", "Why is my query slow?"):
        assert not _HOW_TO_QUESTION.match(q), q
    for s in ("Savepoints allow you to selectively discard parts of the transaction, while committing the rest.",
              "After defining a savepoint with SAVEPOINT, you can if needed roll back to the savepoint.",
              "Use VACUUM to reclaim storage.", "pg_dump can be used to back up a single database."):
        assert _TELLS_HOW.search(s), s
    for s in ("ROLLBACK rolls back the current transaction.",
              "The form ROLLBACK TRANSACTION is a PostgreSQL extension."):
        assert not _TELLS_HOW.search(s), s
