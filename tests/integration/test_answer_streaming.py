"""Streamed answers (issue 18, item 3): partial text on the row with a 'streaming' NOTIFY per write, in order, then
the final NOTIFY; throttled; never over an edited question; citations checked. The generator is a fake
OpenAI-compatible server sending server-sent events (deterministic text). A gated server sends its next piece only
when the test has seen the previous piece's NOTIFY: the test synchronises on NOTIFYs, never on time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest
from structlog.testing import capture_logs

from pgsynapse.answerers.citations import REFUSED_ANSWER
from pgsynapse.client import Client
from pgsynapse.handlers.answer import BLOCKED_ANSWER
from tests.helpers import WorkerProcess, aconn, fast_settings, running_worker, spawn_worker, wait_until
from tests.integration.test_answers import _corpus
from tests.integration.test_guardrails import BOMB, BOMB_RULE
from tests.integration.test_stale_writes import stepped_worker

pytestmark = pytest.mark.anyio

PIECES = ["Use ", "ROLLBACK TO ", "SAVEPOINT ", "[1]."]
SAFETY = 60.0  # seconds: a safety net only


class SSE(BaseHTTPRequestHandler):
    """Answers each chat request with ``scripts.pop(0)`` (the last script again when one is left), streamed when
    asked. While ``gates`` is set, piece k+1 (and the end, after the last) waits for gates[k], set by the test when
    piece k's NOTIFY came."""

    scripts: list[list[str]] = []
    gates: list[threading.Event] | None = None
    requests: list[dict] = []
    finish_reason: str | None = None  # the last event's finish_reason ("length": the endpoint's token limit cut it)
    hung_up = threading.Event()  # the answerer closed the stream before its end
    await_hang_up = False  # after the pieces, wait for the answerer to close the stream (no [DONE])
    # events with no choices, as Azure OpenAI sends first (prompt_filter_results) and OpenAI last (usage)
    bare_events = False
    cut_off = False  # the connection closes after the pieces: no finish_reason, no [DONE]
    # (text, event): a request whose last message holds text is answered only once event is set
    hold: tuple[str, threading.Event] | None = None

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        SSE.requests.append(body)
        if SSE.hold is not None and SSE.hold[0] in body["messages"][-1]["content"]:
            SSE.hold[1].wait(SAFETY)
        pieces = SSE.scripts.pop(0) if len(SSE.scripts) > 1 else SSE.scripts[0]
        gates, SSE.gates = SSE.gates, None  # the first request only
        if not body.get("stream"):
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": "".join(pieces)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            self._stream(pieces, gates)
        except (BrokenPipeError, ConnectionResetError):
            SSE.hung_up.set()

    def _stream(self, pieces: list[str], gates: list[threading.Event] | None) -> None:
        if SSE.bare_events:
            self.wfile.write(b'data: {"choices": [], "prompt_filter_results": [{"prompt_index": 0}]}\n\n')
        for k, piece in enumerate(pieces):
            if gates is not None and k > 0:
                assert gates[k - 1].wait(SAFETY), f"no NOTIFY for piece {k}"
            event = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            if k == len(pieces) - 1 and SSE.finish_reason:
                event["choices"][0]["finish_reason"] = SSE.finish_reason
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        if SSE.await_hang_up:  # its end never comes: an answerer that stops closes the stream, one that does not waits
            self.connection.settimeout(SAFETY)
            if self.rfile.read(1) == b"":
                SSE.hung_up.set()
            return
        if gates is not None:  # the end too waits for the last piece's NOTIFY
            assert gates[len(pieces) - 1].wait(SAFETY), "no NOTIFY for the last piece"
        if SSE.cut_off:
            return
        if SSE.bare_events:
            self.wfile.write(b'data: {"choices": [], "usage": {"total_tokens": 9}}\n\n')
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def sse():
    server = ThreadingHTTPServer(("127.0.0.1", 0), SSE)
    SSE.scripts, SSE.gates, SSE.requests, SSE.finish_reason, SSE.await_hang_up = [PIECES], None, [], None, False
    SSE.bare_events, SSE.cut_off, SSE.hold = False, False, None
    SSE.hung_up.clear()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def _settings(db_url, url, **kw):
    return fast_settings(db_url, answerer="openai", openai_base_url=url, openai_model="tiny", **kw)


async def _notifies_until_final(listener, qid: int, on_stream=None) -> list[dict]:
    seen = []
    with anyio.fail_after(SAFETY):
        async for n in listener.notifies():
            p = json.loads(n.payload)
            if p["id"] != qid:
                continue
            seen.append(p)
            if p["status"] != "streaming":
                return seen
            if on_stream:
                await on_stream(p)
    return seen


