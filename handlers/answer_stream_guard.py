"""A streamed answer under a block rule: each sentence is checked before it reaches the row.

A piece the application has read cannot be taken back, and a block rule's check needs the text it stops. So while
a block rule is enabled the pieces of a generated answer are held until a sentence ends
(:func:`~pgsynapse.guardrails.sentences_end`); then the text so far is checked under the batch's rule snapshot, in
the windows the final check makes of that text (:func:`~pgsynapse.guardrails.windows`; a window an earlier check
embedded is not embedded again, and the final whole-answer check reuses them all), and handed to the stream up to
there. The unfinished last sentence is never streamed: it comes with the final write, after the final check.

A block rule that one of those windows matches stops the generation: :class:`AnswerBlocked`, raised from the piece
that ended the sentence, and the question ends blocked as the final check blocks it (its final write replaces the
sentences published before it with the blocked answer). A flag rule is recorded by the final check alone. Checks
come at most every ``stream_interval_ms`` (the stream's throttle): the sentences ended meanwhile are checked at the
next piece after it, together. ``answer_stream_checked`` logs per answer the checks, the windows embedded and
their milliseconds.

Cost, measured on all-MiniLM-L6-v2 (one torch thread, CPU time) for an 8-sentence answer of 185 tokens fed a word
at a time: 9 checks embedding 25 windows in all (the text so far, while it fits the model, is the one window each
check adds beyond the final check's 19), about 90 ms a check, 780-870 ms in all; the final check then embeds
nothing new (1 ms) where alone it took about 1,000 ms (its 19 windows in one batch, padded to the whole text).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pgsynapse.answerers.base import AnswerStopped
from pgsynapse.guardrails import Guard, RuleSet, sentences_end
from pgsynapse.handlers.answer_stream import Stream
from pgsynapse.logs import get_logger
from pgsynapse.models import Embedder

log = get_logger(__name__)


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
        end = sentences_end(self.text)
        out = ""
        if end > self.published and time.monotonic() >= self._checked_at + self.interval:
            started = time.perf_counter()
            [hit] = self.guard.check(self.embedder, [self.text[:end]], rules=self.rules, memo=self.vectors)
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
