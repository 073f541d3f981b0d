"""A streamed answer under a block rule: each sentence is checked before it reaches the row.

A piece the application has read cannot be taken back, and a block rule's check needs the text it stops. So while
a block rule is enabled the pieces of a generated answer are held until a sentence ends
(:func:`~pgsynapse.guardrails.sentences_end`: after ``. ! ? ; :`` and a space, a CJK full stop ``。！？``, a line
break); then the text so far is checked under the batch's rule snapshot, in the windows the final check makes of
that text but its whole (:func:`~pgsynapse.guardrails.windows` with ``part``: each sentence and neighbouring pair,
which the final check makes alike; a window an earlier check embedded is not embedded again, and the final
whole-answer check reuses them all), and handed to the stream up to there. So a check blocks only what the final
check blocks. The unfinished last sentence comes with the final write, after the final check, unless it grows past
:data:`HOLD_CHARS` (a run-on sentence, a text whose sentences end otherwise): then it is checked and handed on up
to its last whitespace (:func:`release_end`), as a text of its own, whose windows can be stricter than the final
check's.

A block rule that one of those windows matches stops the generation: :class:`AnswerBlocked`, raised from the piece
that ended the sentence, and the question ends blocked as the final check blocks it (its final write replaces the
sentences published before it with the blocked answer). What only the final check sees (the unfinished last
sentence and its pair, the whole answer as one window) may block an answer whose sentences streamed: its final
write replaces them just the same. A flag rule is recorded by the final check alone. Checks come at most every
``stream_interval_ms`` (the stream's throttle): the sentences ended meanwhile are checked at the next piece after
it, together. ``answer_stream_checked`` logs per answer the checks, the windows embedded and their milliseconds.

Cost, measured on all-MiniLM-L6-v2 (one torch thread, CPU time) for an 8-sentence answer of 168 tokens fed a word
at a time: 7 checks embedding 13 windows in all (each sentence and pair but the last), 340 ms in all (650-700 ms
when each check also embedded the text so far); the final check then embeds the 3 windows left (the whole answer,
the last sentence and its pair), about 200 ms, where alone it took about 900 ms (its 16 windows in one batch,
padded to the whole text).
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np

from pgsynapse.answerers.base import AnswerStopped
from pgsynapse.guardrails import Guard, RuleSet, sentences_end
from pgsynapse.handlers.answer_stream import Stream
from pgsynapse.logs import get_logger
from pgsynapse.models import Embedder

log = get_logger(__name__)

HOLD_CHARS = 300  # unfinished text held longer than this is checked and published up to its last whitespace
_SPACE = re.compile(r"\s+")


def release_end(text: str, published: int, hold: int = HOLD_CHARS) -> int:
    """Where the text to check and publish ends: after its last finished sentence; or, once more than ``hold``
    characters follow both that and ``published`` (a run-on sentence, a text whose sentences never end as
    :func:`~pgsynapse.guardrails.sentences_end` sees it), after its last whitespace (at its end where that text has
    none: a script written without spaces)."""
    end = sentences_end(text)
    start = max(end, published)
    if len(text) - start <= hold:
        return end
    cut = max((m.end() for m in _SPACE.finditer(text, start)), default=len(text))
    return cut if cut > published else end


class AnswerBlocked(AnswerStopped):
    """Raised by a :class:`GuardedStream` when the text so far matches a block rule: the generation stops there."""

    def __init__(self, hit: dict[str, Any]) -> None:
        super().__init__(f"the answer matches block rule {hit['rule_id']} ({hit['similarity']:.2f})")
        self.hit = hit


class GuardedStream:
    """``stream``, given only the text checked against ``rules``; called as a :class:`Stream` (each piece), then
    ``close``. ``vectors``: the windows embedded by its checks, for the final check (``Guard.check(memo=)``)."""

    def __init__(self, stream: Stream, guard: Guard, embedder: Embedder, rules: RuleSet, *, question: int,
                 interval_ms: float) -> None:
        self.stream, self.guard, self.embedder, self.rules = stream, guard, embedder, rules
        self.question = question
        self.interval = interval_ms / 1000.0
        self.text = ""
        self.published = 0  # characters checked and handed to the stream
        self.vectors: dict[str, np.ndarray] = {}
        self.pieces = 0
        self.checks = 0
        self.check_ms = 0.0
        self._checked_at = float("-inf")

    def __call__(self, piece: str) -> None:
        self.pieces += 1
        self.text += piece
        end = release_end(self.text, self.published)
        out = ""
        if end > self.published and time.monotonic() >= self._checked_at + self.interval:
            started = time.perf_counter()
            [hit] = self.guard.check(self.embedder, [self.text[:end]], rules=self.rules, memo=self.vectors, part=True)
            self._checked_at = time.monotonic()
            self.checks += 1
            self.check_ms += (time.perf_counter() - started) * 1000
            if hit and hit["action"] == "block":
                raise AnswerBlocked({**hit, "stage": "answer"})
            out, self.published = self.text[self.published:end], end
        self.stream(out)  # raises AnswerStopped once the question was edited, deleted or answered

    def close(self) -> None:
        self.stream.close()
        log.info("answer_stream_checked", question=self.question, checks=self.checks, windows=len(self.vectors),
                 ms=round(self.check_ms, 1), published=self.published, chars=len(self.text))