async def test_each_piece_is_written_and_notified_in_order_then_the_final_answer(db_url, models, sse):
    SSE.gates = gates = [threading.Event() for _ in PIECES]
    async with running_worker(_settings(db_url, sse, stream_interval_ms=0), models):
        await _corpus(db_url)
        listener, reader = await aconn(db_url), await aconn(db_url)
        await listener.execute("LISTEN pgsynapse_answers")
        rows_seen, pieces, ready = [], [], [0] * len(PIECES)

        def done_with(k: int) -> None:  # the next piece comes once the test read the row and the client its piece
            ready[k] += 1
            if ready[k] == 2:
                gates[k].set()

        async def on_stream(p):
            row = await (await reader.execute("SELECT status, answer FROM pgsynapse.questions WHERE id = %s",
                                              (p["id"],))).fetchone()
            rows_seen.append((row["status"], row["answer"]))
            done_with(p["seq"] - 1)

        def got(piece):
            pieces.append(piece)
            done_with(len(pieces) - 1)

        async with Client(db_url) as client, anyio.create_task_group() as tg:
            qid = 1  # a fresh database: the first question
            tg.start_soon(lambda: client.ask("how do I undo commands back to a savepoint?", on_delta=got))
            notes = await _notifies_until_final(listener, qid, on_stream)
        final = await (await reader.execute("SELECT * FROM pgsynapse.questions WHERE id = %s", (qid,))).fetchone()
    assert [p["status"] for p in notes] == ["streaming"] * len(PIECES) + ["answered"]
    assert [p["seq"] for p in notes[:-1]] == [1, 2, 3, 4]
    assert [p["delta"] for p in notes[:-1]] == PIECES
    assert [p["offset"] for p in notes[:-1]] == [0, 4, 16, 26]
    assert notes[-1] == {"id": qid, "status": "answered"}  # the final NOTIFY as before streaming
    # each NOTIFY came after its partial text was committed, the row still pending
    assert rows_seen == [("pending", "".join(PIECES[:k + 1])) for k in range(len(PIECES))]
    assert pieces == PIECES  # the client's on_delta got each piece once, in order
    assert final["status"] == "answered" and final["answer"] == "Use ROLLBACK TO SAVEPOINT [1]."
    assert [s["rank"] for s in final["sources"]] == [1] and final["sources"][0]["title"] == "Savepoints"
    assert final["flags"] == []


async def test_each_generated_answer_is_committed_and_announced_once_generated_not_with_its_batch(db_url, models,
                                                                                                   sse):
    """A question and its follow-up in one statement: the first's answer is committed and announced while the
    follow-up's generation is still held by the endpoint (not at the end of a batch of both), and the follow-up,
    generated after it, has that answer in its history."""
    follow_up = "and how do I release it?"
    SSE.hold = (follow_up, release := threading.Event())
    try:
        async with running_worker(_settings(db_url, sse, stream_interval_ms=0), models):
            await _corpus(db_url)
            listener = await aconn(db_url)
            await listener.execute("LISTEN pgsynapse_answers")
            first, second = [r["id"] for r in await (await listener.execute(
                "INSERT INTO pgsynapse.questions (session_id, text) VALUES ('alice', 'how do I undo commands back to "
                "a savepoint?'), ('alice', %s) RETURNING id", (follow_up,))).fetchall()]
            notes = await _notifies_until_final(listener, first)
            row = await (await listener.execute("SELECT status, answer FROM pgsynapse.questions WHERE id = %s",
                                                (first,))).fetchone()
            release.set()
            await _notifies_until_final(listener, second)
    finally:
        release.set()
    assert notes[-1] == {"id": first, "status": "answered"}
    assert (row["status"], row["answer"]) == ("answered", "Use ROLLBACK TO SAVEPOINT [1].")
    [asked] = [r for r in SSE.requests if follow_up in r["messages"][-1]["content"]]
    turns = [(m["role"], m["content"]) for m in asked["messages"][1:-1]]
    assert turns == [("user", "how do I undo commands back to a savepoint?"),
                     ("assistant", "Use ROLLBACK TO SAVEPOINT [1].")]


