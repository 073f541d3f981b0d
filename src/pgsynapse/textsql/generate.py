"""SQL generation: a question, its schema context and the session's earlier turns -> candidate statements.

Three runtimes behind one protocol (:class:`SqlGenerator`): a local causal LM on ``transformers`` (a model
directory, a .gguf file dequantized by transformers, or a preset), the same GGUF on ``llama.cpp`` (far faster on a
few cores), or any OpenAI-compatible endpoint. Decoding is greedy and stops at the end of the first statement (a
top-level ``;``, outside quotes and comments) or at the model's end token; ``n > 1`` adds ``n - 1`` sampled
candidates after the greedy one (self-consistency). Every candidate goes through :func:`extract_sql`; nothing here
decides whether a statement is safe (textsql/safety.py does) or runs it.

The prompt (``render_messages`` for chat models, ``render_text`` otherwise): a short system message, the earlier
turns of the session as question / SQL pairs, and the last user message with the tables' DDL and the question.
A fix prompt (``SqlPrompt.fix``, the ``sql_fix_attempts`` retry) is the same prompt with extra turns after it: the
model's failed statement as its answer, then the database's error and a request for the corrected statement; the
base prompt is unchanged, so training pairs and fix prompts agree on everything before the fix turns. When it is
over the model's budget (context less the statement's tokens), the schema context loses whole tables from the end
(catalog order; a schema narrowed to ``sql_max_tables`` is ordered most like the question first by
textsql/context.py, so its least like go first), then the oldest turns, then the last table's lines. Dropping the
least like the question first in every schema was measured and not kept (BENCHMARKS.md, text-to-SQL, session 18: no
better on Spider, and a prompt that differs per question defeats llama.cpp's prefix reuse); the question and the fix
turns are never cut. :func:`training_example` gives the trainer the exact prompt text inference uses and the target
the model should emit (the statement, ``;`` and the end token), so both agree.
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pgsynapse.answerers.generative import chat_completions_url, message_contents, post_json
from pgsynapse.answerers.llamacpp import open_llama
from pgsynapse.answerers.local_models import PRESETS, check_model, load_transformers
from pgsynapse.artifacts import local_artifact
from pgsynapse.errors import ConfigError, InputError
from pgsynapse.logs import get_logger
from pgsynapse.textsql.extract import extract_sql, statement_complete

if TYPE_CHECKING:
    from pgsynapse.config import Settings

log = get_logger(__name__)

SYSTEM = "Write one PostgreSQL SELECT statement that answers the question, no explanation."
FIX_REQUEST = "That statement failed in PostgreSQL: {error}\nWrite the corrected statement."


@dataclass(frozen=True)
class SqlPrompt:
    question: str
    schema_context: str  # DDL-like text, one table per block, blocks separated by a blank line (textsql/context.py)
    history: tuple[tuple[str, str], ...] = ()  # earlier (question, sql) turns of the session, oldest first
    # a fix prompt's extra turns: (the statement the model wrote, the database's error), oldest first
    fix: tuple[tuple[str, str], ...] = ()


# -- the prompt -------------------------------------------------------------------------------------
def _statement(sql: str) -> str:
    """A statement as the model writes it: stripped, one ``;`` at the end."""
    return sql.strip().rstrip(";").rstrip() + ";"


def _user(p: SqlPrompt) -> str:
    schema = p.schema_context.strip()
    return (f"Tables:\n{schema}\n\n" if schema else "") + f"Question: {p.question}"


def render_messages(p: SqlPrompt) -> list[dict[str, str]]:
    """Chat messages for instruct models: the system message, earlier turns (question, then its statement), and
    the tables with the question last."""
    messages = [{"role": "system", "content": SYSTEM}]
    for question, sql in p.history:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": _statement(sql)})
    messages.append({"role": "user", "content": _user(p)})
    for sql, error in p.fix:
        messages.append({"role": "assistant", "content": _statement(sql)})
        messages.append({"role": "user", "content": FIX_REQUEST.format(error=error)})
    return messages


def render_text(p: SqlPrompt) -> str:
    """The plain prompt for models without a chat template; the model continues after ``SQL:``."""
    parts = [SYSTEM, ""]
    schema = p.schema_context.strip()
    if schema:
        parts += ["Tables:", schema, ""]
    for question, sql in p.history:
        parts += [f"Question: {question}", f"SQL: {_statement(sql)}", ""]
    parts += [f"Question: {p.question}"]
    for sql, error in p.fix:
        parts += [f"SQL: {_statement(sql)}", f"Error: {error}"]
    parts += ["SQL:"]
    return "\n".join(parts)


def split_tables(schema_context: str) -> list[str]:
    """The schema context's tables: its blocks separated by blank lines."""
    return [b.strip("\n") for b in re.split(r"\n[ \t]*\n", schema_context.strip()) if b.strip()]


