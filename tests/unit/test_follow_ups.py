"""Which questions of a session are follow-ups, retrieved with the previous question before them, and which ask
about something new and are retrieved on their own (a new topic was searched with the last one's words)."""

from __future__ import annotations

import pytest

from pgsynapse.retrieval import query_with_context, refers_back

PREVIOUS = "How do I roll back part of a transaction?"


@pytest.mark.parametrize("question", [
    "and how do I release that savepoint?", "how do I undo it?", "What about indexes?", "Is there another way?",
    "why?", "an example in psql?", "Can I do the same for views?", "But what if they are nested?", "tell me more",
])
def test_a_question_that_goes_on_from_the_last_is_retrieved_with_it(question):
    assert refers_back(question)
    assert query_with_context(question, [PREVIOUS]) == f"{PREVIOUS} {question}"


@pytest.mark.parametrize("question", [
    "How do I make a column unique?", "Which index type supports JSON containment queries?",
    "How do I back up a single database to a file?", "What does VACUUM FULL do?",
])
def test_a_question_about_something_new_is_retrieved_on_its_own(question):
    assert not refers_back(question)
    assert query_with_context(question, [PREVIOUS]) == question


def test_a_first_question_has_no_context():
    assert query_with_context("how do I undo it?", []) == "how do I undo it?"


def test_a_follow_up_of_a_follow_up_keeps_the_topic_of_the_question_that_set_it():
    # the third was searched with the second alone, "can it cover only some rows? and how do I drop it?", and
    # answered about DROP COLUMN: the unique constraint was lost
    turns = ["What does VACUUM do?", "How do I make a column unique?", "can it cover only some rows?"]
    assert query_with_context("and how do I drop it?", turns) == (
        "How do I make a column unique? can it cover only some rows? and how do I drop it?")
    # never more than CONTEXT_TURNS earlier questions
    assert query_with_context("and then?", ["and a?", "and b?", "and c?", "and d?"]) == "and b? and c? and d? and then?"
