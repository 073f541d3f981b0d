"""What every answerer shares: the request (question, ranked passages, history), the answer, the protocol."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from collections.abc import Callable
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
    # what a check found and recorded on the row (questions.flags), e.g. "invalid_citations: [7] cited, ..."
    flags: list[str] = field(default_factory=list)


class AnswerStopped(Exception):
    """Raised by an ``on_delta`` to stop a generation whose answer nobody will read (its question was edited or
    deleted meanwhile). Answerers let it through: it ends the model's loop at the piece it was raised on."""


class Answerer(Protocol):
    name: str

    def answer(self, req: Request, on_delta: Callable[[str], None] | None = None) -> Answer:
        """The answer. A generator calls ``on_delta(piece)`` with each new piece of text as it is generated (the
        pieces concatenate to the streamed text); an answerer that does not stream may ignore it. An
        :class:`AnswerStopped` raised by ``on_delta`` stops the generation and goes through to the caller."""


_SENTENCE = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][)\"']))\s+(?=[A-Z0-9(\"'])|\n{2,}")
_ENDS = re.compile(r"[.!?][)\"']?$")
_HEADING_CHARS = 60  # a line under this without an end mark is a heading (or code), not the start of a wrapped sentence
_MIN_CHARS = 12
# a line ending a statement (code: "CREATE INDEX ... (jdoc);") is never continued; a line ending with ":" introduces
# what follows (code, a list) and is continued only by a wrapped line in lower case
_STATEMENT_END = re.compile(r"[;{}]$")
# a synopsis line ("UNIQUE [ NULLS [ NOT ] DISTINCT ] ( column_name [, ... ] )"): syntax, never part of a sentence
_SYNOPSIS = re.compile(r"\[ .*\]|\{ .* \| .*\}")
# a line that names what the lines under it describe, as the docs list them: a setting with its type ("work_mem
# (integer)"), an SQL option in capitals ("CONCURRENTLY", "IF EXISTS", "WITH [ NO ] DATA"), a command-line flag
# ("--jobs=njobs")
_TERM = re.compile(r"(?:[a-z_][a-z0-9_.]* \((?:integer|boolean|string|enum|floating point)\)"
                   r"|[A-Z][A-Z0-9_ \[\]|()-]{1,38}|--?[A-Za-z][\w-]*(?:[ =]\S+)?)$")


def _lines(text: str) -> list[str]:
    """The text's lines, a hard-wrapped sentence joined again. A line is continued by the next one when it has no
    end mark and the next starts in lower case, or when it is long and the next is long too or ends the sentence
    (a heading, "Compatibility", then "The command ...": two lines); never after a statement's end (code) or a
    synopsis, and after a colon only in lower case (what a colon introduces, code or a list, is not the sentence's
    end)."""
    out: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            out.append("")
            continue
        prev = out[-1] if out else ""
        if prev and not _ENDS.search(prev) and not _STATEMENT_END.search(prev) and not _SYNOPSIS.search(prev) and (
                line[0].islower() or (not prev.endswith(":") and len(prev) >= _HEADING_CHARS
                                      and (len(line) >= 40 or _ENDS.search(line)))):
            out[-1] = f"{prev} {line}"
        else:
            out.append(line)
    return out


def sentence_runs(text: str) -> list[tuple[str, bool]]:
    """``(sentence, follows)`` for each prose sentence of ``text``: one that ends with an end mark (. ! ?) and has
    12 characters or more; headings, synopses, code and lines that introduce code ("To abort all changes:") are
    left out. ``follows``: the sentence comes right after the previous one kept, nothing left out between them (so
    a sentence that leans on its predecessor, "They have no effect.", can be quoted with it). The first sentence
    under a line that names a setting, an option or a flag (:data:`_TERM`) is that line's description, without a
    subject of its own ("Sets the base maximum amount of memory ..."): it comes with the name, ``"work_mem
    (integer): Sets ..."``."""
    out: list[tuple[str, bool]] = []
    follows = False
    term = None
    for line in _lines(text):
        for s in _SENTENCE.split(line):
            s = " ".join(s.split())
            if len(s) >= _MIN_CHARS and _ENDS.search(s):
                out.append((f"{term}: {s}" if term else s, follows))
                follows = True
            elif s:
                follows = False
            term = None
        term = line if _TERM.match(line) else None
    return out


def named(sentence: str) -> bool:
    """Whether ``sentence`` comes with the name it describes, as :func:`sentence_runs` gives a description
    (``"--pgdata=directory: This option specifies ..."``): what it says "this option" of is in it."""
    name, sep, _ = sentence.partition(": ")
    return bool(sep) and bool(_TERM.match(name))


def split_sentences(text: str, *, prose_only: bool = True) -> list[str]:
    """The sentences of ``text``: its prose sentences (:func:`sentence_runs`); with ``prose_only`` off (an answer's
    own text, whose last sentence may be cut), every piece of 20 characters or more between sentence ends and
    line breaks."""
    if prose_only:
        return [s for s, _ in sentence_runs(text)]
    out = []
    for line in text.split("\n"):
        for s in _SENTENCE.split(line):
            s = " ".join(s.split())
            if len(s) >= 20:
                out.append(s)
    return out
