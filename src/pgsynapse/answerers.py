"""Answerers: turn retrieved passages (and a session's history) into an answer with citations.

- ``extractive`` (default): no generative model; picks the sentences of the retrieved passages closest to
  the question, each cited ``[n]``; says so plainly when nothing relevant was retrieved.
- ``transformers``: a local causal or seq2seq model directory.
- ``openai``: any OpenAI-compatible ``/chat/completions`` endpoint, by base URL and key.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

NOT_FOUND = "I could not find anything relevant to this question in the documents."


@dataclass
class Passage:
    rank: int  # 1-based: the [n] of a citation
    document_id: int
    chunk_id: int
    title: str | None
    source: str | None
    text: str
    score: float

    def as_source(self) -> dict[str, Any]:
        return {"rank": self.rank, "document_id": self.document_id, "chunk_id": self.chunk_id, "title": self.title,
                "source": self.source, "score": round(float(self.score), 4), "passage": self.text}


@dataclass
class Turn:
    question: str
    answer: str | None


@dataclass
class Request:
    question: str
    passages: list[Passage]
    history: list[Turn] = field(default_factory=list)  # oldest first
    query_vector: np.ndarray | None = None


@dataclass
class Answer:
    text: str
    sources: list[dict[str, Any]]


class Answerer(Protocol):
    name: str

    def answer(self, req: Request) -> Answer: ...


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


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])|\n{2,}")


def split_sentences(text: str) -> list[str]:
    out = []
    for s in _SENTENCE.split(text):
        s = " ".join(s.split())
        if len(s) >= 20:
            out.append(s)
    return out


class ExtractiveAnswerer:
    """Selects the passages' sentences most similar to the question; never writes anything new."""

    name = "extractive"

    def __init__(self, encode, *, not_found_threshold: float = 0.35, max_sentences: int = 3,
                 min_sentence_score: float = 0.25) -> None:
        self.encode = encode
        self.not_found_threshold = not_found_threshold
        self.max_sentences = max_sentences
        self.min_sentence_score = min_sentence_score

    def answer(self, req: Request) -> Answer:
        relevant = [p for p in req.passages if p.score >= self.not_found_threshold]
        if not relevant or req.query_vector is None:
            return Answer(NOT_FOUND, [])
        cands: list[tuple[Passage, int, str]] = []
        for p in relevant:
            for i, s in enumerate(split_sentences(p.text)):
                cands.append((p, i, s))
        if not cands:
            best = relevant[0]
            return Answer(f"{' '.join(best.text.split())[:600]} [{best.rank}]", [best.as_source()])
        vecs = self.encode([s for _, _, s in cands])
        scores = vecs @ req.query_vector
        order = [int(i) for i in np.argsort(-scores)[: self.max_sentences] if scores[i] >= self.min_sentence_score]
        if not order:
            order = [int(np.argmax(scores))]
        # read in source order, then position within the passage
        picked = sorted(order, key=lambda i: (cands[i][0].rank, cands[i][1]))
        text = " ".join(f"{cands[i][2]} [{cands[i][0].rank}]" for i in picked)
        cited = sorted({cands[i][0].rank for i in picked})
        sources = [p.as_source() for p in relevant if p.rank in cited]
        sources += [p.as_source() for p in relevant if p.rank not in cited]
        return Answer(text, sources)


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
