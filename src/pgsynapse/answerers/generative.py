"""Generative answerers: a local model directory (``transformers``) or an OpenAI-compatible endpoint (``openai``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from pgsynapse.answerers.base import NOT_FOUND, Answer, Request


def build_prompt(req: Request, *, max_passage_chars: int = 1200) -> str:
    """History, numbered passages and the question: the prompt of the generative answerers."""
    parts = ["Answer the question using only the numbered passages. Cite passages as [n]. "
             "If they do not contain the answer, say that you could not find it."]
    if req.history:
        parts.append("Conversation so far:")
        for t in req.history:
            parts.append(f"Q: {t.question}")
            if t.answer:
                parts.append(f"A: {t.answer[:400]}")
    parts.append("Passages:")
    for p in req.passages:
        parts.append(f"[{p.rank}] {p.title or ''}: {p.text[:max_passage_chars]}")
    parts.append(f"Question: {req.question}")
    parts.append("Answer:")
    return "\n".join(parts)



class TransformersAnswerer:
    """A local generative model directory (causal LM or seq2seq), loaded once."""

    name = "transformers"

    def __init__(self, path: str, *, max_new_tokens: int = 160) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        cls = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = cls.from_pretrained(path, local_files_only=True)
        self.model.eval()
        self.max_new_tokens = max_new_tokens
        self.last_prompt: str | None = None

    def answer(self, req: Request) -> Answer:
        import torch

        if not req.passages:
            return Answer(NOT_FOUND, [])
        prompt = build_prompt(req)
        self.last_prompt = prompt
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or getattr(self.model.config, "n_positions", 0) or 1024)
        enc = self.tokenizer(prompt, return_tensors="pt", truncation=True,
                             max_length=max(16, limit - (0 if self.seq2seq else self.max_new_tokens)))
        enc.pop("token_type_ids", None)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        new = out[0] if self.seq2seq else out[0][enc["input_ids"].shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Answer(text or NOT_FOUND, [p.as_source() for p in req.passages])


class OpenAIAnswerer:
    """Any OpenAI-compatible chat endpoint (``POST {base_url}/chat/completions``)."""

    name = "openai"

    def __init__(self, base_url: str, api_key: str | None, model: str, *, timeout: float = 60.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.model = model
        self.timeout = timeout

    def answer(self, req: Request) -> Answer:
        if not req.passages:
            return Answer(NOT_FOUND, [])
        messages = [{"role": "system", "content": "You answer questions about a document collection, citing passages as [n]."}]
        for t in req.history:
            messages.append({"role": "user", "content": t.question})
            if t.answer:
                messages.append({"role": "assistant", "content": t.answer})
        messages.append({"role": "user", "content": build_prompt(req)})
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                data = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"answer endpoint returned HTTP {exc.code}: {exc.read()[:200]!r}") from None
        except urllib.error.URLError as exc:
            raise RuntimeError(f"answer endpoint unreachable: {exc.reason}") from None
        try:
            text = data["choices"][0]["message"]["content"].strip()
        except (KeyError, IndexError, TypeError, AttributeError):
            raise RuntimeError(f"answer endpoint returned an unexpected body: {str(data)[:200]}") from None
        return Answer(text or NOT_FOUND, [p.as_source() for p in req.passages])