async def test_an_edit_mid_stream_gets_no_partial_text_of_the_old_question(db_url, models, sse):
    SSE.scripts = [PIECES, ["Release it with ", "RELEASE SAVEPOINT [1]."]]
    SSE.gates = gates = [threading.Event() for _ in PIECES]
    async with running_worker(_settings(db_url, sse, stream_interval_ms=0), models):
        await _corpus(db_url)
        listener, writer = await aconn(db_url), await aconn(db_url)
        await listener.execute("LISTEN pgsynapse_answers")
        row = await (await writer.execute("INSERT INTO pgsynapse.questions (text) VALUES "
                                          "('how do I undo commands back to a savepoint?') RETURNING id")).fetchone()
        qid = row["id"]
        answers_seen = []

        async def edit_then_go_on(p):
            answers_seen.append((await (await writer.execute(
                "SELECT answer FROM pgsynapse.questions WHERE id = %s", (qid,))).fetchone())["answer"])
            if len(answers_seen) == 1:
                # mid-stream: the question is edited (committed), then the old stream goes on
                await writer.execute("UPDATE pgsynapse.questions SET text = 'how do I release a savepoint?' "
                                     "WHERE id = %s", (qid,))
                for g in gates:
                    g.set()

        notes = await _notifies_until_final(listener, qid, edit_then_go_on)
        final = await (await writer.execute("SELECT * FROM pgsynapse.questions WHERE id = %s", (qid,))).fetchone()
    streams = [p for p in notes if p["status"] == "streaming"]
    new_answer = "Release it with RELEASE SAVEPOINT [1]."
    # the old question's stream stopped at its first piece: the rest found another text and wrote nothing
    assert (streams[0]["seq"], streams[0]["offset"], streams[0]["delta"]) == (1, 0, "Use ")
    again = streams[1:]  # the new job's own stream (its first write may lose the race with its fast final write)
    assert [p["seq"] for p in again] == list(range(1, len(again) + 1))
    assert new_answer.startswith("".join(p["delta"] for p in again))
    assert all(a is None or new_answer.startswith(a) for a in answers_seen[1:])  # never the old text again
    assert notes[-1] == {"id": qid, "status": "answered"}
    assert final["text"] == "how do I release a savepoint?" and final["answer"] == new_answer
    assert len(SSE.requests) == 2


async def test_deleting_the_question_mid_stream_stops_its_generation(db_url, models, sse):
    """The stream finds its question gone: the generator is stopped at its next piece (not run to its end for
    nobody), and the job is done with nothing written."""
    many = [f"word{k} " for k in range(200)]
    SSE.scripts = [many]
    SSE.gates = gates = [threading.Event() for _ in many]
    SSE.await_hang_up = True  # whether the pieces written reach it before it stops is a race: its close is not
    superseded = threading.Event()

    def watch(logger, name, event):
        if event["event"] == "answer_stream_superseded":
            superseded.set()
        return event

    with capture_logs(processors=[watch]) as logs:
        async with running_worker(_settings(db_url, sse, stream_interval_ms=0), models):
            await _corpus(db_url)
            listener, writer = await aconn(db_url), await aconn(db_url)
            await listener.execute("LISTEN pgsynapse_answers")
            qid = (await (await writer.execute("INSERT INTO pgsynapse.questions (text) VALUES "
                                               "('how do I undo commands back to a savepoint?') RETURNING id")
                          ).fetchone())["id"]
            with anyio.fail_after(SAFETY):
                async for n in listener.notifies():
                    if json.loads(n.payload) == {"id": qid, "status": "streaming", "seq": 1, "offset": 0,
                                                 "delta": "word0 "}:
                        break
            await writer.execute("DELETE FROM pgsynapse.questions WHERE id = %s", (qid,))
            gates[0].set()  # the second piece: its write finds the question gone
            assert await anyio.to_thread.run_sync(superseded.wait, SAFETY)
            for g in gates[1:]:  # the rest may come at once: the generator is stopped at the next piece
                g.set()
            await wait_until(writer, "SELECT bool_and(status = 'done') FROM pgsynapse.jobs WHERE kind = 'answer'",
                             channel="pgsynapse_jobs")
            job = await (await writer.execute("SELECT * FROM pgsynapse.jobs WHERE kind = 'answer'")).fetchone()
    [stopped] = [e for e in logs if e["event"] == "answer_generation_stopped"]
    assert stopped["question"] == qid and stopped["reason"] == "superseded"
    assert stopped["pieces"] == 3  # the third piece, the first after its stream died, stopped it
    assert SSE.hung_up.wait(SAFETY)  # the endpoint saw the request closed: it generates no more
    assert job["ref_id"] == qid and job["last_error"] is None and job["skip_reason"].startswith("superseded")
    assert not [e for e in logs if e["event"] in ("job_retry_scheduled", "batch_failed")]


