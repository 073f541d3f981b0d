"""The gate's grouped hold-out: whole groups of similar questions, and the pages they are about, kept out of training.

A time slice of feedback shares its phrasing templates and its pages with the rest ("what is the default value of
..." forty times over), so a candidate that memorises templates looks good on it and then fails new users (issue
23). Here a question's **group** is the connected component of two links:

- *near duplicates*: cosine similarity of the two questions' embeddings (under the base model) at or above
  ``threshold`` (``retrain_group_threshold``);
- *same template*: a template key in common (:func:`template_keys`).

Whole groups are held out (about ``fraction`` of the examples, in an order drawn from ``seed``), and so are their
**pages**: a training example whose page is a held-out page is dropped from training (it is on neither side), so
every held-out question is about a page and in a phrasing no training example has seen.

The template keys. Feedback templates are frames around a slot: "sql command to …", "what does the … setting
do", "… syntax and options". The slot holds the content (a command, a parameter, a topic) and its words are rare
across the feedback; the frame's words are frequent. So a word is a *template word* when at least ``max(3, 2 %)``
of the questions use it, and a question has two keys: the template words before its first rare word (its opening
frame, at most three words: "what does the …") and those after its last rare word (its closing frame: "… setting
do"). A frame of fewer than two words is no key ("what …" would join everything). Questions sharing either key
are one group, so "what is the syntax of insert" and "what is the syntax of create table" (a slot of common
words; such a question's frames are its first and last three words) are one group, and so are the "which
statement can …" questions whatever their slot ends with. A question that opens and ends with rare words has no
key and is grouped by similarity only. Learned from the data, this needs no stop-word list and follows whatever
templates an application's users (or its generated feedback) happen to use; it errs towards coarse groups (all
"how do i …" questions are one), which makes the gate stricter, never laxer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

TEMPLATE_MIN_SHARE = 0.02  # a template word is used by at least this share of the questions ...
TEMPLATE_MIN_COUNT = 3  # ... and by at least this many
FRAME_WORDS = 3  # template words kept each side of the slot
MIN_FRAME_WORDS = 2  # a frame of one word ("what …") is no template
OVERSHOOT = 1.5  # a group that would take the hold-out past this x its target is skipped
MIN_TRAIN_SHARE = 0.5  # ... and so is one whose pages would leave less than this share of examples for training
_BLOCK = 1024  # rows of the similarity matrix computed at a time

_TOKEN = re.compile(r"[a-z0-9_']+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def template_keys(questions: Sequence[str]) -> list[list[str]]:
    """Each question's template keys (see the module's docstring): its opening frame ("sql command to …") and
    its closing frame ("… syntax and options"), each of at least two template words; none, one or both."""
    toks = [tokens(q) for q in questions]
    df = Counter(w for t in toks for w in set(t))
    floor = max(TEMPLATE_MIN_COUNT, TEMPLATE_MIN_SHARE * len(questions))
    keys: list[list[str]] = []
    for t in toks:
        rare = [i for i, w in enumerate(t) if df[w] < floor]
        first, last = (rare[0], rare[-1] + 1) if rare else (FRAME_WORDS, len(t) - FRAME_WORDS)
        lead, trail = t[:first][:FRAME_WORDS], t[max(last, 0):][-FRAME_WORDS:]
        keys.append([k for k, part in ((f"{' '.join(lead)} …", lead), (f"… {' '.join(trail)}", trail))
                     if len(part) >= MIN_FRAME_WORDS])
    return keys


class _Components:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def question_groups(questions: Sequence[str], vectors: np.ndarray, threshold: float) -> list[int]:
    """Group id of each question (0, 1, ... in order of first appearance): connected components of
    cosine(vectors) >= ``threshold`` and of equal template keys. ``vectors`` are normalised, one row per question."""
    n = len(questions)
    if len(vectors) != n:
        raise ValueError(f"{len(vectors)} vectors for {n} questions")
    comp = _Components(n)
    first_of: dict[str, int] = {}
    for i, keys in enumerate(template_keys(questions)):
        for key in keys:
            comp.union(first_of.setdefault(key, i), i)
    v = np.asarray(vectors, dtype=np.float32)
    for start in range(0, n, _BLOCK):
        sims = v[start:start + _BLOCK] @ v.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if c > start + r:
                comp.union(start + r, c)
    ids: dict[int, int] = {}
    return [ids.setdefault(comp.find(i), len(ids)) for i in range(n)]


@dataclass
class Split:
    """Indices into the examples: ``train`` and ``heldout`` never share a group or a page; ``dropped`` are
    training-side examples whose page is held out; ``groups`` is every example's group id."""

    train: list[int]
    heldout: list[int]
    dropped: list[int]
    groups: list[int]
    heldout_pages: set[int] = field(default_factory=set)

    def summary(self) -> dict[str, int]:
        return {"train": len(self.train), "heldout": len(self.heldout), "dropped": len(self.dropped),
                "groups": len(set(self.groups)), "heldout_groups": len({self.groups[i] for i in self.heldout}),
                "heldout_pages": len(self.heldout_pages)}


def grouped_holdout(questions: Sequence[str], vectors: np.ndarray, pages: Sequence[int], fraction: float,
                    seed: int = 0, threshold: float = 0.85) -> Split:
    """Hold out whole groups, about ``fraction`` of the examples, and their pages; deterministic for ``seed``.

    Groups are taken in an order drawn from ``seed`` until the hold-out reaches its target; a group that would
    take it past ``OVERSHOOT`` x the target is skipped, so one giant template never becomes the whole hold-out
    (it stays on the training side, and the gate says how few groups it had when too few are left), and so is
    a group whose pages would leave less than ``MIN_TRAIN_SHARE`` of the examples for training (a template asked
    about every page would take every page with it)."""
    n = len(questions)
    if len(pages) != n:
        raise ValueError(f"{len(pages)} pages for {n} questions")
    groups = question_groups(questions, vectors, threshold)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    target = fraction * n
    on_page = Counter(pages)
    held: list[int] = []
    held_pages: set[int] = set()
    kept = n  # examples left for training: neither held out nor on a held-out page
    for g in np.random.default_rng(seed).permutation(len(members)).tolist():
        if len(held) >= target:
            break
        new_pages = {pages[i] for i in members[g]} - held_pages
        if len(held) + len(members[g]) > max(1.0, OVERSHOOT * target):
            continue
        if kept - sum(on_page[p] for p in new_pages) < MIN_TRAIN_SHARE * n:
            continue
        held.extend(members[g])
        held_pages |= new_pages
        kept -= sum(on_page[p] for p in new_pages)
    held.sort()
    held_set = set(held)
    train = [i for i in range(n) if i not in held_set and pages[i] not in held_pages]
    dropped = [i for i in range(n) if i not in held_set and pages[i] in held_pages]
    return Split(train=train, heldout=held, dropped=dropped, groups=groups, heldout_pages=held_pages)
