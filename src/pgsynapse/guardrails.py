"""Guardrail rules: a text matches a rule when one of its windows is at least the rule's threshold similar to it.

A rule is a short text ("how to make a bomb"). A long text that holds it among much else is far from it as a
whole: mean pooling dilutes it, and the model sees only its first ``max_seq_length`` tokens. So a text is
checked in windows that together cover all of it:

- the whole text, when it fits the model (how a short question was always checked);
- each sentence (split after ``. ! ? ; :`` and a space, after the full stops ``。！？`` (and a closing bracket
  or quote after one), and at line breaks); a sentence over :data:`WINDOW_TOKENS` tokens is
  cut into token windows of that size, each overlapping the next by half;
- each pair of neighbouring sentences' pieces, so what a sentence break separates is also seen together.

Measured on all-MiniLM-L6-v2: the rule "how to make a bomb or explosives"
against one such sentence amid 1,250 tokens of index documentation scores 0.06 for the whole text, 0.27-0.40 for
token windows of 32-254 tokens, 0.95 for its sentence.
"""

from __future__ import annotations

import bisect
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pgsynapse.models import Embedder

WINDOW_TOKENS = 32  # a sentence longer than this is checked in windows of this many tokens, overlapping by half

# a CJK full stop ends its sentence once a character other than a closing bracket or quote follows it (not at the end
# of the text so far): text that follows never changes the sentences before a break
_CLOSE = "」』）)\"'”’〉》】"
_BREAK = re.compile(rf"(?<=[.!?;:])\s+|(?<=[。！？])\s*(?=[^\s{_CLOSE}])|(?<=[。！？][{_CLOSE}])\s*(?=\S)|\s*\n\s*")


