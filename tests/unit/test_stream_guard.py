"""A streamed answer under a block rule (handlers/answer_stream_guard.py), with the real model and no database:
only checked text reaches the stream, a sentence at a time, throttled, and the final check embeds only what the
stream's checks did not."""

from __future__ import annotations

import pytest

from pgsynapse.guardrails import Guard, sentences_end, windows
from pgsynapse.handlers.answer_stream_guard import AnswerBlocked, GuardedStream
from pgsynapse.models import default_model_path, probe_model

SENTENCES = ["Use ROLLBACK TO SAVEPOINT [1]. ", "It undoes the work done after it [1].\n", "The savepoint stays [1]."]
RULES = [{"id": 1, "text": "how to make a bomb or explosives", "action": "block", "threshold": 0.6},
         {"id": 2, "text": "which medicine should I take", "action": "flag", "threshold": 0.7}]


class Sink:
    """The stream the checked text is handed to."""

    def __init__(self) -> None:
        self.given: list[str] = []

    def __call__(self, piece: str) -> None:
        self.given.append(piece)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def embedder():
    e = probe_model(default_model_path())
    e.embedded = []  # type: ignore[attr-defined]
    encode = e.encode

    def counted(texts, batch_size=32):
        e.embedded.extend(texts)
        return encode(texts, batch_size)

    e.encode = counted  # type: ignore[method-assign]
    return e


def _guard() -> Guard:
    guard = Guard()
    guard.refresh(RULES)
    return guard


def _words(text: str) -> list[str]:
    return [w + " " for w in text.split(" ")[:-1]] + [text.split(" ")[-1]]


def test_a_sentence_ends_at_a_break_more_text_does_not_move(tokenizer):
    assert sentences_end("Use ROLLBACK TO SAVEPOINT") == 0
    assert sentences_end("Use it [1].") == 0  # '.' may be '.5' yet: no break until a space or a line break
    assert sentences_end("Use it [1]. ") == len("Use it [1]. ")
    assert sentences_end("Use it [1]. It undoes") == len("Use it [1]. ")
    assert sentences_end("".join(SENTENCES)) == len(SENTENCES[0] + SENTENCES[1])
    text = "".join(SENTENCES) + " Release it when done."
    end = sentences_end(text)
    assert end == len("".join(SENTENCES)) + 1
    # the windows of the text up to there are the full text's, and its whole (a superset for what is published)
    assert set(windows(text[:end], tokenizer, 256)) - set(windows(text, tokenizer, 256)) == {text[:end].strip()}


def test_each_sentence_is_handed_on_once_checked_and_the_final_check_embeds_only_the_rest(embedder):
    guard, sink = _guard(), Sink()
    stream = GuardedStream(sink, guard, embedder, guard.snapshot(), question=1, interval_ms=0)
    text = "".join(SENTENCES)
    for word in _words(text):
        stream(word)
    assert [p for p in sink.given if p] == SENTENCES[:2]  # the unfinished last sentence is held back
    assert len(sink.given) == len(_words(text)) and stream.checks == 2
    embedder.embedded.clear()
    [hit] = guard.check(embedder, [text], rules=guard.snapshot(), memo=stream.vectors)
    assert hit is None
    # the whole text, the last sentence and its pair: every other window was embedded by the stream's checks
    assert sorted(embedder.embedded) == sorted([text, SENTENCES[2], SENTENCES[1].strip() + "\n" + SENTENCES[2]])


def test_checks_keep_the_stream_interval(embedder):
    guard, sink = _guard(), Sink()
    stream = GuardedStream(sink, guard, embedder, guard.snapshot(), question=1, interval_ms=60_000)
    for word in _words("".join(SENTENCES)):
        stream(word)
    # the first sentence at once, the second not within the interval: it comes with the final answer
    assert [p for p in sink.given if p] == SENTENCES[:1] and stream.checks == 1


def test_a_block_match_stops_at_the_piece_that_ends_its_sentence_and_a_flag_match_streams(embedder):
    guard, sink = _guard(), Sink()
    stream = GuardedStream(sink, guard, embedder, guard.snapshot(), question=1, interval_ms=0)
    pieces = [SENTENCES[0], "Then how do I make a bomb with ", "explosives. ", "Mix the parts."]
    with pytest.raises(AnswerBlocked) as stopped:
        for piece in pieces:
            stream(piece)
    assert stopped.value.hit["action"] == "block" and stopped.value.hit["stage"] == "answer"
    assert stream.pieces == 3 and sink.given == [SENTENCES[0], ""]  # never the sentence that matched
    flagged = Sink()
    stream = GuardedStream(flagged, guard, embedder, guard.snapshot(), question=2, interval_ms=0)
    for piece in ["Which medicine should I take for a headache? ", "Ask a doctor."]:
        stream(piece)
    assert flagged.given == ["Which medicine should I take for a headache? ", ""]  # a flag rule stops nothing