async def test_writes_are_throttled_and_bad_citations_are_flagged_on_the_row(db_url, models, sse):
    SSE.scripts = [["Use ROLLBACK TO SAVEPOINT [7], ", "see also [2][1]."]]
    SSE.gates = gates = [threading.Event(), threading.Event()]
    SSE.finish_reason = "length"  # and the endpoint's token limit ended it
    async with running_worker(_settings(db_url, sse, answer_top_k=3, stream_interval_ms=60_000), models):
        await _corpus(db_url)
        listener = await aconn(db_url)
        await listener.execute("LISTEN pgsynapse_answers")
        results, pieces = [], []

        def got(piece):  # the client has the first piece: the rest may come at once (the test's own LISTEN seeing
            pieces.append(piece)  # it first let the answer end before the client read the row, one run in many)
            for g in gates:
                g.set()

        async with Client(db_url) as client, anyio.create_task_group() as tg:
            async def ask():
                results.append(await client.ask("how do I undo commands back to a savepoint?", on_delta=got))

            tg.start_soon(ask)
            notes = await _notifies_until_final(listener, 1)  # a fresh database: the first question
        flagged = results[0]
    # throttled: the first write at once, none other within the interval; the final NOTIFY as always
    assert [(p["status"], p.get("seq"), p.get("offset")) for p in notes] == [("streaming", 1, 0), ("answered", None, None)]
    assert notes[0]["delta"] == "Use ROLLBACK TO SAVEPOINT [7], "
    assert flagged.status == "answered" and flagged.answer == "Use ROLLBACK TO SAVEPOINT [7], see also [2][1]."
    assert flagged.flags == ["invalid_citations: [7] cited, passages 1, 2, 3 given",
                             "truncated: the endpoint stopped at answer_max_new_tokens (160, sent as max_tokens) "
                             "or at its model's context length before it had finished"]
    # the client's pieces make up the whole answer: the part that no streaming NOTIFY announced comes last
    assert pieces == ["Use ROLLBACK TO SAVEPOINT [7], ", "see also [2][1]."]
    assert [s["rank"] for s in flagged.sources] == [1, 2]  # the cited passages, in rank order


def _ask_reading_late(client: Client, tg, question: str, final: anyio.Event,
                      after_read=None) -> tuple[list, list]:
    """Starts ``client.ask(question)`` in ``tg`` with a client whose read at the first NOTIFY waits for ``final``
    (a busy client, a short answer); ``after_read`` is called after each of its reads. Returns the list its Result
    goes to and the list of the pieces given to its ``on_delta``."""
    results: list = []
    pieces: list[str] = []
    read, reads = client._read, []

    async def late(qid, **kw):
        reads.append(qid)
        if len(reads) == 2:  # the first is the ask's own, before any NOTIFY
            await final.wait()
        row = await read(qid, **kw)
        if after_read:
            after_read()
        return row

    client._read = late  # type: ignore[method-assign]

    async def ask():
        results.append(await client.ask(question, on_delta=pieces.append))

    tg.start_soon(ask)
    return results, pieces


async def test_a_streamed_answer_the_client_reads_only_once_it_is_final_still_reaches_on_delta(db_url, models, sse):
    """A Client that reads the row at the first `streaming` NOTIFY only once the answer is final (a busy client, or
    a short answer) yielded no piece at all: the row was no longer pending and nothing had been yielded, so it took
    the answer for one that was never streamed. An application showing the pieces showed nothing. It was streamed
    (a `streaming` NOTIFY came): the pieces give the whole answer, here in one."""
    SSE.scripts = [["Use ROLLBACK TO SAVEPOINT [1], ", "then go on [1]."]]
    SSE.gates = gates = [threading.Event(), threading.Event()]
    async with running_worker(_settings(db_url, sse, answer_top_k=3, stream_interval_ms=60_000), models):
        await _corpus(db_url)
        listener = await aconn(db_url)
        await listener.execute("LISTEN pgsynapse_answers")
        final = anyio.Event()

        async def go_on(p):
            for g in gates:
                g.set()

        async with Client(db_url) as client, anyio.create_task_group() as tg:
            results, pieces = _ask_reading_late(client, tg, "how do I undo commands back to a savepoint?", final)
            notes = await _notifies_until_final(listener, 1, go_on)
            final.set()
    assert [p["status"] for p in notes] == ["streaming", "answered"]
    assert results[0].answer == "Use ROLLBACK TO SAVEPOINT [1], then go on [1]."
    assert pieces == [results[0].answer]