def _shrinking(p: SqlPrompt):
    """Ever smaller versions of the prompt, the question and the fix turns always whole: tables dropped from the end
    (one kept), then history turns oldest first, then the last table's lines from the end, then no table at all."""
    tables, history = split_tables(p.schema_context), list(p.history)
    while len(tables) > 1:
        tables.pop()
        yield replace(p, schema_context="\n\n".join(tables))
    while history:
        history.pop(0)
        yield replace(p, schema_context="\n\n".join(tables), history=tuple(history))
    lines = tables[0].splitlines() if tables else []
    while len(lines) > 1:
        lines.pop()
        yield replace(p, schema_context="\n".join(lines), history=())
    if lines:
        yield replace(p, schema_context="", history=())


def fit_prompt(p: SqlPrompt, render: Callable[[SqlPrompt], str], count: Callable[[str], int],
               budget: int) -> tuple[SqlPrompt, str]:
    """The largest version of ``p`` whose rendered prompt takes at most ``budget`` tokens, and that prompt; an
    :class:`InputError` when even the question alone does not fit."""
    text = render(p)
    n = count(text)
    if n <= budget:
        return p, text
    for smaller in _shrinking(p):
        text = render(smaller)
        n = count(text)
        if n <= budget:
            log.info("sql_prompt_trimmed", tables=len(split_tables(p.schema_context)),
                     kept=len(split_tables(smaller.schema_context)), turns=len(p.history),
                     kept_turns=len(smaller.history), tokens=n, budget=budget)
            return smaller, text
    raise InputError(f"the question and the instructions take {n:,} tokens, over the {budget:,} the SQL model's "
                     "context leaves beside the statement")


def prompt_text(p: SqlPrompt, tokenizer) -> str:
    """The exact text a transformers model is given (tokenized without adding special tokens): the chat template
    applied when the tokenizer has one, else the plain prompt after the tokenizer's BOS token (if any)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(render_messages(p), add_generation_prompt=True, tokenize=False)
    return (tokenizer.bos_token or "") + render_text(p)


def end_token(tokenizer) -> str:
    return tokenizer.eos_token or tokenizer.sep_token or ""


def training_example(p: SqlPrompt, sql: str, tokenizer) -> tuple[str, str]:
    """(prompt text, target text) for fine-tuning: the prompt exactly as :class:`TransformersSqlGenerator` renders
    it, and what the model should emit after it (the statement, ``;``, and the chat's or the tokenizer's end
    token). Tokenize each with ``add_special_tokens=False`` and concatenate, as inference does
    (:func:`encode_example`)."""
    prompt = prompt_text(p, tokenizer)
    statement, end = _statement(sql), end_token(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(render_messages(p) + [{"role": "assistant", "content": statement}],
                                             tokenize=False)
        if full.startswith(prompt):
            target = full[len(prompt):]
            cut = target.find(end, target.find(statement) + len(statement)) if end else -1
            return prompt, (target[:cut + len(end)] if cut >= 0 else target.rstrip())
        return prompt, statement + end
    return prompt, " " + statement + end


def encode_example(prompt: str, target: str, tokenizer) -> tuple[list[int], int]:
    """The token ids of prompt + target, as inference sees them (each part tokenized on its own, no special tokens
    added), and the prompt's length: the labels are the ids from there on."""
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tail = tokenizer(target, add_special_tokens=False)["input_ids"]
    return list(head) + list(tail), len(head)


