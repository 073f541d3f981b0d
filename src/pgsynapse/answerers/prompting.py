"""The generators' prompt: instructions, history, numbered passages, and the question last, in full.

A prompt is fitted to a token budget (the model's context less room for the answer) by trimming passages, the
lowest-ranked first (its text cut to what fits, or the passage left out when little would remain), then by
leaving out history turns, oldest first. The instructions and the question are never cut: a question that does not
fit even alone is refused with an error that says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from pgsynapse.answerers.base import Passage, Request, Turn
from pgsynapse.errors import InputError

# small models copy a literal "[n]": the instructions show real citations instead
INSTRUCTIONS = ("Answer the question in a few sentences, using only the numbered passages. End each sentence with "
                "the number of the passage it comes from in square brackets, like [1] or [2]. "
                "If the passages do not contain the answer, say that you could not find it.")
MIN_PASSAGE_TOKENS = 24  # a passage trimmed below this is left out instead
HISTORY_ANSWER_CHARS = 400


def passages_block(passages: list[Passage], max_chars: int) -> list[str]:
    return [f"[{p.rank}] {p.title or ''}: {p.text[:max_chars]}" for p in passages]


def render_text(req: Request, passages: list[Passage], history: list[Turn], *, max_passage_chars: int = 1200) -> str:
    """The plain-text prompt (models without a chat template)."""
    parts = [INSTRUCTIONS]
    if history:
        parts.append("Conversation so far:")
        for t in history:
            parts.append(f"Q: {t.question}")
            if t.answer:
                parts.append(f"A: {t.answer[:HISTORY_ANSWER_CHARS]}")
    parts.append("Passages:")
    parts += passages_block(passages, max_passage_chars)
    parts.append(f"Question: {req.question}")
    parts.append("Answer:")
    return "\n".join(parts)


def render_messages(req: Request, passages: list[Passage], history: list[Turn], *,
                    max_passage_chars: int = 1200) -> list[dict[str, str]]:
    """Chat messages (instruct models): the instructions as the system message, the history as earlier turns, the
    passages and the question in the last user message, the question last."""
    messages = [{"role": "system", "content": INSTRUCTIONS}]
    for t in history:
        messages.append({"role": "user", "content": t.question})
        if t.answer:
            messages.append({"role": "assistant", "content": t.answer[:HISTORY_ANSWER_CHARS]})
    body = "\n\n".join(["Passages:", *passages_block(passages, max_passage_chars), f"Question: {req.question}"])
    messages.append({"role": "user", "content": body})
    return messages


def fit(req: Request, render: Callable[[list[Passage], list[Turn]], str], count: Callable[[str], int],
        trim: Callable[[str, int], str], budget: int) -> tuple[str, list[Passage], list[Turn]]:
    """The prompt within ``budget`` tokens, and the passages and history turns it holds (a trimmed passage keeps its
    rank, so its citation [n] stays the same)."""
    passages, history = list(req.passages), list(req.history)
    prompt = render(passages, history)
    n = count(prompt)
    while n > budget and passages:
        last = passages[-1]
        cost = count(last.text)
        keep = cost - (n - budget)
        if keep >= MIN_PASSAGE_TOKENS and keep < cost:
            shorter = trim(last.text, keep)
            if len(shorter) < len(last.text):
                passages[-1] = replace(last, text=shorter)
            else:
                passages.pop()
        else:
            passages.pop()
        prompt = render(passages, history)
        n = count(prompt)
    while n > budget and history:
        history.pop(0)
        prompt = render(passages, history)
        n = count(prompt)
    if n > budget:
        raise InputError(f"the question and the instructions take {n:,} tokens, over the {budget:,} the model's "
                         "context leaves beside the answer")
    return prompt, passages, history
