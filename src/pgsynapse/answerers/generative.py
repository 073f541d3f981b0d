"""Generative answerers: a local model (``transformers``: a model directory, a .gguf file or a preset) or an
OpenAI-compatible endpoint (``openai``). Both stream: ``answer(req, on_delta)`` calls ``on_delta`` with each new
piece of text as it is generated. The final answer's citations are checked against the passages given
(answerers/citations.py)."""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from pathlib import Path

from pgsynapse.answerers.base import NOT_FOUND, Answer, Request
from pgsynapse.answerers.citations import CitationPolicy, checked_answer, token_limit_cut
from pgsynapse.answerers.local_models import ModelLocation, load_transformers
from pgsynapse.answerers.prompting import fit, render_messages, render_text
from pgsynapse.errors import ConfigError, EndpointBusy, InputError
from pgsynapse.logs import get_logger

log = get_logger(__name__)

Delta = Callable[[str], None]
T = TypeVar("T")


def build_prompt(req: Request, *, max_passage_chars: int = 1200) -> str:
    """History, numbered passages and the question (last): the plain-text prompt of the generative answerers."""
    return render_text(req, req.passages, req.history, max_passage_chars=max_passage_chars)


def _streamer(tokenizer, on_delta: Delta):
    from transformers import TextStreamer

    class DeltaStreamer(TextStreamer):
        """transformers' TextStreamer (word-safe incremental decoding), handing the text to ``on_delta``."""

        first_at: float | None = None
        tokens = 0

        def put(self, value) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.tokens += int(value.numel())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                if self.first_at is None:
                    self.first_at = time.perf_counter()
                on_delta(text)

    return DeltaStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class TransformersAnswerer:
    """A local generative model (causal or seq2seq), loaded once: a directory, a .gguf file (read by transformers
    with the ``gguf`` package) or a preset (answerers/local_models.py). Instruct models get their chat template.
    Greedy decoding."""

    name = "transformers"

    def __init__(self, path: str, *, max_new_tokens: int = 160, context_tokens: int = 0,
                 cache_dir: str | Path | None = None, citation_policy: CitationPolicy = "flag") -> None:
        started = time.perf_counter()
        loaded = load_transformers(path, cache_dir=cache_dir)
        self.location: ModelLocation = loaded.location
        self.seq2seq = loaded.seq2seq
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self.max_new_tokens = max_new_tokens
        self.citation_policy: CitationPolicy = citation_policy
        self.chat = not self.seq2seq and bool(getattr(self.tokenizer, "chat_template", None))
        limit = loaded.context_limit(context_tokens)
        self.context_tokens = limit
        # the prompt's budget: the context less room for the answer (a seq2seq model's answer has its own)
        self.prompt_budget = max(16, limit - (0 if self.seq2seq else max_new_tokens))
        self.last_prompt: str | None = None
        self.last_stats: dict[str, float] = {}
        log.info("answerer_model_loaded", model=self.location.description, chat=self.chat, context=limit,
                 seconds=round(time.perf_counter() - started, 2))

    # -- prompt ---------------------------------------------------------------------------------
    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def _trim(self, text: str, tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _render(self, req: Request):
        if self.chat:
            return lambda passages, history: self.tokenizer.apply_chat_template(
                render_messages(req, passages, history), add_generation_prompt=True, tokenize=False)
        return lambda passages, history: render_text(req, passages, history)

    # -- answer ---------------------------------------------------------------------------------
    def answer(self, req: Request, on_delta: Delta | None = None) -> Answer:
        import torch

        if not req.passages:
            return Answer(NOT_FOUND, [])
        prompt, passages, _ = fit(req, self._render(req), self._count, self._trim, self.prompt_budget)
        self.last_prompt = prompt
        # the chat template wrote the special tokens itself
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not self.chat)
        enc.pop("token_type_ids", None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        streamer = _streamer(self.tokenizer, on_delta or (lambda piece: None))
        started = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad,
                                      streamer=streamer)
        done = time.perf_counter()
        new = out[0] if self.seq2seq else out[0][enc["input_ids"].shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        first = streamer.first_at or done
        self.last_stats = {"prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens": int(len(new)),
                           "first_token_s": first - started, "seconds": done - started,
                           "passages": len(passages)}
        cut = token_limit_cut(self.max_new_tokens) if self._stopped_at_limit([int(t) for t in new]) else None
        return checked_answer(text, passages, self.citation_policy, cut=cut)

    def _stopped_at_limit(self, new: list[int]) -> bool:
        """Whether generation ended at ``max_new_tokens`` rather than on an end-of-sequence token."""
        eos = self.model.generation_config.eos_token_id
        eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        return len(new) >= self.max_new_tokens and not (new and new[-1] in eos)

class OpenAIAnswerer:
    """Any OpenAI-compatible chat endpoint (``POST {base_url}/chat/completions``); streamed (server-sent events)
    when the caller takes deltas."""

    name = "openai"

    def __init__(self, base_url: str, api_key: str | None, model: str, *, timeout: float = 60.0,
                 max_new_tokens: int | None = None, citation_policy: CitationPolicy = "flag") -> None:
        self.url = chat_completions_url(base_url)
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.max_new_tokens = max_new_tokens  # sent as max_tokens (None: the endpoint's own limit)
        self.citation_policy: CitationPolicy = citation_policy

    def answer(self, req: Request, on_delta: Delta | None = None) -> Answer:
        if not req.passages:
            return Answer(NOT_FOUND, [])
        # as a local instruct model's: the history once, as the earlier turns (its answers cut as there), the
        # passages and the question in the last message
        messages = render_messages(req, req.passages, req.history)
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0}
        if self.max_new_tokens:
            payload["max_tokens"] = self.max_new_tokens
        if on_delta is not None:
            payload["stream"] = True

        def read(resp) -> tuple[str, str | None]:
            if on_delta is not None and resp.headers.get_content_type() == "text/event-stream":
                return _read_events(resp, on_delta)
            data = json.loads(resp.read())
            return message_contents(data)[0], _finish_reason(data)

        text, finish = post_json(self.url, self.api_key, payload, read, timeout=self.timeout)
        if finish == "content_filter":  # not "nothing relevant found": asked again, it is filtered again
            raise InputError("the answer endpoint's content filter withheld the answer (finish_reason "
                             "content_filter): the question or its passages tripped the endpoint's own policy")
        if finish != "length":
            return checked_answer(text, req.passages, self.citation_policy)
        # "length": the max_tokens sent or the model's context ended it (OpenAI's API reference, finish_reason)
        limit = (f"answer_max_new_tokens ({self.max_new_tokens}, sent as max_tokens) or at its model's context length"
                 if self.max_new_tokens else "its model's token limit")
        if not text.strip():  # not "nothing relevant found": a reasoning model may spend every token before it writes
            raise ConfigError(f"invalid setting answer_max_new_tokens [PGSYNAPSE_ANSWER_MAX_NEW_TOKENS]: the answer "
                              f"endpoint stopped at {limit} before it wrote a word of its answer (finish_reason "
                              "length): raise answer_max_new_tokens [PGSYNAPSE_ANSWER_MAX_NEW_TOKENS]")
        return checked_answer(text, req.passages, self.citation_policy,
                              cut=f"the endpoint stopped at {limit} before it had finished")


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """The wait a ``Retry-After`` header asks for: delay-seconds or an HTTP date (RFC 9110, 10.2.3), in seconds from
    ``now``; None when there is none or it is neither."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def endpoint_shown(url: str) -> str:
    """``url`` as an error or a log may show it: without a user and password, a query or a fragment (where keys
    go)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def chat_completions_url(base_url: str) -> str:
    """The ``/chat/completions`` endpoint under ``base_url``: after its path, its query kept (Azure's
    ``?api-version=``), its user and password kept (:func:`post_json` sends them as HTTP Basic authentication)."""
    parts = urllib.parse.urlsplit(base_url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/chat/completions",
                                    parts.query, ""))