# -- generators -------------------------------------------------------------------------------------
class SqlGenerator(Protocol):
    name: str  # the runtime: transformers, llama-cpp or openai (what sql_runtime = auto became)
    last_stats: dict[str, float]  # of the last generate(): seconds, and prompt_tokens / new_tokens where known
    last_fitted: SqlPrompt | None  # the prompt the last generate() gave the model, after its budget's trimming
    lock: threading.RLock  # held by generate(); hold it around generate() and the reading of last_* when threads share

    def generate(self, prompt: SqlPrompt, n: int = 1, temperature: float = 0.7,
                 stop: threading.Event | None = None) -> list[str]:
        """n == 1: the greedy statement; n > 1: the greedy one first, then n - 1 sampled. Each through
        :func:`extract_sql` ("" for an output without a statement). ``stop``, once set (its worker stops), ends the
        generation at its next step (a candidate, a local model's next token): :class:`GenerationStopped`."""
        ...


class GenerationStopped(Exception):
    """The generation was stopped (its ``stop`` event set: its worker stops): it gave no statement."""


def _stopped(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise GenerationStopped("the SQL generation was stopped: its worker stops")


def _stopper(tokenizer, start: int, stop: threading.Event | None = None):
    import torch
    from transformers import StoppingCriteria

    class StatementEnd(StoppingCriteria):
        """Stops each sequence once its new text holds a whole statement (checked when a token with ';' comes),
        and all of them once ``stop`` is set."""

        def __init__(self) -> None:
            self.pieces: dict[int, bool] = {}

        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            if stop is not None and stop.is_set():
                return ~done
            for row, ids in enumerate(input_ids):
                last = int(ids[-1])
                if last not in self.pieces:
                    self.pieces[last] = ";" in tokenizer.decode([last], skip_special_tokens=True)
                if self.pieces[last]:
                    done[row] = statement_complete(tokenizer.decode(ids[start:], skip_special_tokens=True))
            return done

    return StatementEnd()


class _OneAtATime:
    """generate() holds the generator's lock: a model's state (llama.cpp's context) and last_* serve one call at a
    time."""

    lock: threading.RLock

    def generate(self, prompt: SqlPrompt, n: int = 1, temperature: float = 0.7,
                 stop: threading.Event | None = None) -> list[str]:
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        with self.lock:
            _stopped(stop)
            return self._generate(prompt, n, temperature, stop)

    def _generate(self, prompt: SqlPrompt, n: int, temperature: float, stop: threading.Event | None) -> list[str]:
        raise NotImplementedError


class TransformersSqlGenerator(_OneAtATime):
    """A local causal LM on transformers, loaded once: a model directory, a .gguf file or a preset
    (answerers/local_models.py). Instruct models get their chat template."""

    name = "transformers"

    def __init__(self, path: str, *, max_new_tokens: int = 128, context_tokens: int = 0,
                 cache_dir: str | Path | None = None, threads: int = 0) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        loaded = load_transformers(path, cache_dir=cache_dir, setting="sql_model_path", what="SQL model")
        if loaded.seq2seq:
            raise ConfigError(f"invalid setting sql_model_path [PGSYNAPSE_SQL_MODEL_PATH]: {path} is a seq2seq "
                              "model; SQL generation needs a causal LM")
        self.location, self.tokenizer, self.model = loaded.location, loaded.tokenizer, loaded.model
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.max_new_tokens = max_new_tokens
        self.context_tokens = loaded.context_limit(context_tokens)
        self.prompt_budget = max(16, self.context_tokens - max_new_tokens)
        ends = {self.tokenizer.eos_token_id, self.tokenizer.sep_token_id if not self.tokenizer.eos_token else None}
        for source in (self.model.generation_config.eos_token_id, self.model.config.eos_token_id):
            ends.update(source if isinstance(source, list) else [source])
        self.end_ids = sorted(i for i in ends if i is not None)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.end_ids[0] if self.end_ids else 0)
        self.last_prompt: str | None = None
        self.last_fitted: SqlPrompt | None = None
        self.lock = threading.RLock()
        self.last_stats: dict[str, float] = {}
        log.info("sql_model_loaded", model=self.location.description, runtime="transformers", chat=self.chat,
                 context=self.context_tokens, seconds=round(time.perf_counter() - started, 2))

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generate(self, prompt: SqlPrompt, n: int, temperature: float, stop: threading.Event | None) -> list[str]:
        import torch

        fitted, text = fit_prompt(prompt, lambda p: prompt_text(p, self.tokenizer), self._count, self.prompt_budget)
        self.last_fitted, self.last_prompt = fitted, text
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        enc.pop("token_type_ids", None)
        start = int(enc["input_ids"].shape[1])
        common = dict(max_new_tokens=self.max_new_tokens, eos_token_id=self.end_ids or None, pad_token_id=self.pad_id)
        started = time.perf_counter()
        with torch.no_grad():
            rows = list(self.model.generate(**enc, do_sample=False,
                                            stopping_criteria=[_stopper(self.tokenizer, start, stop)], **common))
            _stopped(stop)
            if n > 1:
                rows += list(self.model.generate(**enc, do_sample=True, temperature=temperature,
                                                 num_return_sequences=n - 1,
                                                 stopping_criteria=[_stopper(self.tokenizer, start, stop)], **common))
                _stopped(stop)
        outputs = [self.tokenizer.decode(r[start:], skip_special_tokens=True) for r in rows]
        self.last_stats = {"prompt_tokens": start, "new_tokens": int(len(rows[0]) - start),
                           "seconds": time.perf_counter() - started}
        return [extract_sql(o) for o in outputs]


