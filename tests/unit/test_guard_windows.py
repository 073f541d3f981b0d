"""The guardrail's windows with the model's real tokenizer: together they cover the whole text, each fits the
model, and a sentence is checked on its own whatever surrounds it."""

from __future__ import annotations

from pgsynapse.guardrails import WINDOW_TOKENS, windows


def _covered(text: str, found: list[str]) -> set[int]:
    """The positions of ``text`` inside some window."""
    covered: set[int] = set()
    for w in found:
        start = text.find(w)
        while start >= 0:
            covered.update(range(start, start + len(w)))
            start = text.find(w, start + 1)
    return covered


def test_a_short_one_sentence_text_is_its_own_only_window(tokenizer):
    assert windows("  how do I vacuum a table?  ", tokenizer, 256) == ["how do I vacuum a table?"]
    assert windows(" \n ", tokenizer, 256) == []


def test_windows_of_a_long_text_cover_all_of_it_and_each_fits_the_model(tokenizer):
    text = " ".join(f"Sentence {i} says something about indexes and tables." for i in range(120))
    run_text = " ".join(f"w{i}" for i in range(400))
    text += " Then one very long run of words without any break " + run_text + "\nand a last line"
    found = windows(text, tokenizer, 256)
    assert text not in found  # too long for the model: never embedded whole (it would be truncated)
    assert all(len(tokenizer(w)["input_ids"]) <= 256 for w in found)
    assert {i for i, ch in enumerate(text) if not ch.isspace()} <= _covered(text, found)
    # every sentence alone, and the unbroken run in overlapping windows of at most WINDOW_TOKENS tokens
    assert "Sentence 57 says something about indexes and tables." in found
    run = [w for w in found if w in run_text]
    n = len(tokenizer(run_text, add_special_tokens=False)["input_ids"])
    assert len(run) >= n // (WINDOW_TOKENS // 2) - 2  # a window starts every WINDOW_TOKENS / 2 tokens
    assert all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) <= WINDOW_TOKENS for w in run)
    # neighbouring sentences also together, so what a break separates is seen in one window
    assert "Sentence 3 says something about indexes and tables. Sentence 4 says something about indexes and tables." in found