def _basic_auth(url: str) -> tuple[str, str | None]:
    """``url`` without its user and password, and the ``Authorization`` value they make (None without them):
    urllib reads ``user:password@host`` as a host name."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    bare = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], *parts[2:]))
    return bare, "Basic " + base64.b64encode(pair.encode()).decode()


def post_json(url: str, api_key: str | None, payload: dict, read: Callable[[Any], T], *, timeout: float,
              what: str = "answer endpoint") -> T:
    """POST ``payload`` as JSON (with a bearer key when given) and ``read`` the response; HTTP and network errors,
    a reply slower than ``timeout`` (seconds, per socket operation) and a body that is not JSON become a RuntimeError
    that names ``what`` failed and how. A key refused (HTTP 401, 403) is a :class:`ConfigError` naming the key's
    setting: no retry helps, an operator must set another one."""
    bare, basic = _basic_auth(url)
    request = urllib.request.Request(bare, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    if api_key or basic:  # never sent on to where the endpoint redirects (another host)
        request.add_unredirected_header("Authorization", f"Bearer {api_key}" if api_key else basic)
    # both endpoints (answers, SQL) wait openai_timeout_seconds
    slow = (f"{what} {endpoint_shown(url)} did not answer within {timeout:g} s (openai_timeout_seconds "
            "[PGSYNAPSE_OPENAI_TIMEOUT_SECONDS]): raise it for a slow endpoint, or check that the endpoint is up and "
            "not overloaded")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return read(resp)
    except urllib.error.HTTPError as exc:
        said = f"HTTP {exc.code}: {exc.read()[:200]!r}"
        if exc.code in (401, 403):
            key = "the key given" if api_key else "no key (none is set)"
            raise ConfigError(f"invalid setting openai_api_key [PGSYNAPSE_OPENAI_API_KEY]: the {what} refused "
                              f"{key} ({said}); set the endpoint's API key") from None
        if exc.code in (429, 503):  # busy, not broken: the wait it asks for is when the job is tried again
            wait = retry_after_seconds(exc.headers.get("Retry-After"))
            asked = f" (it asked to retry after {wait:.0f} s)" if wait is not None else ""
            raise EndpointBusy(f"{what} returned {said}{asked}", wait) from None
        raise RuntimeError(f"{what} returned {said}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise RuntimeError(slow) from None
        # the answerer's and the SQL generator's endpoint are both openai_base_url's
        raise RuntimeError(f"{what} {endpoint_shown(url)} unreachable: {exc.reason}: start it, or set openai_base_url "
                           "[PGSYNAPSE_OPENAI_BASE_URL] to where it runs; once it answers, `pgsynapse retry-failed` "
                           "asks again what failed meanwhile") from None
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"{what} returned a body that is not JSON: {exc.doc[:200]!r}") from None
    except TimeoutError:
        raise RuntimeError(slow) from None
    except (OSError, http.client.HTTPException) as exc:  # the connection broke mid-reply
        raise RuntimeError(f"{what} connection broke: {type(exc).__name__}: {exc}") from None


def message_contents(data: object, what: str = "answer endpoint") -> list[str]:
    """The message text of each choice of a chat-completion response body."""
    try:
        choices = data["choices"]  # type: ignore[index]
        out = [c["message"]["content"] or "" for c in choices]
    except (KeyError, IndexError, TypeError, AttributeError):
        out = []
    if not out:
        raise RuntimeError(f"{what} returned an unexpected body: {str(data)[:200]}")
    return out


def _finish_reason(data: object) -> str | None:
    """Why a chat completion's first choice ended (``stop``, ``length``: its token limit), when the body says."""
    try:
        return data["choices"][0].get("finish_reason")  # type: ignore[index]
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


