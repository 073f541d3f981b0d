"""A generated answer's citations, checked against the passages the model was given.

An answer citing a passage it was not given (``[7]`` when five were given, or a passage the prompt budget left
out) is flagged, or refused under ``citation_policy = "refuse"``; the flag says which citations. Sources list the
cited passages in rank order; an answer that cites nothing lists every passage it was given, and is flagged
``uncited``; an answer that says it found nothing (every sentence, cited or not) is the plain not-found answer,
without sources. An answer that is citations and nothing else ("[1]", "[1] [2]": small models write them) is
flagged ``no_text``; one that pastes a passage as the prompt shows it ("[1] Title: its text", a third of
Qwen2.5-Coder-0.5B's answers on the docs corpus at a 512-token context) is flagged ``pasted_passage``. For both the
answer handler answers from the same passages with the extractive answerer instead.
"""

from __future__ import annotations

import re
from typing import Literal

from pgsynapse.answerers.base import NOT_FOUND, Answer, Passage

REFUSED_ANSWER = "The generated answer cited passages it was not given, so it was withheld."

CitationPolicy = Literal["flag", "refuse"]

_GROUP = re.compile(r"\[\s*(\d{1,4}(?:\s*[,;]\s*\d{1,4})*)\s*\]")
_WORD = re.compile(r"[^\W\d_]{2,}")  # two letters in a row: the text says something besides its citations
_LEADING_CITATIONS = re.compile(rf"^(?:\s*{_GROUP.pattern})*\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
PASTE_CHARS = 40  # this much of a passage's text right after its label: pasted, not said
_NOT_FOUND = re.compile(r"\b(could not|couldn't|cannot|can't|unable to) find\b|\bdo(es)? not (contain|mention)\b",
                        re.IGNORECASE)


def cited_ranks(text: str) -> list[int]:
    """The passage numbers cited as [n], [n, m] or [n][m], in order of first appearance."""
    out: list[int] = []
    for group in _GROUP.findall(text):
        for n in re.split(r"\s*[,;]\s*", group.strip()):
            if int(n) not in out:
                out.append(int(n))
    return out


def checked_answer(text: str, passages: list[Passage], policy: CitationPolicy = "flag", *,
                   cut: str | None = None) -> Answer:
    """The final answer of a generator from its text and the passages it was given. ``cut``: why the generator
    stopped before it had finished (its token limit), when it did: the answer says so in its flags."""
    text = text.strip()
    if not text or says_not_found(text):
        return Answer(NOT_FOUND, [])
    answer = _checked(text, passages, policy)
    if answer.text == text and not _WORD.search(_GROUP.sub(" ", text)):
        answer.flags.append("no_text")
    elif answer.text == text and pasted(text, passages):
        answer.flags.append("pasted_passage")
    if cut and answer.text == text:
        answer.flags.append(f"truncated: {cut}")
    return answer


def token_limit_cut(limit: int) -> str:
    """The ``truncated`` flag's reason for an answer that stopped at ``answer_max_new_tokens``."""
    return f"it stopped at answer_max_new_tokens ({limit}) before it had finished"


def says_not_found(text: str) -> bool:
    """Whether every sentence of ``text`` says that nothing was found ("[1] No, you could not find it."): small
    models cite a passage even then."""
    sentences = [s for s in _SENTENCE_END.split(_GROUP.sub(" ", text).strip()) if _WORD.search(s)]
    return bool(sentences) and all(_NOT_FOUND.search(s) for s in sentences)


def pasted(text: str, passages: list[Passage]) -> bool:
    """Whether ``text`` starts as a passage is shown in the prompt (prompting.passages_block): its title and a colon,
    after citations or none, then the start of its text."""
    rest = _LEADING_CITATIONS.sub("", text, count=1)
    for p in passages:  # the passages of one page share its title: any of them may be the one pasted
        label = f"{p.title}:"
        if p.title and rest.startswith(label):
            said = " ".join(rest[len(label):].split())[:PASTE_CHARS]
            if said and said in " ".join(p.text.split()):
                return True
    return False


def _checked(text: str, passages: list[Passage], policy: CitationPolicy) -> Answer:
    cited = cited_ranks(text)
    given = {p.rank: p for p in passages}
    invalid = [n for n in cited if n not in given]
    if invalid:
        ranks = sorted(given)
        flag = (f"invalid_citations: {' '.join(f'[{n}]' for n in invalid)} cited, "
                f"{'passages ' + ', '.join(map(str, ranks)) if ranks else 'no passage'} given")
        if policy == "refuse":
            return Answer(REFUSED_ANSWER, [], flags=[flag, "refused"])
        valid = [given[n] for n in sorted(set(cited) - set(invalid))]
        return Answer(text, [p.as_source() for p in valid], flags=[flag])
    if not cited:
        if _NOT_FOUND.search(text):
            return Answer(NOT_FOUND, [])
        return Answer(text, [p.as_source() for p in passages], flags=["uncited"])
    return Answer(text, [given[n].as_source() for n in sorted(cited)])
