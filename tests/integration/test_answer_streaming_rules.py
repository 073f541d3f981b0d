"""Streamed answers under guardrail rules (split from tests/integration/test_answer_streaming.py): with a block rule a
sentence is published once its windows are checked, one the rule matches never; a flag rule alone streams each
piece as it comes. The fake endpoint (tests/sse_answers.py) sends its next piece once the test has seen the last."""

from __future__ import annotations

import threading

import anyio
import pytest
from structlog.testing import capture_logs

from pgsynapse.client import Client
from pgsynapse.handlers.answer import BLOCKED_ANSWER
from tests.helpers import aconn, running_worker
from tests.integration.test_answers import _corpus
from tests.integration.test_guardrails import BOMB, BOMB_RULE
from tests.sse_answers import CHECKED, PIECES, SSE, _notifies_until_final, _settings, sse_server

pytestmark = pytest.mark.anyio

sse = pytest.fixture(sse_server, name="sse")


def _gated_by_reads(gates: list[threading.Event], readers: int = 2):
    """``done(k, last)``: one reader (the test, the client) is done with streamed piece k; the endpoint's next
    piece goes once both are, and after piece ``last`` all the rest (held back: it comes with the final answer)."""
    ready = [0] * len(gates)

    def done(k: int, last: int | None) -> None:
        ready[k] += 1
        if ready[k] == readers:
            for g in gates[k:] if k == last else gates[k:k + 1]:
                g.set()

    return done


async def test_with_a_block_rule_an_answer_streams_each_sentence_once_checked(db_url, models, sse):
    """A streamed answer reached the app piece by piece before its guardrail check: while a block rule was enabled
    answers were not streamed at all. Each sentence is now checked when it ends, and published once checked: the
    app gets the answer sentence by sentence (the last, unfinished one, in the final write)."""
    SSE.scripts = [CHECKED]
    SSE.gates = gates = [threading.Event() for _ in CHECKED]
    conn = await aconn(db_url)
    await conn.execute(BOMB_RULE)
    async with running_worker(_settings(db_url, sse, stream_interval_ms=0), models):
        await _corpus(db_url)
        listener, reader = await aconn(db_url), await aconn(db_url)
        await listener.execute("LISTEN pgsynapse_answers")
        rows_seen, pieces, results = [], [], []
        done = _gated_by_reads(gates)

        async def on_stream(p):
            row = await (await reader.execute("SELECT status, answer FROM pgsynapse.questions WHERE id = %s",
                                              (p["id"],))).fetchone()
            rows_seen.append((row["status"], row["answer"]))
            done(p["seq"] - 1, 1)

        def got(piece):
            pieces.append(piece)
            if len(pieces) <= 2:
                done(len(pieces) - 1, 1)

        async with Client(db_url) as client, anyio.create_task_group() as tg:
            async def ask():
                results.append(await client.ask("how do I undo commands back to a savepoint?", on_delta=got))

            tg.start_soon(ask)
            notes = await _notifies_until_final(listener, 1, on_stream)  # a fresh database: the first question
    await conn.close()
    assert [p["status"] for p in notes] == ["streaming", "streaming", "answered"], notes
    assert [(p["seq"], p["offset"], p["delta"]) for p in notes[:-1]] == [(1, 0, CHECKED[0]),
                                                                         (2, len(CHECKED[0]), CHECKED[1])]
    assert rows_seen == [("pending", CHECKED[0]), ("pending", CHECKED[0] + CHECKED[1])]
    assert results[0].status == "answered" and results[0].answer == "".join(CHECKED)
    assert results[0].guardrail is None
    assert pieces == CHECKED  # the unfinished last sentence came with the final answer
    assert SSE.requests[0]["stream"] is True


