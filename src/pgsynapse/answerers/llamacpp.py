"""A GGUF model on llama.cpp (``answerer = llama-cpp``, extra ``pgsynapse[llama]``): the same presets, prompt,
budget, streaming and citation check as the transformers answerer, on llama.cpp's quantized CPU kernels, which
run the Q4 models far faster on a few cores than transformers (that dequantizes them to fp32): BENCHMARKS.md,
"generation". Greedy decoding (temperature 0)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgsynapse.answerers.base import NOT_FOUND, Answer, Request
from pgsynapse.answerers.citations import CitationPolicy, checked_answer, token_limit_cut
from pgsynapse.answerers.local_models import ModelLocation, resolve_model
from pgsynapse.answerers.prompting import fit, render_messages, render_text
from pgsynapse.errors import ConfigError
from pgsynapse.logs import get_logger

log = get_logger(__name__)


@dataclass
class LlamaModel:
    """A GGUF model opened on llama.cpp, with its chat template's formatter (None: the file has no template)."""

    location: ModelLocation
    model: Any
    formatter: Any
    context_tokens: int


def open_llama(path: str, *, context_tokens: int = 2048, threads: int = 0, cache_dir: str | Path | None = None,
               setting: str = "answerer_model_path", what: str = "answerer = llama-cpp",
               flash_attn: bool = False) -> LlamaModel:
    """A .gguf file or a preset on llama.cpp, its context the model's trained one capped by ``context_tokens`` (0:
    no cap), with a formatter for the chat template in the file's metadata. ``flash_attn``: llama.cpp's fused
    attention (the prompt is read ~8 % faster on 2 cores; the numbers differ in the last bits, so greedy text can
    differ in rare places)."""
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        raise ConfigError(f"{what} needs llama-cpp-python: pip install 'pgsynapse[llama]'") from None
    location = resolve_model(path, cache_dir=Path(cache_dir or Path.home() / ".cache" / "pgsynapse"), setting=setting)
    if not location.gguf_file:
        raise ConfigError(f"invalid setting {setting} [PGSYNAPSE_{setting.upper()}]: {what} needs a .gguf file or "
                          "a preset")
    file = str(Path(location.directory) / location.gguf_file)

    def load(n_ctx: int) -> Any:
        return Llama(model_path=file, n_ctx=n_ctx, n_threads=threads or os.cpu_count() or 1, n_batch=512,
                     flash_attn=flash_attn, verbose=False)

    # opened at the cap (0: llama.cpp takes the trained context), then again only when the model was trained on
    # less. Not a vocabulary-only load first to read the metadata: that one knows no trained context and prints
    # a false "n_ctx_train (0) ... overflow" warning on every open.
    model = load(context_tokens)
    meta = model.metadata
    recorded = int(meta.get(f"{meta.get('general.architecture')}.context_length") or 0)
    trained = recorded or 2048
    limit = min(trained, context_tokens) if context_tokens else trained
    if limit != context_tokens and (context_tokens or not recorded):
        model = load(limit)
        meta = model.metadata
    template = meta.get("tokenizer.chat_template")
    formatter = None
    if template:
        def token(key: str) -> str:
            tid = meta.get(key)
            return model.detokenize([int(tid)], special=True).decode("utf-8", "replace") if tid else ""

        formatter = Jinja2ChatFormatter(template, eos_token=token("tokenizer.ggml.eos_token_id"),
                                        bos_token=token("tokenizer.ggml.bos_token_id"))
    return LlamaModel(location, model, formatter, limit)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class LlamaCppAnswerer:
    name = "llama-cpp"

    def __init__(self, path: str, *, max_new_tokens: int = 160, context_tokens: int = 2048, threads: int = 0,
                 cache_dir: str | Path | None = None, citation_policy: CitationPolicy = "flag") -> None:
        started = time.perf_counter()
        loaded = open_llama(path, context_tokens=context_tokens, threads=threads, cache_dir=cache_dir, flash_attn=True)
        self.location, self.model, self.formatter = loaded.location, loaded.model, loaded.formatter
        limit = loaded.context_tokens
        self.chat = self.formatter is not None
        self.max_new_tokens = max_new_tokens
        self.context_tokens = limit
        self.prompt_budget = max(16, limit - max_new_tokens)
        self.citation_policy: CitationPolicy = citation_policy
        self.last_prompt: str | None = None
        self.last_stats: dict[str, float] = {}
        self._previous: list[int] = []  # the last prompt's tokens: llama.cpp still holds their state
        self.reuse_prefix = True  # False: every prompt read whole (bench.generation's comparison)
        log.info("answerer_model_loaded", model=self.location.description, runtime="llama-cpp", chat=self.chat,
                 context=limit, seconds=round(time.perf_counter() - started, 2))

    def _count(self, text: str) -> int:
        return len(self.model.tokenize(text.encode(), add_bos=False, special=True))

    def _trim(self, text: str, tokens: int) -> str:
        ids = self.model.tokenize(text.encode(), add_bos=False, special=False)[:tokens]
        return self.model.detokenize(ids).decode("utf-8", "ignore")

    def _render(self, req: Request):
        if self.formatter is not None:
            fmt = self.formatter
            return lambda passages, history: fmt(messages=render_messages(req, passages, history)).prompt
        return lambda passages, history: render_text(req, passages, history)

    def answer(self, req: Request, on_delta=None) -> Answer:
        if not req.passages:
            return Answer(NOT_FOUND, [])
        prompt, passages, _ = fit(req, self._render(req), self._count, self._trim, self.prompt_budget)
        self.last_prompt = prompt
        started = time.perf_counter()
        # the prompt as llama.cpp tokenizes it; it keeps the previous prompt's state and reads only what differs
        # after the longest common prefix (the instructions and the chat template's opening: 69 tokens for the
        # Qwen preset, 0.3-0.4 s before every first token on 2 cores; BENCHMARKS.md, "generation, session 12")
        tokens = self.model.tokenize(prompt.encode("utf-8"), special=True)
        if not self.reuse_prefix:
            self.model.reset()
            self._previous = []
        reused = min(_common_prefix(self._previous, tokens), len(tokens) - 1)
        self._previous = tokens
        first, pieces, n, finish = None, [], 0, None
        for chunk in self.model.create_completion(tokens, max_tokens=self.max_new_tokens, temperature=0.0,
                                                  stream=True):
            piece = chunk["choices"][0]["text"]
            finish = chunk["choices"][0].get("finish_reason") or finish
            n += 1
            if piece:
                if first is None:
                    first = time.perf_counter()
                pieces.append(piece)
                if on_delta is not None:
                    on_delta(piece)
        done = time.perf_counter()
        self.last_stats = {"prompt_tokens": len(tokens), "prefix_tokens_reused": reused, "new_tokens": n,
                           "first_token_s": (first or done) - started, "seconds": done - started,
                           "passages": len(passages)}
        cut = token_limit_cut(self.max_new_tokens) if finish == "length" else None
        return checked_answer("".join(pieces), passages, self.citation_policy, cut=cut)
