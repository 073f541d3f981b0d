"""The fake OpenAI-compatible endpoint of the streamed-answer tests (tests/integration/test_answer_streaming*.py):
it sends server-sent events of deterministic text, gated by the test's NOTIFYs when asked."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio

from tests.helpers import fast_settings

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


def sse_server():
    """The fake endpoint's base URL while it serves (each test file's ``sse`` fixture), its scripts reset."""
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
            if p["status"] not in ("streaming", "retrying"):  # a retry streams again: not the final one
                return seen
            if on_stream:
                await on_stream(p)
    return seen


# each piece ends a sentence but the last: with a block rule, a sentence is published once its windows are checked
CHECKED = ["Use ROLLBACK TO SAVEPOINT [1]. ", "It undoes the work done after the savepoint [1]. ",
           "The savepoint itself stays [1]."]