@pytest.mark.parametrize("case", ["blocked", "refused"])
async def test_a_final_answer_that_replaces_the_stream_is_no_piece_when_first_read_final(db_url, models, sse, case):
    """A Client that read a streamed answer only once it was final yielded the whole final answer as a piece: the
    blocked message (a block rule matched a sentence not yet streamed) or the refused one (citations refused) went
    to ``on_delta`` as if it were generated text, and `pgsynapse ask` printed it as streamed. Such a final answer
    replaces what streamed: it is in the Result only."""
    if case == "blocked":
        SSE.scripts = [[CHECKED[0], f"Then {BOMB}. ", "Mix the parts [1]."]]
        conn = await aconn(db_url)
        await conn.execute(BOMB_RULE)
        await conn.close()
    else:
        SSE.scripts = [["It is [9], ", "really [9]."]]
    SSE.gates = gates = [threading.Event() for _ in SSE.scripts[0]]
    question = "how do I undo commands back to a savepoint?"
    first_read = threading.Event()
    SSE.hold = (question, first_read)  # the endpoint answers once the client has read the row, still pending
    settings = _settings(db_url, sse, stream_interval_ms=0, citation_policy="refuse")
    try:
        async with running_worker(settings, models):
            await _corpus(db_url)
            listener = await aconn(db_url)
            await listener.execute("LISTEN pgsynapse_answers")
            final = anyio.Event()

            async def go_on(p):
                for g in gates:
                    g.set()

            async with Client(db_url) as client, anyio.create_task_group() as tg:
                results, pieces = _ask_reading_late(client, tg, question, final, after_read=first_read.set)
                notes = await _notifies_until_final(listener, 1, go_on)  # a fresh database: the first question
                final.set()
            await listener.close()
    finally:
        for g in [*gates, first_read]:  # the endpoint's thread goes on (to a closed connection)
            g.set()
    assert [p["status"] for p in notes][0] == "streaming", notes
    assert results[0].status == ("blocked" if case == "blocked" else "answered")
    assert results[0].answer == (BLOCKED_ANSWER if case == "blocked" else REFUSED_ANSWER)
    assert pieces == []  # the final answer replaced what streamed: no piece of it


async def test_events_without_choices_are_skipped(db_url, models, sse):
    """Azure OpenAI sends a first event with no choices (its prompt filter's results), OpenAI a last one (usage):
    they carry no text and fail nothing."""
    SSE.bare_events = True
    async with running_worker(_settings(db_url, sse, stream_interval_ms=0), models):
        await _corpus(db_url)
        async with Client(db_url) as client:
            ok = await client.ask("how do I undo commands back to a savepoint?")
    assert ok.status == "answered" and ok.answer == "".join(PIECES), ok.error
    assert SSE.requests[0]["stream"] is True  # streamed, its events read one by one


async def test_a_stream_cut_off_fails_without_its_partial_text(db_url, models, sse):
    """A stream that ends with neither a finish_reason nor [DONE] was cut off: its text is not the answer. The job
    fails (max_attempts = 1 here) and the partial text already streamed into the row goes with it."""
    SSE.cut_off = True
    SSE.gates = gates = [threading.Event() for _ in PIECES]
    async with running_worker(_settings(db_url, sse, stream_interval_ms=0, max_attempts=1), models):
        await _corpus(db_url)
        listener = await aconn(db_url)
        await listener.execute("LISTEN pgsynapse_answers")

        async def go_on(p):  # each piece was written before the next is sent: all of them, before the cut
            gates[p["seq"] - 1].set()

        async with Client(db_url) as client, anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.ask("how do I undo commands back to a savepoint?"))
            notes = await _notifies_until_final(listener, 1, go_on)  # a fresh database: the first question
        row = await (await listener.execute("SELECT * FROM pgsynapse.questions WHERE id = 1")).fetchone()
    assert [p["status"] for p in notes] == ["streaming"] * len(PIECES) + ["failed"]
    assert row["status"] == "failed" and row["answer"] is None, (row["status"], row["answer"])
    assert "answer endpoint's stream ended before its end ([DONE])" in row["error"], row["error"]


