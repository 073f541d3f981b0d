"""A streamed answer under a block rule (handlers/answer_stream_guard.py), with the real model and no database:
only checked text reaches the stream, a sentence at a time, throttled, and the final check embeds only what the
stream's checks did not."""

from __future__ import annotations

import pytest

from pgsynapse.guardrails import Guard, sentences_end, windows
from pgsynapse.handlers.answer_stream_guard import HOLD_CHARS, AnswerBlocked, GuardedStream
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
    # the windows of the text up to there, its whole left out, are all the full text's: the stream's checks are the
    # final check's, on the same vectors
    assert set(windows(text[:end], tokenizer, 256, part=True)) < set(windows(text, tokenizer, 256))
    assert set(windows(text[:end], tokenizer, 256)) - set(windows(text, tokenizer, 256)) == {text[:end].strip()}


def test_cjk_full_stops_end_a_sentence_once_the_next_one_starts():
    assert sentences_end("使用回滚命令。") == 0  # a closing quote may follow yet: no break at the end of the text
    assert sentences_end("使用回滚命令。它撤销") == len("使用回滚命令。")
    assert sentences_end("他说「好。」") == 0
    assert sentences_end("他说「好。」然后") == len("他说「好。」")
    assert sentences_end("真的吗？是的！好") == len("真的吗？是的！")
    assert sentences_end("保存点。\n它") == len("保存点。\n")


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


CJK = ["使用 ROLLBACK TO SAVEPOINT 回滚 [1]。", "它撤销保存点之后的工作 [1]。", "保存点本身保留 [1]。"]
# one run-on sentence: no '. ! ? ; :' and no line break before its end
RUN_ON = " ".join(f"step {i} rolls the work back to the savepoint and keeps the rows written before it"
                  for i in range(12)) + " [1]."


def test_a_text_with_cjk_full_stops_streams_a_sentence_at_a_time(embedder):
    """A text whose sentences end with 。！？ and no space was held whole to the final write under a block rule."""
    guard, sink = _guard(), Sink()
    stream = GuardedStream(sink, guard, embedder, guard.snapshot(), question=1, interval_ms=0)
    for piece in CJK:
        stream(piece)
    assert sink.given == ["", CJK[0], CJK[1]]  # each sentence once the next starts; the last with the final write


@pytest.mark.parametrize("text,piece", [(RUN_ON, None), ("保存点" * 250, 40)], ids=["run-on", "no-spaces"])
def test_unfinished_text_is_held_no_longer_than_the_hold(embedder, text, piece):
    """A long sentence with no break (a run-on clause, a script written without spaces) was held whole to the final
    write: once the text after what was published passes HOLD_CHARS it is checked and published, up to its last
    whitespace where it has one."""
    guard, sink = _guard(), Sink()
    stream = GuardedStream(sink, guard, embedder, guard.snapshot(), question=1, interval_ms=0)
    pieces = _words(text) if piece is None else [text[k:k + piece] for k in range(0, len(text), piece)]
    for p in pieces:
        stream(p)
        assert len(stream.text) - stream.published <= HOLD_CHARS + len(p), "held past the hold"
    given = [p for p in sink.given if p]
    assert len(given) >= 2 and text.startswith("".join(given)) and len("".join(given)) > len(text) - HOLD_CHARS - 40
    assert all(len(p) > HOLD_CHARS for p in given)  # in runs of about HOLD_CHARS, not a check per piece
    if piece is None:
        assert all(p.endswith(" ") for p in given)  # never part of a word
    [hit] = guard.check(embedder, [text], rules=guard.snapshot(), memo=stream.vectors)
    assert hit is None


def test_a_stream_blocks_only_what_the_final_check_blocks(embedder):
    """The stream's checks embedded the text so far as one more window than the final check makes: a block rule
    close to the first sentences together stopped the answer, which the final check, on the whole answer, passed.
    The stream now checks the final check's windows only (where a sentence ended), on the same vectors."""
    first = "".join(SENTENCES[:2]) + "The savepoint itself stays [1]. "
    text = first + "Release it when done, and COMMIT makes the rest of the transaction permanent for everyone [2]."
    probe = Guard()
    probe.refresh([{"id": 3, "text": first.strip(), "action": "block", "threshold": 0.0}])
    whole = probe.similarities(embedder, first)[0][1]  # the sentences together: the rule itself
    final = probe.similarities(embedder, text)[0][1]  # its windows: each sentence, each pair, the whole answer
    assert final < whole - 0.02, (final, whole)
    guard = Guard()
    guard.refresh([{"id": 3, "text": first.strip(), "action": "block", "threshold": round((final + whole) / 2, 4)}])
    sink = Sink()
    stream = GuardedStream(sink, guard, embedder, guard.snapshot(), question=1, interval_ms=0)
    for word in _words(text):
        stream(word)  # raised AnswerBlocked at the third sentence's end
    assert "".join(sink.given) == first
    [hit] = guard.check(embedder, [text], rules=guard.snapshot(), memo=stream.vectors)
    assert hit is None
