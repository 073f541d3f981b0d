"""``extractive-v1``: the extractive answerer as it was at commit 211e1c9, frozen so the baseline of issue 18 stays
measurable (bench/answer_quality.py). Not used by the product; do not improve it."""

from __future__ import annotations

import re

import numpy as np

from pgsynapse.answerers.base import NOT_FOUND, Answer, Passage, Request

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])|\n{2,}")


def split_sentences(text: str) -> list[str]:
    """The sentence splitter of commit 211e1c9 (pgsynapse.answerers.base), frozen with the answerer."""
    out = []
    for s in _SENTENCE.split(text):
        s = " ".join(s.split())
        if len(s) >= 20:
            out.append(s)
    return out


class ExtractiveV1Answerer:
    """Selects the passages' sentences most similar to the question; never writes anything new."""

    name = "extractive-v1"

    def __init__(self, encode, *, not_found_threshold: float = 0.35, max_sentences: int = 3,
                 min_sentence_score: float = 0.25) -> None:
        self.encode = encode
        self.not_found_threshold = not_found_threshold
        self.max_sentences = max_sentences
        self.min_sentence_score = min_sentence_score

    def answer(self, req: Request, on_delta=None) -> Answer:  # on_delta: the interface of today, ignored
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
