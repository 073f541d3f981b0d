"""The generative answerers' plumbing: a tiny random-weight model the test builds itself, and a fake
OpenAI-compatible server on 127.0.0.1. The words are noise; the prompt, the flow and the row are checked."""

from __future__ import annotations

import json
import re
import socket
import threading
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from structlog.testing import capture_logs

from pgsynapse.answerers import NOT_FOUND, AnswerStopped, Passage, Request, TransformersAnswerer
from pgsynapse.client import Client
from pgsynapse.handlers.answer import AnswerHandler
from pgsynapse.handlers.embed import EmbedHandler
from pgsynapse.models import default_model_path
from tests.helpers import aconn, fast_settings, running_worker, wait_until
from tests.integration.test_answers import _corpus

pytestmark = pytest.mark.anyio


def _tiny_model(path, kind: str) -> str:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    if kind == "causal":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=512, n_embd=32, n_layer=1, n_head=2,
                                           bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id))
    else:
        model = T5ForConditionalGeneration(T5Config(vocab_size=tok.vocab_size, d_model=32, d_ff=64, d_kv=16,
                                                    num_layers=1, num_heads=2, decoder_start_token_id=tok.pad_token_id,
                                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id))
    # never the end token: generation always runs to answer_max_new_tokens (the answer is cut, deterministically)
    model.generation_config.suppress_tokens = [tok.sep_token_id]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
async def test_local_transformers_answerer_gets_history_and_passages(db_url, models, tmp_path, kind):
    path = _tiny_model(tmp_path / kind, kind)
    settings = fast_settings(db_url, answerer="transformers", answerer_model_path=path, answer_max_new_tokens=8)
    handler = AnswerHandler(settings, models)
    async with running_worker(settings, models, handlers={"embed": EmbedHandler(settings, models), "answer": handler}):
        await _corpus(db_url)
        async with Client(db_url) as client:
            first = await client.ask("how do I undo commands back to a savepoint?", session_id="s")
            second = await client.ask("and how do I release it?", session_id="s")
    assert first.status == second.status == "answered"
    assert isinstance(second.answer, str) and second.answer
    # random weights write noise (often nothing): an empty answer is the not-found answer, without sources;
    # noise without citations lists the passages given, in rank order
    if second.answer == NOT_FOUND:
        assert second.sources == []
    else:
        assert second.sources[0]["title"] == "Savepoints" and "uncited" in second.flags
        # stopped by answer_max_new_tokens, not by its end token: flagged as cut
        assert "truncated: it stopped at answer_max_new_tokens (8) before it had finished" in second.flags
    prompt = handler._generative.last_prompt
    assert "Q: how do I undo commands back to a savepoint?" in prompt  # the history
    assert "[1] Savepoints:" in prompt and prompt.rstrip().endswith("Question: and how do I release it?\nAnswer:")


async def test_a_generative_worker_loads_its_model_before_it_says_it_started(db_url, models, tmp_path):
    """As the embedding models do (test_answers): its first question, and every question queued behind it, waited
    for the generative model's load (a GGUF model on transformers: 30-100 s on 2 cores, BENCHMARKS.md,
    generative_worker), and a model that cannot load failed that question instead of the start."""
    path = _tiny_model(tmp_path / "causal", "causal")
    settings = fast_settings(db_url, kinds=("answer",), answerer="transformers", answerer_model_path=path)
    with capture_logs() as logs:
        async with running_worker(settings, models):
            events = [e["event"] for e in logs]
    assert "worker_started" in events, events
    assert "answerer_model_loaded" in events[:events.index("worker_started")], events


