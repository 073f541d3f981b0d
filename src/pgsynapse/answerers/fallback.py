"""A generator's answer that says nothing of its own, replaced by the extractive answer of the same passages.

Small local models often answer with citations and nothing else ("[1]", "[1] [2]"; a third of Qwen2.5-Coder-0.5B's
answers on the docs corpus, BENCHMARKS.md "generation, session 12"), or paste a passage as the prompt shows it
("[1] Title: its text", a third of them at a 512-token context, "answer quality, session 22").
:func:`checked_answer` flags such an answer ``no_text`` or ``pasted_passage``; this wrapper answers the question
again with the extractive answerer, from the passages the generator was given, and keeps both flags (the reason,
``extractive_fallback``) on the row (the answer handler logs ``answer_fallback``). The partial answer already
streamed is replaced by the final one, as always.
"""

from __future__ import annotations

from collections.abc import Callable

from pgsynapse.answerers.base import Answer, Answerer, Request


FALLBACK_REASONS = ("no_text", "pasted_passage")  # flags of checked_answer that the extractive answer replaces


class ExtractiveFallback:
    """``generator``, with ``extractive`` answering instead where the generator's answer is flagged with one of
    :data:`FALLBACK_REASONS`."""

    def __init__(self, generator: Answerer, extractive: Answerer) -> None:
        self.generator = generator
        self.extractive = extractive
        self.name = generator.name

    def answer(self, req: Request, on_delta: Callable[[str], None] | None = None) -> Answer:
        answer = self.generator.answer(req, on_delta=on_delta)
        if not any(f in FALLBACK_REASONS for f in answer.flags):
            return answer
        instead = self.extractive.answer(req)
        return Answer(instead.text, instead.sources, flags=[*answer.flags, "extractive_fallback"])