class LlamaCppSqlGenerator(_OneAtATime):
    """A GGUF model (a .gguf file or a preset) on llama.cpp's quantized CPU kernels. The prompt's tokens are kept
    between calls, so the candidates of one question (and questions over the same tables) share their prefix."""

    name = "llama-cpp"

    def __init__(self, path: str, *, max_new_tokens: int = 128, context_tokens: int = 2048, threads: int = 0,
                 cache_dir: str | Path | None = None) -> None:
        started = time.perf_counter()
        # no flash attention here (the answerer has it): on Spider's choose half it changed 32 of 306 greedy
        # statements, four right answers fewer, and saved no time (BENCHMARKS.md, text-to-SQL, session 18)
        loaded = open_llama(path, context_tokens=context_tokens, threads=threads, cache_dir=cache_dir,
                            setting="sql_model_path", what="sql_runtime = llama-cpp")
        self.location, self.model, self.formatter = loaded.location, loaded.model, loaded.formatter
        self.chat = self.formatter is not None
        self.max_new_tokens = max_new_tokens
        self.context_tokens = loaded.context_tokens
        self.prompt_budget = max(16, self.context_tokens - max_new_tokens)
        self.last_prompt: str | None = None
        self.last_fitted: SqlPrompt | None = None
        self.lock = threading.RLock()
        self.last_stats: dict[str, float] = {}
        log.info("sql_model_loaded", model=self.location.description, runtime="llama-cpp", chat=self.chat,
                 context=self.context_tokens, seconds=round(time.perf_counter() - started, 2))

    def _count(self, text: str) -> int:
        return len(self.model.tokenize(text.encode(), add_bos=False, special=True))

    def _render(self, p: SqlPrompt) -> str:
        if self.formatter is not None:
            return self.formatter(messages=render_messages(p)).prompt
        return render_text(p)

    def _complete(self, text: str, temperature: float, seed: int, stop: threading.Event | None) -> tuple[str, int]:
        pieces: list[str] = []
        n = 0
        stream = self.model.create_completion(text, max_tokens=self.max_new_tokens, temperature=temperature,
                                              seed=seed, stream=True)
        try:
            for chunk in stream:
                piece = chunk["choices"][0]["text"]
                n += 1
                pieces.append(piece)
                if (";" in piece and statement_complete("".join(pieces))) or (stop is not None and stop.is_set()):
                    break
        finally:
            stream.close()
        _stopped(stop)
        return "".join(pieces), n

    def _generate(self, prompt: SqlPrompt, n: int, temperature: float, stop: threading.Event | None) -> list[str]:
        fitted, text = fit_prompt(prompt, self._render, self._count, self.prompt_budget)
        self.last_fitted, self.last_prompt = fitted, text
        started = time.perf_counter()
        first, tokens = self._complete(text, 0.0, 0, stop)
        outputs = [first]
        for i in range(1, n):
            outputs.append(self._complete(text, temperature, i, stop)[0])
        self.last_stats = {"prompt_tokens": self._count(text), "new_tokens": tokens,
                           "seconds": time.perf_counter() - started}
        return [extract_sql(o) for o in outputs]