def _sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text``, separators left out."""
    spans, start = [], 0
    for m in _BREAK.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def sentences_end(text: str) -> int:
    """Where the last finished sentence of ``text`` ends, with the break after it (0: none has ended): text that
    follows never changes the sentences before a break, so a streamed text is checked up to there."""
    end = 0
    for m in _BREAK.finditer(text):
        end = m.end()
    return end


def windows(text: str, tokenizer: Any, max_seq_length: int, window: int = WINDOW_TOKENS, *,
            part: bool = False) -> list[str]:
    """The texts a guardrail check embeds for ``text`` (see the module docstring); together they cover all of it.
    ``part``: ``text`` is the start of a longer text (a streamed answer so far): its whole is left out, as it is no
    window of the longer text; when it ends at a sentence break its other windows are all the longer text's."""
    text = text.strip()
    if not text:
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    starts = [o[0] for o in offsets]
    specials = len(tokenizer("", add_special_tokens=True)["input_ids"])
    out = [text] if not part and len(offsets) + specials <= max_seq_length else []
    pieces: list[tuple[int, int, int]] = []  # char start, char end, sentence number
    for k, (a, b) in enumerate(_sentences(text)):
        first, last = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
        if last - first <= window:
            pieces.append((a, b, k))
            continue
        step = max(1, window // 2)
        t = first
        while True:
            end = min(t + window, last)
            pieces.append((offsets[t][0], offsets[end - 1][1], k))
            if end >= last:
                break
            t += step
    out += [text[a:b] for a, b, _ in pieces]
    out += [text[p[0]:n[1]] for p, n in zip(pieces, pieces[1:]) if p[2] != n[2]]
    return list(dict.fromkeys(out))


def strongest(sims: np.ndarray, rules: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The strongest rule any window matches (block before flag, then the highest similarity), or None.

    ``sims`` is (windows, rules): each window's cosine similarity to each rule."""
    if not rules or sims.size == 0:
        return None
    best = sims.max(axis=0)
    hits = [(r, float(s)) for r, s in zip(rules, best, strict=True) if s >= r["threshold"]]
    if not hits:
        return None
    rule, sim = min(hits, key=lambda h: (h[0]["action"] != "block", -h[1]))
    return {"rule_id": rule["id"], "action": rule["action"], "similarity": round(sim, 4), "rule": rule["text"]}


@dataclass(frozen=True)
class RuleSet:
    """The enabled rules as one batch read them: the set its question and answer are checked under."""

    key: tuple = ()
    rules: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rules)

    @property
    def blocks(self) -> bool:
        """Whether a rule blocks (a flag rule hides nothing)."""
        return any(r["action"] == "block" for r in self.rules)


class Guard:
    """The enabled rules and their vectors per model version; :meth:`check` matches texts against them.

    Thread-safe: the worker loads (and refreshes the rules) on its event loop while another batch checks
    answers in a thread. A batch keeps the :meth:`snapshot` it loaded and checks under it (``rules=``): another
    batch may refresh the shared rules between its load and its answer's check."""

    def __init__(self) -> None:
        self._rules = RuleSet()
        self._vectors: dict[tuple[tuple, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def refresh(self, rules: list[dict[str, Any]]) -> None:
        key = tuple((r["id"], r["text"], r["action"], r["threshold"]) for r in rules)
        if key != self._rules.key:
            with self._lock:
                self._rules = RuleSet(key, list(rules))
                self._vectors = {}

    def snapshot(self) -> RuleSet:
        """The rules as the last refresh left them."""
        return self._rules

    def __bool__(self) -> bool:
        return bool(self._rules)

    def check(self, embedder: Embedder, texts: list[str], known: dict[str, np.ndarray] | None = None,
              rules: RuleSet | None = None, memo: dict[str, np.ndarray] | None = None,
              part: bool = False) -> list[dict[str, Any] | None]:
        """Per text, the strongest rule one of its windows matches, or None. ``known``: vectors already computed
        by this embedder for some texts (a question's query embedding), reused for the windows equal to them.
        ``rules``: the snapshot to check under (default: the rules of the last refresh). ``memo``: as ``known``,
        and the vectors this check computes are added to it (a streamed answer's checks, then its final one,
        embed each window once). ``part``: each text is the start of a longer one (:func:`windows`)."""
        rules_used, per_text = self._window_similarities(embedder, texts, known,
                                                         self._rules if rules is None else rules, memo, part)
        return [strongest(sims, rules_used) for sims in per_text] if rules_used else [None] * len(texts)

    def similarities(self, embedder: Embedder, text: str) -> list[tuple[dict[str, Any], float]]:
        """Each enabled rule with the highest cosine similarity of one of ``text``'s windows to it: the figure its
        threshold is compared with (``pgsynapse guardrail check``, to choose a threshold)."""
        rules, [sims] = self._window_similarities(embedder, [text], None, self._rules)
        return [(r, float(s)) for r, s in zip(rules, sims.max(axis=0), strict=True)] if sims.size else []

    def _window_similarities(self, embedder: Embedder, texts: list[str], known: dict[str, np.ndarray] | None,
                             snapshot: RuleSet, memo: dict[str, np.ndarray] | None = None, part: bool = False
                             ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
        """The rules, and per text its windows' cosine similarity to each rule (windows x rules)."""
        key, rules = snapshot.key, snapshot.rules
        if not rules:
            return [], [np.empty((0, 0))] * len(texts)
        per_text = [windows(t or "", embedder.tokenizer, embedder.max_seq_length, part=part) for t in texts]
        vectors = {} if memo is None else memo
        vectors.update(known or {})
        todo = list(dict.fromkeys(w for ws in per_text for w in ws if w not in vectors))
        if todo:
            vectors.update(zip(todo, embedder.encode(todo)))
        rule_vectors = self._rule_vectors(key, rules, embedder)
        return rules, [np.stack([vectors[w] for w in ws]) @ rule_vectors.T if ws else np.empty((0, len(rules)))
                       for ws in per_text]

    def _rule_vectors(self, key: tuple, rules: list[dict[str, Any]], embedder: Embedder) -> np.ndarray:
        vid = embedder.spec.version_id
        with self._lock:
            found = self._vectors.get((key, vid))
        if found is None:
            found = embedder.encode([r["text"] for r in rules])
            with self._lock:
                if self._rules.key == key:
                    self._vectors[(key, vid)] = found
        return found
