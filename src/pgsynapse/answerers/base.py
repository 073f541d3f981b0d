"""What every answerer shares: the request (question, ranked passages, history), the answer, the protocol."""

from __future__ import annotations

import re
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


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])|\n{2,}")


def split_sentences(text: str) -> list[str]:
    out = []
    for s in _SENTENCE.split(text):
        s = " ".join(s.split())
        if len(s) >= 20:
            out.append(s)
    return out
