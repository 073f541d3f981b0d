"""What `pgsynapse feedback` and Client.feedback refuse before writing a row, in words a person at a prompt can act
on (the database's own checks would say "violates check constraint feedback_check")."""

from __future__ import annotations

import pytest

from pgsynapse.errors import InputError
from pgsynapse.feedback import feedback_params

ANSWERED = {"status": "answered", "sources": [{"rank": 1, "chunk_id": 40}, {"rank": 3, "chunk_id": 7}],
            "live_chunks": [40, 7]}


def test_the_cited_passage_becomes_the_chunk_of_the_row():
    assert feedback_params(5, ANSWERED, helpful=True, rating=None, source=3, comment="yes") == {
        "question": 5, "helpful": True, "rating": None, "chunk": 7, "comment": "yes"}
    assert feedback_params(5, ANSWERED, helpful=None, rating=2, source=None, comment=None)["chunk"] is None
    # both, agreeing
    assert feedback_params(5, ANSWERED, helpful=True, rating=4, source=None, comment=None)["rating"] == 4
    assert feedback_params(5, ANSWERED, helpful=False, rating=3, source=None, comment=None)["rating"] == 3


@pytest.mark.parametrize(("question", "kw", "message"), [
    (ANSWERED, {}, "feedback says whether the answer helped, or rates it (1 to 5)"),
    (ANSWERED, {"rating": 6}, "a rating is 1 to 5, got 6"),
    # Python's types as the row has them: these were stored as something else, or failed in the database
    (ANSWERED, {"rating": 2.5}, "a rating is an integer, got 2.5"),
    (ANSWERED, {"rating": "3"}, "a rating is an integer, got '3'"),
    (ANSWERED, {"rating": True}, "a rating is an integer, got True"),
    (ANSWERED, {"helpful": "no"}, "helpful is True or False, got 'no'"),
    (ANSWERED, {"helpful": 0}, "helpful is True or False, got 0"),
    (ANSWERED, {"helpful": True, "source": 1.0}, "a source is an integer, got 1.0"),
    # the column is text: a number was stored as its digits, a list as its repr
    (ANSWERED, {"helpful": True, "comment": 5}, "a comment is text, got 5"),
    (ANSWERED, {"helpful": True, "comment": ["too short"]}, "a comment is text, got ['too short']"),
    # both given, and they disagree: the A/B report and the retrain read the row as helpful (helpful wins)
    (ANSWERED, {"helpful": True, "rating": 1}, "helpful=True contradicts rating=1: a rating of 4 or 5 counts as "
     "helpful, 1 to 3 as not helpful (give one of the two, or both agreeing)"),
    (ANSWERED, {"helpful": False, "rating": 4}, "helpful=False contradicts rating=4: a rating of 4 or 5 counts as "
     "helpful, 1 to 3 as not helpful (give one of the two, or both agreeing)"),
    (None, {"helpful": True}, "there is no question 5"),
    ({"status": "failed", "sources": []}, {"helpful": False}, "question 5 is failed: it has no answer to give feedback on"),
    (ANSWERED, {"helpful": True, "source": 2}, "question 5's answer cites no passage [2] (it cites [1], [3])"),
    ({"status": "answered", "sources": []}, {"helpful": True, "source": 1},
     "question 5's answer cites no passage (it found nothing): give the feedback without naming a passage"),
    ({**ANSWERED, "live_chunks": [40]}, {"helpful": True, "source": 3},
     "passage [3] of question 5's answer is gone: its document was edited or deleted since (give the feedback without"
     " naming a passage)"),
])
def test_mistakes_are_refused_saying_what_is_wrong(question, kw, message):
    args = {"helpful": None, "rating": None, "source": None, "comment": None, **kw}
    with pytest.raises(InputError) as exc:
        feedback_params(5, question, **args)
    assert str(exc.value) == message


def test_a_question_id_is_an_integer():
    with pytest.raises(InputError, match=r"^a question id is an integer, got '249'$"):
        feedback_params("249", ANSWERED, helpful=True, rating=None, source=None, comment=None)