def _read_events(resp, on_delta: Delta) -> tuple[str, str | None]:
    """The text of an OpenAI chat-completion event stream (``data: {json}`` lines, ``data: [DONE]`` last), each
    content delta handed to ``on_delta`` as it arrives, and why it ended (the last ``finish_reason`` sent). An event
    with no choices (Azure OpenAI's prompt filter results first, OpenAI's usage last) carries no text; an error event
    and a stream that ends with neither a finish_reason nor ``[DONE]`` (cut off: its text is partial) raise."""
    pieces: list[str] = []
    finish = None
    done = False
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            event = json.loads(data)
            if isinstance(event, dict) and "error" in event:
                raise RuntimeError(f"answer endpoint sent an error in its stream: {str(event['error'])[:200]}")
            choices = event["choices"]
            piece = (choices[0].get("delta") or {}).get("content") or "" if choices else ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RuntimeError(f"answer endpoint sent an unexpected event: {data[:200]}") from None
        finish = _finish_reason(event) or finish
        if piece:
            pieces.append(piece)
            on_delta(piece)
    if not done and finish is None:
        raise RuntimeError(f"answer endpoint's stream ended before its end ([DONE]) after {len(pieces)} pieces: "
                           "the connection was cut, the partial answer is not kept")
    return "".join(pieces), finish