async def test_a_sentence_a_block_rule_matches_mid_stream_is_never_published_and_blocks_the_answer(db_url, models,
                                                                                                  sse):
    """A streamed answer reached the app piece by piece before its guardrail check, which needs the whole answer:
    an answer a block rule stops was read in full, then replaced by the blocked message. The sentence that matches
    is now checked before it is published: no partial text holds it, its generation stops there, and the question
    ends blocked as the final check blocks it (the sentences published before it replaced by the blocked answer)."""
    SSE.scripts = [[CHECKED[0], f"Then {BOMB}. ", "Mix the parts [1]."]]
    SSE.gates = gates = [threading.Event() for _ in range(3)]
    conn = await aconn(db_url)
    await conn.execute(BOMB_RULE)
    with capture_logs() as logs:
        async with running_worker(_settings(db_url, sse, stream_interval_ms=0), models):
            await _corpus(db_url)
            listener, reader = await aconn(db_url), await aconn(db_url)
            await listener.execute("LISTEN pgsynapse_answers")
            rows_seen, pieces, results = [], [], []
            done = _gated_by_reads(gates)

            async def on_stream(p):
                row = await (await reader.execute("SELECT status, answer FROM pgsynapse.questions WHERE id = %s",
                                                  (p["id"],))).fetchone()
                rows_seen.append((row["status"], row["answer"]))
                done(p["seq"] - 1, None)

            def got(piece):
                pieces.append(piece)
                done(0, None)

            try:
                async with Client(db_url) as client, anyio.create_task_group() as tg:
                    async def ask():
                        results.append(await client.ask("how do I undo commands back to a savepoint?",
                                                        on_delta=got))

                    tg.start_soon(ask)
                    notes = await _notifies_until_final(listener, 1, on_stream)  # a fresh database: the first one
                final = await (await reader.execute("SELECT * FROM pgsynapse.questions WHERE id = 1")).fetchone()
            finally:
                for g in gates:  # the endpoint's thread goes on (to a closed connection)
                    g.set()
    await conn.close()
    assert [p["status"] for p in notes] == ["streaming", "blocked"], notes
    assert notes[0]["delta"] == CHECKED[0] and rows_seen == [("pending", CHECKED[0])]
    assert not any("bomb" in (text or "") for _, text in rows_seen) and "bomb" not in notes[0]["delta"]
    assert pieces == [CHECKED[0]]  # the client's pieces: the checked sentence only
    assert results[0].status == "blocked" and results[0].guardrail["stage"] == "answer"
    assert results[0].guardrail["rule"] == "how to make a bomb or explosives"
    assert (final["status"], final["answer"], final["answerer"]) == ("blocked", BLOCKED_ANSWER, "guardrail")
    assert final["guardrail"] == results[0].guardrail
    [stopped] = [e for e in logs if e["event"] == "answer_generation_stopped"]
    assert (stopped["reason"], stopped["pieces"]) == ("blocked", 2)  # at the piece that ended the sentence


# sentences ending with a CJK full stop and no space; one run-on sentence whose third piece passes the hold (300
# characters): under a block rule both were held whole to the final write
CJK = ["使用 ROLLBACK TO SAVEPOINT 回滚 [1]。", "它撤销保存点之后的工作 [1]。", "保存点本身保留 [1]。"]
RUN_ON = ["the savepoint keeps the rows written before it, and the work done after it is rolled back in this transaction "
          ] * 3 + ["until it is released [1]."]


@pytest.mark.parametrize("script,published", [(CJK, 2), (RUN_ON, 3)], ids=["cjk", "run-on"])
async def test_with_a_block_rule_text_without_a_sentence_break_streams_before_the_final_answer(db_url, models, sse,
                                                                                              script, published):
    SSE.scripts = [script]
    wanted = "".join(script[:published])  # streamed: the rest comes with the final write
    done = threading.Event()
    SSE.gates = [*(threading.Event() for _ in script[:-1]), done]  # the end waits for the streamed text's NOTIFY
    for g in SSE.gates[:-1]:
        g.set()
    conn = await aconn(db_url)
    await conn.execute(BOMB_RULE)
    try:
        async with running_worker(_settings(db_url, sse, stream_interval_ms=0), models):
            await _corpus(db_url)
            await conn.execute("LISTEN pgsynapse_answers")
            await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('how do I undo commands back to a savepoint?')")

            async def on_stream(p):
                if p["offset"] + len(p["delta"]) == len(wanted):
                    done.set()

            notes = await _notifies_until_final(conn, 1, on_stream)  # a fresh database: the first question
            final = await (await conn.execute("SELECT * FROM pgsynapse.questions WHERE id = 1")).fetchone()
    finally:
        done.set()  # the endpoint's thread goes on
    await conn.close()
    assert [p["status"] for p in notes][-1] == "answered" and len(notes) >= 2, notes
    assert "".join(p["delta"] for p in notes[:-1]) == wanted
    assert (final["status"], final["answer"], final["guardrail"]) == ("answered", "".join(script), None)