class OpenAISqlGenerator(_OneAtATime):
    """Any OpenAI-compatible chat endpoint (``POST {base_url}/chat/completions``): the greedy statement with
    temperature 0, the sampled ones in one request with ``n`` (repeated when the endpoint returns fewer)."""

    name = "openai"

    def __init__(self, base_url: str, api_key: str | None, model: str, *, timeout: float = 60.0,
                 max_new_tokens: int | None = None) -> None:
        self.url = chat_completions_url(base_url)
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.max_new_tokens = max_new_tokens
        self.last_fitted: SqlPrompt | None = None
        self.lock = threading.RLock()
        self.last_stats: dict[str, float] = {}

    def _ask(self, messages: list[dict[str, str]], n: int, temperature: float) -> list[tuple[str, bool]]:
        """Each choice's text, and whether the endpoint's token limit cut its statement (finish_reason "length":
        the max_tokens sent or the model's context ended it, OpenAI's API reference) before its top-level ``;``."""
        payload: dict = {"model": self.model, "messages": messages, "temperature": temperature}
        if n > 1:
            payload["n"] = n
        if self.max_new_tokens:
            payload["max_tokens"] = self.max_new_tokens

        def read(resp) -> list[tuple[str, bool]]:
            data = json.loads(resp.read())
            texts = message_contents(data, "SQL endpoint")
            return [(text, choice.get("finish_reason") == "length" and not statement_complete(text))
                    for text, choice in zip(texts, data["choices"], strict=True)]

        return post_json(self.url, self.api_key, payload, read, timeout=self.timeout, what="SQL endpoint")

    def _generate(self, prompt: SqlPrompt, n: int, temperature: float, stop: threading.Event | None) -> list[str]:
        self.last_fitted = prompt
        messages = render_messages(prompt)
        started = time.perf_counter()
        outputs = self._ask(messages, 1, 0.0)[:1]
        _stopped(stop)  # a request under way is answered (the endpoint computes it anyway), none more is sent
        if outputs and outputs[0][1]:  # the greedy statement, cut: run as it is, it would fail as a syntax error
            limit = (f"sql_max_new_tokens ({self.max_new_tokens}, sent as max_tokens) or at its model's context "
                     "length" if self.max_new_tokens else "its model's token limit")
            raise ConfigError(f"invalid setting sql_max_new_tokens [PGSYNAPSE_SQL_MAX_NEW_TOKENS]: the SQL endpoint "
                              f"stopped at {limit} before the statement was complete (finish_reason length): raise "
                              "sql_max_new_tokens [PGSYNAPSE_SQL_MAX_NEW_TOKENS]")
        while len(outputs) < n:
            outputs += self._ask(messages, n - len(outputs), temperature)[: n - len(outputs)]
            _stopped(stop)
        self.last_stats = {"seconds": time.perf_counter() - started}
        # a sampled statement cut is left out: no statement (refused as empty, never run), the vote goes on without it
        return ["" if cut else extract_sql(text) for text, cut in outputs]