def test_a_stream_that_stops_stops_the_local_generator_at_that_piece(tmp_path):
    """The handler's stream raises AnswerStopped once its question went (handlers/answer_stream.py): the local
    model stops there, instead of generating its answer_max_new_tokens for nobody."""
    torch.manual_seed(0)  # random weights, the same on every run: they write words (noise), one piece each
    answerer = TransformersAnswerer(_tiny_model(tmp_path / "causal", "causal"), max_new_tokens=64)
    pieces: list[str] = []

    def on_delta(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise AnswerStopped("the question went")

    passage = Passage(1, 1, 1, "Savepoints", None, "ROLLBACK TO SAVEPOINT undoes the work done after it.", 0.9)
    with pytest.raises(AnswerStopped):
        answerer.answer(Request("how do I undo work back to a savepoint?", [passage]), on_delta=on_delta)
    assert len(pieces) == 3  # not one piece more: the generation ended where the stream stopped it
    answerer.answer(Request("how do I undo work back to a savepoint?", [passage]), on_delta=pieces.append)
    assert len(pieces) > 3 + 3 and answerer.last_stats["new_tokens"] == 64  # unstopped, it runs to its limit


class FakeOpenAI(BaseHTTPRequestHandler):
    requests: list[dict] = []
    fail = False
    status = 500  # a failing reply's
    content = "Use ROLLBACK TO SAVEPOINT [1]."
    finish_reason = "stop"  # why the completion ended: "length" when the endpoint's token limit cut it
    headers: dict[str, str] = {}  # a failing reply's own headers (Retry-After)
    hold: threading.Event | None = None  # the reply waits for it (a slow endpoint)

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if FakeOpenAI.hold is not None:
            FakeOpenAI.hold.wait(30)
        if FakeOpenAI.fail:
            self.send_response(FakeOpenAI.status)
            for name, value in FakeOpenAI.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(b'{"error": "overloaded"}')
            return
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": FakeOpenAI.content},
                                       "finish_reason": FakeOpenAI.finish_reason}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(out.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_openai():
    server = HTTPServer(("127.0.0.1", 0), FakeOpenAI)
    FakeOpenAI.requests, FakeOpenAI.fail, FakeOpenAI.content = [], False, "Use ROLLBACK TO SAVEPOINT [1]."
    FakeOpenAI.finish_reason, FakeOpenAI.status, FakeOpenAI.headers, FakeOpenAI.hold = "stop", 500, {}, None
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    if FakeOpenAI.hold is not None:
        FakeOpenAI.hold.set()
    server.shutdown()


async def test_openai_compatible_answerer_round_trip_and_http_errors(db_url, models, fake_openai):
    settings = fast_settings(db_url, answerer="openai", openai_base_url=fake_openai, openai_api_key="sk-test",
                             openai_model="tiny", max_attempts=2)
    async with running_worker(settings, models):
        await _corpus(db_url)
        async with Client(db_url) as client:
            ok = await client.ask("how do I undo commands back to a savepoint?", session_id="s")
            FakeOpenAI.fail = True
            bad = await client.ask("and how do I release it?", session_id="s")
    assert ok.status == "answered" and ok.answer == "Use ROLLBACK TO SAVEPOINT [1]."
    assert ok.sources[0]["title"] == "Savepoints"
    req = FakeOpenAI.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test" and req["body"]["model"] == "tiny"
    assert req["body"]["max_tokens"] == settings.answer_max_new_tokens  # the answer's token limit, as documented
    assert "[1] Savepoints:" in req["body"]["messages"][-1]["content"]
    follow = FakeOpenAI.requests[1]["body"]["messages"]
    assert {"role": "assistant", "content": "Use ROLLBACK TO SAVEPOINT [1]."} in follow  # the history went along
    # once, as the earlier turns: not a second time inside the last message (each earlier question and answer cost
    # its tokens twice)
    assert sum(m["content"].count("how do I undo commands back to a savepoint?") for m in follow) == 1, follow
    assert [m["role"] for m in follow] == ["system", "user", "assistant", "user"]
    assert bad.status == "failed" and "HTTP 500" in bad.error
    assert len(FakeOpenAI.requests) == 3  # the failing question: tried max_attempts = 2 times


async def test_the_endpoint_s_timeout_is_the_openai_timeout_seconds_setting(db_url, models, fake_openai):
    # it was 60 s, fixed: a slow endpoint (llama.cpp's server on a CPU) needs more, an interactive service less
    settings = fast_settings(db_url, answerer="openai", openai_base_url=fake_openai, openai_model="tiny",
                             openai_timeout_seconds=0.5, max_attempts=1)
    FakeOpenAI.hold = threading.Event()  # it answers once the test is over
    async with running_worker(settings, models):
        await _corpus(db_url)
        async with Client(db_url) as client:
            slow = await client.ask("how do I undo commands back to a savepoint?")
    assert slow.status == "failed" and (f"answer endpoint {fake_openai}/chat/completions did not answer within 0.5 s "
                                        "(openai_timeout_seconds [PGSYNAPSE_OPENAI_TIMEOUT_SECONDS])") in slow.error, (
        slow.error)


async def test_an_endpoint_down_for_every_attempt_fails_the_question_saying_where_and_what_to_do(db_url, models):
    # it failed with "RuntimeError: answer endpoint unreachable: [Errno 111] Connection refused": neither the
    # endpoint (its URL), nor the setting that names it, nor the way back once it is up
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = fast_settings(db_url, answerer="openai", openai_model="tiny", max_attempts=2,
                             openai_base_url=f"http://127.0.0.1:{port}/v1")
    async with running_worker(settings, models):
        await _corpus(db_url)
        async with Client(db_url) as client:
            down = await client.ask("how do I undo commands back to a savepoint?")
    assert down.status == "failed", down
    assert down.error.startswith(f"RuntimeError: answer endpoint http://127.0.0.1:{port}/v1/chat/completions "
                                 "unreachable: ") and "Connection refused" in down.error, down.error
    assert "openai_base_url [PGSYNAPSE_OPENAI_BASE_URL]" in down.error and "pgsynapse retry-failed" in down.error


async def test_a_busy_endpoint_s_retry_after_is_when_the_job_is_tried_again(db_url, models, fake_openai):
    # HTTP 429 "Retry-After: 30": the job's own backoff (2, 4, 8, 16 s) asked again within the wait the endpoint
    # asked for, and its five attempts were gone in half a minute
    settings = fast_settings(db_url, answerer="openai", openai_base_url=fake_openai, openai_model="tiny",
                             max_attempts=5, retry_backoff_max_seconds=300)
    FakeOpenAI.fail, FakeOpenAI.status, FakeOpenAI.headers = True, 429, {"Retry-After": "30"}
    question = "INSERT INTO pgsynapse.questions (text) VALUES ('how do I undo commands back to a savepoint?') RETURNING id"
    job = ("SELECT status, attempts, extract(epoch FROM run_after - now()) AS wait, last_error FROM pgsynapse.jobs "
           "WHERE kind = 'answer' AND ref_id = %s")
    failed_once = "SELECT last_error IS NOT NULL FROM pgsynapse.jobs WHERE kind = 'answer' AND ref_id = %s"
    async with running_worker(settings, models):
        await _corpus(db_url)
        conn = await aconn(db_url)
        first = (await (await conn.execute(question)).fetchone())["id"]
        await wait_until(conn, failed_once, (first,), channel="pgsynapse_jobs")
        busy = await (await conn.execute(job, (first,))).fetchone()
        # the row stays pending with error NULL: the application (which may not read the queue) sees the retry
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE pgsynapse_app")
            shown = await (await conn.execute(
                "SELECT q.status, q.error, r.attempts, r.last_error FROM pgsynapse.questions q JOIN"
                " pgsynapse.job_retries_v1 r ON r.row_table = 'questions' AND r.row_id = q.id")).fetchall()
        # 503 with an HTTP date an hour ahead: at most retry_backoff_max_seconds, the longest wait between attempts
        later = datetime.now(timezone.utc) + timedelta(hours=1)
        FakeOpenAI.status, FakeOpenAI.headers = 503, {"Retry-After": format_datetime(later, usegmt=True)}
        second = (await (await conn.execute(question.replace("commands", "work"))).fetchone())["id"]
        await wait_until(conn, failed_once, (second,), channel="pgsynapse_jobs")
        down = await (await conn.execute(job, (second,))).fetchone()
        await conn.close()
    assert (busy["status"], busy["attempts"]) == ("pending", 1) and 25 < busy["wait"] <= 30, busy
    assert shown == [{"status": "pending", "error": None, "attempts": 1, "last_error": busy["last_error"]}], shown
    assert "HTTP 429" in busy["last_error"] and "asked to retry after 30 s" in busy["last_error"], busy["last_error"]
    assert (down["status"], down["attempts"]) == ("pending", 1) and 290 < down["wait"] <= 300, down
    assert "HTTP 503" in down["last_error"] and re.search(r"asked to retry after 3(599|600) s", down["last_error"]), down["last_error"]
    assert len(FakeOpenAI.requests) == 2  # one each: neither was asked again sooner


async def test_a_refused_key_fails_the_question_at_once_naming_the_key_setting(db_url, models, fake_openai):
    settings = fast_settings(db_url, answerer="openai", openai_base_url=fake_openai, openai_api_key="sk-wrong",
                             openai_model="tiny", max_attempts=3)
    FakeOpenAI.fail, FakeOpenAI.status = True, 401
    async with running_worker(settings, models):
        await _corpus(db_url)
        async with Client(db_url) as client:
            bad = await client.ask("how do I undo commands back to a savepoint?")
    assert bad.status == "failed" and "openai_api_key [PGSYNAPSE_OPENAI_API_KEY]" in bad.error, bad.error
    assert "HTTP 401" in bad.error and "sk-wrong" not in bad.error
    assert len(FakeOpenAI.requests) == 1  # not retried: another attempt with the same key cannot help


async def test_an_answer_withheld_by_the_endpoints_content_filter_fails_saying_so(db_url, models, fake_openai):
    # Azure OpenAI's content filter: no text, finish_reason "content_filter"; not "nothing relevant was found"
    settings = fast_settings(db_url, answerer="openai", openai_base_url=fake_openai, openai_model="tiny",
                             max_attempts=3)
    FakeOpenAI.content, FakeOpenAI.finish_reason = None, "content_filter"
    async with running_worker(settings, models):
        await _corpus(db_url)
        async with Client(db_url) as client:
            withheld = await client.ask("how do I undo commands back to a savepoint?")
    assert withheld.status == "failed" and withheld.answer is None, (withheld.status, withheld.answer)
    assert "content filter" in withheld.error, withheld.error
    assert len(FakeOpenAI.requests) == 1  # the same question would be filtered again


async def test_an_answer_of_citations_only_is_replaced_by_the_extractive_answer(db_url, models, fake_openai):
    # small local models often write "[1]" and nothing else; the endpoint here does so on purpose
    settings = fast_settings(db_url, answerer="openai", openai_base_url=fake_openai, openai_api_key="sk-test",
                             openai_model="tiny")
    with capture_logs() as logs:
        async with running_worker(settings, models):
            await _corpus(db_url)
            async with Client(db_url) as client:
                FakeOpenAI.content = "[1] [2]"
                bare = await client.ask("how do I undo commands back to a savepoint?", session_id="s")
                # a passage pasted as the prompt shows it: "[1] Title: its text" (half of Qwen 0.5B's answers)
                FakeOpenAI.content = ("[1] Savepoints: SAVEPOINT establishes a new savepoint within the current "
                                      "transaction. A savepoint is a special mark inside a transaction")
                pasted = await client.ask("how do I undo commands back to a savepoint?", session_id="u")
                FakeOpenAI.content = "Use ROLLBACK TO SAVEPOINT [1]."
                said = await client.ask("how do I undo commands back to a savepoint?", session_id="t")
    assert bare.status == "answered" and bare.flags == ["no_text", "extractive_fallback"], bare.flags
    # the extractive answerer's own answer of the same passages: words, each sentence cited, Savepoints first
    assert bare.answer not in ("[1] [2]", NOT_FOUND) and "savepoint" in bare.answer.lower()
    assert re.search(r"[A-Za-z]{3,}.*\[1\]", bare.answer) and bare.sources[0]["title"] == "Savepoints"
    assert pasted.flags == ["pasted_passage", "extractive_fallback"], pasted.flags
    assert pasted.answer == bare.answer and pasted.sources == bare.sources  # the same passages, the same answer
    logged = [e for e in logs if e["event"] == "answer_fallback"]
    assert [(e["reason"], e["question"], e["answerer"]) for e in logged] == [("no_text", bare.id, "openai"),
                                                                             ("pasted_passage", pasted.id, "openai")]
    # an answer with words is the generator's, unflagged
    assert said.answer == "Use ROLLBACK TO SAVEPOINT [1]." and said.flags == []


async def test_an_answer_cut_at_its_length_says_which_limit_and_one_cut_before_any_text_fails(db_url, models,
                                                                                              fake_openai):
    settings = fast_settings(db_url, answerer="openai", openai_base_url=fake_openai, openai_model="tiny",
                             answer_max_new_tokens=40, max_attempts=3)
    async with running_worker(settings, models):
        await _corpus(db_url)
        async with Client(db_url) as client:
            # finish_reason "length": the max_tokens the worker sent (answer_max_new_tokens) or the model's context
            # ended it; the flag said "its token limit", as if the endpoint's own, not the setting that can be raised
            FakeOpenAI.content = "Use ROLLBACK TO SAVEPOINT [1] to undo the commands"
            FakeOpenAI.finish_reason = "length"
            cut = await client.ask("how do I undo commands back to a savepoint?", session_id="v")
            # a reasoning model that spent every token before it wrote a word: the row said "I could not find
            # anything relevant", a false answer, where the limit was too low
            FakeOpenAI.content = ""
            nothing = await client.ask("how do I undo work back to a savepoint?", session_id="w")
            FakeOpenAI.finish_reason = "stop"  # empty and finished: the model had nothing to say
            empty = await client.ask("how do I undo statements back to a savepoint?", session_id="x")
    assert cut.answer == "Use ROLLBACK TO SAVEPOINT [1] to undo the commands"
    assert cut.flags == ["truncated: the endpoint stopped at answer_max_new_tokens (40, sent as max_tokens) or at its "
                         "model's context length before it had finished"], cut.flags
    assert nothing.status == "failed" and nothing.answer is None, (nothing.status, nothing.answer)
    assert ("the answer endpoint stopped at answer_max_new_tokens (40, sent as max_tokens) or at its model's context "
            "length before it wrote a word of its answer" in nothing.error), nothing.error
    assert "raise answer_max_new_tokens [PGSYNAPSE_ANSWER_MAX_NEW_TOKENS]" in nothing.error, nothing.error
    assert len(FakeOpenAI.requests) == 3  # not retried: the same limit cuts it again
    assert empty.status == "answered" and empty.answer == NOT_FOUND, (empty.status, empty.answer)