async def test_a_last_sentence_a_block_rule_matches_ends_blocked_replacing_what_streamed(db_url, models, sse):
    """The stream's checks pass what the final check may block: the unfinished last sentence (and the whole answer
    as one window) only the final check sees. The answer then ends blocked, its final NOTIFY replacing the
    sentences streamed; the client's pieces are those sentences, its Result the blocked answer."""
    SSE.scripts = [[CHECKED[0], f"Then {BOMB}."]]
    SSE.gates = gates = [threading.Event(), threading.Event()]
    gates[1].set()
    conn = await aconn(db_url)
    await conn.execute(BOMB_RULE)
    with capture_logs() as logs:
        try:
            async with running_worker(_settings(db_url, sse, stream_interval_ms=0), models):
                await _corpus(db_url)
                listener = await aconn(db_url)
                await listener.execute("LISTEN pgsynapse_answers")
                results, pieces = [], []

                async def on_stream(p):
                    gates[0].set()

                async with Client(db_url) as client, anyio.create_task_group() as tg:
                    async def ask():
                        results.append(await client.ask("how do I undo commands back to a savepoint?",
                                                        on_delta=pieces.append))

                    tg.start_soon(ask)
                    notes = await _notifies_until_final(listener, 1, on_stream)  # a fresh database: the first one
                final = await (await conn.execute("SELECT * FROM pgsynapse.questions WHERE id = 1")).fetchone()
                await listener.close()
        finally:
            gates[0].set()
    await conn.close()
    assert [(p["status"], p.get("delta")) for p in notes] == [("streaming", CHECKED[0]), ("blocked", None)], notes
    assert (final["status"], final["answer"], final["answerer"]) == ("blocked", BLOCKED_ANSWER, "guardrail")
    assert final["guardrail"]["stage"] == "answer" and final["guardrail"]["action"] == "block"
    assert results[0].status == "blocked" and results[0].answer == BLOCKED_ANSWER
    assert pieces == [CHECKED[0]]  # what streamed; the blocked answer is the Result's only
    assert not [e for e in logs if e["event"] == "answer_generation_stopped"]  # the stream passed it: the final check


async def test_a_flag_rule_alone_streams_each_piece_as_it_comes(db_url, models, sse):
    """Flag rules hide nothing: with no block rule enabled the pieces are written as they come, not held to the end
    of their sentence, and the flag is recorded by the final check."""
    SSE.gates = gates = [threading.Event() for _ in PIECES]
    conn = await aconn(db_url)
    await conn.execute("INSERT INTO pgsynapse.guardrail_rules (text, action, threshold) "
                       "VALUES ('undo commands back to a savepoint', 'flag', 0.5)")
    async with running_worker(_settings(db_url, sse, stream_interval_ms=0), models):
        await _corpus(db_url)
        await conn.execute("LISTEN pgsynapse_answers")
        await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('how do I undo commands back to a savepoint?')")

        async def go_on(p):
            gates[p["seq"] - 1].set()

        notes = await _notifies_until_final(conn, 1, go_on)  # a fresh database: the first question
        final = await (await conn.execute("SELECT * FROM pgsynapse.questions WHERE id = 1")).fetchone()
    await conn.close()
    assert [p.get("delta") for p in notes] == [*PIECES, None] and notes[-1]["status"] == "answered"
    assert final["answer"] == "".join(PIECES) and final["guardrail"]["action"] == "flag"