async def test_a_stream_cut_off_and_retried_withdraws_its_partial_text_until_the_retry(db_url, models, sse):
    """A stream cut off with attempts left is retried after its backoff (minutes at the later attempts): the partial
    text stayed on the row, still pending, as if the rest were coming. It is cleared when the retry is scheduled,
    with a `retrying` NOTIFY, so that whoever shows the pieces drops them."""
    SSE.cut_off = True
    SSE.gates = gates = [threading.Event() for _ in PIECES]
    settings = _settings(db_url, sse, stream_interval_ms=0, max_attempts=2, retry_backoff_seconds=3600,
                         retry_backoff_max_seconds=3600)  # the retry comes in an hour
    async with running_worker(settings, models):
        await _corpus(db_url)
        listener, conn = await aconn(db_url), await aconn(db_url)
        await listener.execute("LISTEN pgsynapse_answers")
        await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('how do I undo commands back to a savepoint?')")
        streamed = []
        with anyio.fail_after(SAFETY):
            async for n in listener.notifies():  # each piece written before the next is sent: all, before the cut
                streamed.append(p := json.loads(n.payload))
                gates[p["seq"] - 1].set()
                if len(streamed) == len(PIECES):
                    break
        await wait_until(conn, "SELECT status = 'pending' AND attempts = 1 FROM pgsynapse.jobs WHERE kind = 'answer'")
        row = await (await conn.execute("SELECT status, answer FROM pgsynapse.questions")).fetchone()
        assert (row["status"], row["answer"]) == ("pending", None), row
        # committed with the retry: that NOTIFY came before the job was seen pending
        with anyio.fail_after(SAFETY):
            retrying = [json.loads(n.payload) async for n in listener.notifies(stop_after=1)]
    await listener.close()
    await conn.close()
    assert [p["status"] for p in streamed] == ["streaming"] * len(PIECES)
    assert retrying == [{"id": streamed[0]["id"], "status": "retrying"}], retrying


async def test_refuse_policy_withholds_an_answer_with_bad_citations(db_url, models, sse):
    SSE.scripts = [["It is [9]."]]
    async with running_worker(_settings(db_url, sse, citation_policy="refuse", stream_answers=False), models):
        await _corpus(db_url)
        pieces: list[str] = []
        async with Client(db_url) as client:
            refused = await client.ask("how do I undo commands back to a savepoint?", on_delta=pieces.append)
    assert refused.status == "answered" and refused.answer == REFUSED_ANSWER and refused.sources == []
    assert pieces == []  # nothing streamed: the answer arrives whole, in the Result only
    assert refused.flags[0].startswith("invalid_citations: [9] cited") and refused.flags[1] == "refused"
    assert SSE.requests[0].get("stream") is None  # stream_answers = false: a plain request


async def test_an_edit_committed_after_the_load_stops_the_old_stream_and_the_new_text_is_answered(db_url, models, sse):
    """The application's transaction edits a question whose job is pending (its trigger queues nothing: the pending
    job will read the row), and commits after the worker claimed and loaded the job: the old text's stream stops at
    its first write, and the new text still gets its job."""
    SSE.scripts = [PIECES, ["Release it with ", "RELEASE SAVEPOINT [1]."]]
    settings = _settings(db_url, sse, stream_interval_ms=0)
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await _corpus(db_url)
    conn = await aconn(db_url)
    qid = (await (await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES "
                                     "('how do I undo commands back to a savepoint?') RETURNING id")).fetchone())["id"]
    async with stepped_worker(settings, models) as worker, await aconn(db_url) as app:
        handler = worker.handlers["answer"]
        await app.set_autocommit(False)
        await app.execute("UPDATE pgsynapse.questions SET text = 'how do I release a savepoint?' WHERE id = %s", (qid,))
        [job] = await worker.claim("answer", 10)
        async with worker.pool.connection() as c:
            work, _ = await handler.load(c, [job])
        await app.commit()
        SSE.gates = gates = [threading.Event() for _ in PIECES]

        def go_on(logger, name, event):  # the first piece's write found the text changed: the rest may come
            if event["event"] == "answer_stream_superseded":
                for g in gates:
                    g.set()
            return event

        with capture_logs(processors=[go_on]) as logs:
            outcomes = await anyio.to_thread.run_sync(handler.compute, work)
        assert [e["reason"] for e in logs if e["event"] == "answer_generation_stopped"] == ["superseded"]
        await worker.writer.write("answer", handler, outcomes)
    jobs = await (await conn.execute("SELECT status FROM pgsynapse.jobs WHERE kind = 'answer' ORDER BY id")).fetchall()
    assert [j["status"] for j in jobs] == ["done", "pending"]
    async with running_worker(settings, models):
        await wait_until(conn, "SELECT status = 'answered' FROM pgsynapse.questions WHERE id = %s", (qid,),
                         channel="pgsynapse_answers")
    final = await (await conn.execute("SELECT text, answer FROM pgsynapse.questions WHERE id = %s", (qid,))).fetchone()
    await conn.close()
    assert final == {"text": "how do I release a savepoint?", "answer": "Release it with RELEASE SAVEPOINT [1]."}


