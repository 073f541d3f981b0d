"""Feedback on an answer from the command line and Python (``pgsynapse feedback``, ``Client.feedback``): what is
checked before the row is written. Applications may as well INSERT into ``pgsynapse.feedback`` themselves
(docs/sql.md); this is the same row, with the mistakes a person makes at a prompt refused in words: a question
that is not there or has no answer, a passage it did not cite or that is gone since, a rating off the scale, a
verdict and a rating that disagree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pgsynapse.errors import InputError


# how a row's helpful and rating, both given, must agree: as the A/B report and the retrain read a rating alone
# (coalesce(helpful, rating >= 4)); the trigger feedback_consistent_v2 says the same for SQL (migrations 0028, 0041)
RATINGS_AGREE = "a rating of 4 or 5 counts as helpful, 1 to 3 as not helpful (give one of the two, or both agreeing)"


def ratings_agree(helpful: bool | None, rating: int | None) -> bool:
    """Whether ``helpful`` and ``rating`` say the same (true when either is missing)."""
    return helpful is None or rating is None or helpful == (rating >= 4)


@dataclass
class Feedback:
    id: int
    question_id: int
    helpful: bool | None
    rating: int | None
    chunk_id: int | None  # the passage that answered it (``source``: the rank it was cited with), else None


def feedback_params(question_id: int, question: dict[str, Any] | None, *, helpful: bool | None, rating: int | None,
                    source: int | None, comment: str | None) -> dict[str, Any]:
    """The ``insert_feedback`` parameters for a rating of ``question`` (its row: status and sources), or an
    :class:`InputError` saying what is wrong. ``source``: the rank [n] of the cited passage that answered it."""
    _check_types(question_id, helpful=helpful, rating=rating, source=source, comment=comment)
    if helpful is None and rating is None:
        raise InputError("feedback says whether the answer helped, or rates it (1 to 5)")
    if rating is not None and not 1 <= rating <= 5:
        raise InputError(f"a rating is 1 to 5, got {rating}")
    if not ratings_agree(helpful, rating):
        raise InputError(f"helpful={helpful} contradicts rating={rating}: {RATINGS_AGREE}")
    if question is None:
        raise InputError(f"there is no question {question_id}")
    if question["status"] != "answered":
        raise InputError(f"question {question_id} is {question['status']}: it has no answer to give feedback on")
    chunk = None
    if source is not None:
        cited = {int(s["rank"]): int(s["chunk_id"]) for s in question["sources"] or []}
        if not cited:
            raise InputError(f"question {question_id}'s answer cites no passage (it found nothing): give the feedback "
                             "without naming a passage")
        if source not in cited:
            ranks = ", ".join(f"[{r}]" for r in sorted(cited))
            raise InputError(f"question {question_id}'s answer cites no passage [{source}] (it cites {ranks})")
        chunk = cited[source]
        if chunk not in (question.get("live_chunks") or []):
            raise InputError(f"passage [{source}] of question {question_id}'s answer is gone: its document was edited "
                             "or deleted since (give the feedback without naming a passage)")
    return {"question": question_id, "helpful": helpful, "rating": rating, "chunk": chunk, "comment": comment}


def _check_types(question_id: object, **values: object) -> None:
    """Python's own types, as the row has them: ``helpful=0``, ``rating=2.5``, ``"3"`` or ``comment=5`` were stored
    as something else, or failed in the database with a type error."""
    if not isinstance(question_id, int) or isinstance(question_id, bool):
        raise InputError(f"a question id is an integer, got {question_id!r}")
    if values["helpful"] is not None and not isinstance(values["helpful"], bool):
        raise InputError(f"helpful is True or False, got {values['helpful']!r}")
    for name in ("rating", "source"):
        value = values[name]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise InputError(f"a {name} is an integer, got {value!r}")
    if values["comment"] is not None and not isinstance(values["comment"], str):
        raise InputError(f"a comment is text, got {values['comment']!r}")