def auto_runtime(path: str, *, llama_cpp: bool | None = None) -> str:
    """``sql_runtime = auto``: llama.cpp for a GGUF model (a preset or a .gguf file) when llama-cpp-python is
    installed (it runs the Q4 weights as they are, several times faster on a CPU than transformers, which
    dequantizes them: BENCHMARKS.md), else transformers. ``llama_cpp``: whether it is installed (default: look)."""
    if not (importlib.util.find_spec("llama_cpp") is not None if llama_cpp is None else llama_cpp):
        return "transformers"
    if path in PRESETS or path.endswith(".gguf"):
        return "llama-cpp"
    where = Path(path).expanduser()
    if where.is_dir() and not (where / "config.json").is_file() and len(list(where.glob("*.gguf"))) == 1:
        return "llama-cpp"
    return "transformers"


def locate_sql_model(runtime: str, path: str, settings: Settings, *, subject: str | None = None) -> tuple[str, str]:
    """The runtime and path :func:`make_generator` loads a model from: a recorded absolute path looked for on this
    host (:func:`~pgsynapse.artifacts.local_artifact`), ``auto`` resolved; a local model that cannot be there raises
    its :class:`ConfigError` before any runtime is imported (naming ``subject``, else ``sql_model_path``)."""
    if runtime != "openai" and path and Path(path).is_absolute():
        path = str(local_artifact(path, settings.data_dir))
    if runtime == "auto":
        runtime = auto_runtime(path)
    if runtime in ("transformers", "llama-cpp"):  # one that cannot be there fails before torch or llama.cpp loads
        check_model(path, runtime=runtime, setting="sql_model_path", runtime_setting="sql_runtime", subject=subject)
    return runtime, path


def make_generator(runtime: str, path: str, settings: Settings, *, subject: str | None = None) -> SqlGenerator:
    """The generator of a sql_models row (or of the settings' sql_runtime / sql_model_path). A recorded directory or
    GGUF file that is not on this host is looked for under the data dir's models folder
    (:func:`~pgsynapse.artifacts.local_artifact`); a preset, a Hugging Face id or an endpoint's model name is kept.
    A local model that cannot be there (a preset not installed, no such path) raises :class:`ConfigError` before
    its runtime is imported (:func:`~pgsynapse.answerers.local_models.check_model`), naming ``subject`` (a
    registry's row, :func:`~pgsynapse.textsql.registry.entry`) or else the setting ``sql_model_path``."""
    s = settings
    runtime, path = locate_sql_model(runtime, path, s, subject=subject)
    cache_dir = s.data_dir / "models" / "gguf"
    if runtime == "transformers":
        return TransformersSqlGenerator(path, max_new_tokens=s.sql_max_new_tokens, context_tokens=s.sql_context_tokens,
                                        cache_dir=cache_dir, threads=s.torch_threads)
    if runtime == "llama-cpp":
        return LlamaCppSqlGenerator(path, max_new_tokens=s.sql_max_new_tokens, context_tokens=s.sql_context_tokens,
                                    threads=s.torch_threads, cache_dir=cache_dir)
    if runtime == "openai":
        if not s.openai_base_url:
            raise ConfigError("invalid setting openai_base_url [PGSYNAPSE_OPENAI_BASE_URL]: required when the SQL "
                              "runtime is openai")
        return OpenAISqlGenerator(s.openai_base_url, s.openai_api_key, path, timeout=s.openai_timeout_seconds,
                                  max_new_tokens=s.sql_max_new_tokens)
    raise ConfigError(f"invalid setting sql_runtime [PGSYNAPSE_SQL_RUNTIME]: {runtime!r} is not one of auto, "
                      "transformers, llama-cpp, openai")


__all__: Sequence[str] = [
    "FIX_REQUEST", "SYSTEM", "GenerationStopped", "LlamaCppSqlGenerator", "auto_runtime", "OpenAISqlGenerator", "SqlGenerator", "SqlPrompt", "TransformersSqlGenerator",
    "encode_example", "end_token", "extract_sql", "fit_prompt", "make_generator", "prompt_text", "render_messages",
    "render_text", "split_tables", "statement_complete", "training_example",
]