# each piece ends a sentence but the last: with a block rule, a sentence is published once its windows are checked
CHECKED = ["Use ROLLBACK TO SAVEPOINT [1]. ", "It undoes the work done after the savepoint [1]. ",
           "The savepoint itself stays [1]."]


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


RETRIED = ["Roll back to the savepoint [1]. ", "Its later work is undone [1]."]  # the next worker's answer


async def test_a_worker_killed_mid_stream_leaves_no_final_answer_and_the_next_answers_once_to_every_waiter(db_url,
                                                                                                           sse):
    """SIGKILL while a block rule's checked sentences stream (after the first `streaming` NOTIFY, before the final
    one): the row stays pending, its partial text no answer; the next worker answers it once, and both an asker
    (`pgsynapse ask`) and a Client that began waiting mid-stream get the final answer, not the partial one."""
    SSE.scripts = [CHECKED, RETRIED]
    SSE.gates = gates = [threading.Event() for _ in CHECKED]  # the first stream: piece 2 waits, the kill comes first
    conn = await aconn(db_url)
    await conn.execute(BOMB_RULE)
    env = {"PGSYNAPSE_ANSWERER": "openai", "PGSYNAPSE_OPENAI_BASE_URL": sse, "PGSYNAPSE_OPENAI_MODEL": "tiny",
           "PGSYNAPSE_STREAM_INTERVAL_MS": "0", "PGSYNAPSE_LEASE_SECONDS": "2"}
    worker = spawn_worker(db_url, env=env)
    asker = None
    try:
        await _corpus(db_url)
        listener = await aconn(db_url)
        await listener.execute("LISTEN pgsynapse_answers")
        asker = subprocess.Popen([sys.executable, "-m", "pgsynapse", "--database-url", db_url, "ask",
                                  "how do I undo commands back to a savepoint?"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"})
        with anyio.fail_after(SAFETY):
            first = json.loads((await anext(listener.notifies())).payload)
        assert first == {"id": 1, "status": "streaming", "seq": 1, "offset": 0, "delta": CHECKED[0]}, first
        results = []
        async with Client(db_url) as client, anyio.create_task_group() as tg:
            async def wait_for_it():
                results.append(await client.result(1, timeout=SAFETY))

            tg.start_soon(wait_for_it)
            worker.proc.send_signal(signal.SIGKILL)
            assert worker.proc.wait(30) == -signal.SIGKILL
            for g in gates:  # the endpoint's request of the dead worker ends
                g.set()
            row = await (await conn.execute("SELECT status, answer, answered_at FROM pgsynapse.questions")).fetchone()
            assert row["status"] == "pending" and row["answered_at"] is None, row
            worker = spawn_worker(db_url, env=env)
            notes = [first, *await _notifies_until_final(listener, 1)]
        out, err = asker.communicate(timeout=SAFETY)
        final = await (await conn.execute("SELECT * FROM pgsynapse.questions WHERE id = 1")).fetchone()
        jobs = await (await conn.execute("SELECT status, completions FROM pgsynapse.jobs WHERE kind = 'answer'")
                      ).fetchall()
    finally:
        worker.stop()
        if asker is not None and asker.poll() is None:
            asker.kill()
        await conn.close()
    assert final["status"] == "answered" and final["answer"] == "".join(RETRIED), final
    assert [n["status"] for n in notes].count("answered") == 1 and notes[-1]["status"] == "answered", notes
    assert sum(j["completions"] for j in jobs) == 1 and {j["status"] for j in jobs} <= {"done", "superseded"}, jobs
    assert [(r.status, r.answer) for r in results] == [("answered", "".join(RETRIED))], results
    assert asker.returncode == 0, err
    # the asker printed the first stream's sentence, then the final answer as one that replaces it
    assert out.startswith(CHECKED[0].strip()) and f"--- final answer ---\n{''.join(RETRIED).strip()}\n" in out, out


async def test_sigterm_mid_stream_finishes_the_answer_then_the_worker_ends_at_once_with_nothing_leased(db_url, sse):
    """SIGTERM while an answer streams (docs/reliability.md, "SIGTERM drains"): the generation goes on to its end,
    the final answer is written and announced, no job stays leased, and the process then ends at once, exit 0
    (exiting.py's fast exit: no thread of the stream left to wait for)."""
    SSE.gates = gates = [threading.Event() for _ in PIECES]
    env = {"PGSYNAPSE_ANSWERER": "openai", "PGSYNAPSE_OPENAI_BASE_URL": sse, "PGSYNAPSE_OPENAI_MODEL": "tiny",
           "PGSYNAPSE_STREAM_INTERVAL_MS": "0"}
    worker = spawn_worker(db_url, env=env)
    conn = await aconn(db_url)
    try:
        await _corpus(db_url)
        await conn.execute("LISTEN pgsynapse_answers")
        await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('how do I undo commands back to a savepoint?')")
        with anyio.fail_after(SAFETY):
            first = json.loads((await anext(conn.notifies())).payload)
        assert first["status"] == "streaming" and first["seq"] == 1, first
        worker.proc.send_signal(signal.SIGTERM)
        worker.wait_event("signal_received")
        for g in gates:  # the rest of the answer comes only now, after the SIGTERM
            g.set()
        assert worker.proc.wait(SAFETY) == 0, worker.tail()
        row = await (await conn.execute("SELECT status, answer FROM pgsynapse.questions")).fetchone()
        jobs = await (await conn.execute("SELECT status, count(*) AS n FROM pgsynapse.jobs GROUP BY status")).fetchall()
    finally:
        worker.stop()
        await conn.close()
    assert (row["status"], row["answer"]) == ("answered", "".join(PIECES)), row
    assert {j["status"]: j["n"] for j in jobs}.keys() == {"done"}, jobs
    exiting = worker.wait_event("process_exiting")
    assert (exiting["code"], exiting["fast"]) == (0, True), exiting


def _ctrl_c_as_on_a_terminal() -> None:
    """A command started from a terminal takes SIGINT; one of a shell's background jobs (a test run started with
    `&`, as CI scripts may) inherits it ignored, and Python keeps it ignored: Ctrl-C reaches the asker as it would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_ctrl_c_on_ask_stops_its_own_workers_generation_and_puts_the_question_back_at_once(db_url, models, sse,
                                                                                                stop, code):
    """`pgsynapse ask` with no worker running answers with a worker of its own. Ctrl-C while that worker generated
    did nothing: the answer went on streaming to the terminal to its end (a second Ctrl-C too), and only then did
    the command end. Now the generation stops at its next piece, the job goes back to the queue at once (its attempt
    not charged, its partial text withdrawn with a `retrying` NOTIFY) for the next worker, and the command exits 130.
    SIGTERM ended the command at once, the job left leased to a worker gone: it now stops as Ctrl-C does, exit 143."""
    SSE.gates = gates = [threading.Event() for _ in PIECES]  # each piece after the first waits for the test
    async with running_worker(fast_settings(db_url, kinds=("embed",)), models):
        await _corpus(db_url)
    conn = await aconn(db_url)
    await conn.execute("LISTEN pgsynapse_answers")
    env = {**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"}, "PGSYNAPSE_ANSWERER": "openai",
           "PGSYNAPSE_OPENAI_BASE_URL": sse, "PGSYNAPSE_OPENAI_MODEL": "tiny", "PGSYNAPSE_STREAM_INTERVAL_MS": "0",
           "PGSYNAPSE_LOG_LEVEL": "info"}
    asker = subprocess.Popen([sys.executable, "-m", "pgsynapse", "--database-url", db_url, "--log-format", "json",
                              "ask", "how do I undo commands back to a savepoint?"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=_ctrl_c_as_on_a_terminal)
    logs = WorkerProcess(asker)
    threading.Thread(target=logs._pump, daemon=True).start()
    try:
        with anyio.fail_after(SAFETY):
            first = json.loads((await anext(conn.notifies())).payload)
        assert first["status"] == "streaming", first
        asker.send_signal(stop)
        logs.wait_event("worker_stopping")
        gates[0].set()  # the endpoint's next piece, once the stop was asked
        try:  # at that piece; before, it waited for the whole answer
            asker.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`pgsynapse ask` still generates 30 s after its Ctrl-C: {logs.tail()}")
        with anyio.fail_after(SAFETY):
            after = json.loads((await anext(conn.notifies())).payload)
        row = await (await conn.execute("SELECT status, answer FROM pgsynapse.questions")).fetchone()
        [job] = await (await conn.execute("SELECT status, attempts, lease_until FROM pgsynapse.jobs"
                                          " WHERE kind = 'answer'")).fetchall()
    finally:
        for g in gates:
            g.set()
        asker.kill()
        await conn.close()
    assert asker.returncode == code, logs.tail()
    assert after == {"id": first["id"], "status": "retrying"}, after
    assert (row["status"], row["answer"]) == ("pending", None), row
    assert job == {"status": "pending", "attempts": 0, "lease_until": None}, job
