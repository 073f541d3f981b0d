"""The retrain gate's canary set: questions built once from the corpus, not from feedback, then frozen.

Feedback comes from the users the model already serves, in their templates; the canary set asks about the rest of
the corpus in other words, so a candidate that forgets what the base model knew shows it there. One question per
document, for documents picked by a hash of their source (or title): the same corpus gives the same set, whatever
the ids or the order of insertion. Each question is phrased from one part of its document (the patterns of
train.synthetic_pairs, asked as a user would, not as a training pair is written), picked by a hash among:

- ``summary``: a reference page's "NAME — what it does" line -> "How can I <what it does>?" /
  "Which command would <what it does>?" (a page with one: only these);
- ``parameter``: a configuration entry "name (type)" -> "What is the name parameter for?" (else these);
- ``title``: the page title without its number -> "Where can I read about <title>?", and
- ``heading``: a numbered section heading -> "Where is <heading> explained?" (a generic one-word title or
  heading, "Overview", is not asked: many pages share it).

Built by the first retrain (:func:`ensure_canary`, in one transaction under a table lock, so two workers never
build two), stored in ``pgsynapse.canary_questions`` with the active version it was frozen with, and never rebuilt
automatically: :func:`rebuild_canary` (``pgsynapse canary rebuild``) replaces it on request, a ``canary_rebuilt``
model event records it, and after one an empty set (``--size 0``) stays empty: the gate checks no canary. The
trainer scores every candidate on it and leaves its documents out of its corpus-only pairs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)

_SUMMARY = re.compile(r"^([A-Z][A-Z ]+) — (.+)$")
_HEADING = re.compile(r"^(?:[A-Z]\.|\d+\.)(?:\d+\.)+\s+(\S.{3,80})$")
_PARAMETER = re.compile(r"^([a-z_][a-z0-9_.]*) \((integer|boolean|string|enum|floating point|real)\)")
_NUMBER = re.compile(r"^(?:(?:Chapter|Part|Appendix) )?(?:[A-Z]\.|[IVXLC]+\.|\d+\.)(?:\d+\.)*\s*")


@dataclass(frozen=True)
class CanaryQuestion:
    question: str
    document_id: int
    origin: str


def _rank(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _topic(text: str) -> str | None:
    """A title or heading as the object of a question: its number gone, capitalised words in lower case
    ("Snapshot Synchronization Functions" -> "snapshot synchronization functions", "GEQO" and "SPI_connect" as
    they are); None for a generic one-word topic ("Overview", "Concepts") that many pages share."""
    words = _NUMBER.sub("", text).strip().rstrip(".").split()
    if not words or (len(words) == 1 and words[0].isalpha()):
        return None
    return " ".join(w.lower() if w[:1].isupper() and w[1:].islower() else w for w in words)


def _candidates(title: str, body: str) -> list[tuple[str, str]]:
    """(origin, question) candidates of one document: its summary line, else its configuration parameters,
    else its title and section headings."""
    lines = body.split("\n")
    m = _SUMMARY.match(lines[1].strip()) if len(lines) > 1 else None
    if m:
        what = m.group(2).strip().rstrip(".")
        return [("summary", f"How can I {what}?"), ("summary", f"Which command would {what}?")]
    params = [p.group(1) for p in map(_PARAMETER.match, lines[2:]) if p]
    if params:
        return [("parameter", f"What is the {name} parameter for?") for name in params]
    out: list[tuple[str, str]] = []
    t = _topic(title or "")
    if t:
        out.append(("title", f"Where can I read about {t}?"))
    for h in map(_HEADING.match, lines[2:]):
        topic = _topic(h.group(1)) if h else None
        if topic:
            out.append(("heading", f"Where is {topic} explained?"))
    return out


def build_questions(documents: Iterable[tuple[int, str, str, str]], size: int) -> list[CanaryQuestion]:
    """At most ``size`` questions, one per document, from ``(id, source, title, body)`` rows: documents in
    the order of a hash of their source (else title), each asked from its most preferred origin (the question
    among that origin's candidates picked by a hash too). Deterministic for the same corpus."""
    picked: list[tuple[str, CanaryQuestion]] = []
    for doc_id, source, title, body in documents:
        cands = _candidates(title, body)
        if not cands:
            continue
        key = source or title or str(doc_id)
        origin, question = min(cands, key=lambda c: _rank("canary-question", key, c[1]))
        picked.append((_rank("canary-document", key), CanaryQuestion(question, doc_id, origin)))
    picked.sort(key=lambda p: p[0])
    return [c for _, c in picked[:size]]


def _build(conn: psycopg.Connection, version: int | None, size: int) -> int:
    rows = conn.execute(q("canary_sources", "canary.sql")).fetchall()
    docs = [(r["id"], r["source"], r["title"], r["body"]) if isinstance(r, dict) else tuple(r) for r in rows]
    questions = build_questions(docs, size)
    with conn.cursor() as cur:
        cur.executemany(q("insert_canary", "canary.sql"), [
            {"question": c.question, "document_id": c.document_id, "origin": c.origin, "version": version}
            for c in questions])
    return len(questions)


def ensure_canary(conn: psycopg.Connection, version: int | None, size: int) -> dict[str, Any]:
    """Build the canary set if there is none yet (frozen with ``version``); a built set is left as it is, and so is
    an empty one an operator's rebuild left. Returns ``{"built": bool, "questions": n}`` (n = 0 when none was
    built)."""
    with conn.transaction():
        conn.execute(q("lock_canary", "canary.sql"))
        row = conn.execute(q("canary_exists", "canary.sql")).fetchone()
        built, rebuilt = (row["built"], row["rebuilt"]) if isinstance(row, dict) else row
        if built or rebuilt or size <= 0:
            return {"built": False, "questions": 0}
        n = _build(conn, version, size)
    log.info("canary_built", questions=n, version=version, size=size)
    return {"built": True, "questions": n}


def rebuild_canary(conn: psycopg.Connection, version: int | None, size: int, *, actor: str = "cli") -> int:
    """Replace the canary set with one built from today's corpus (an operator's decision, never automatic), and
    record it: a ``canary_rebuilt`` event of ``version`` (the active one), after which no retrain builds a set, so
    an empty one (``size`` 0) stays empty."""
    with conn.transaction():
        conn.execute(q("lock_canary", "canary.sql"))
        deleted = conn.execute(q("delete_canary", "canary.sql")).rowcount
        n = _build(conn, version, size)
        if version is not None:  # an event names a version; a database always has an active one once migrated
            conn.execute(q("insert_model_event", "learning.sql"), {
                "version": version, "event": "canary_rebuilt", "actor": actor,
                "reason": f"canary set rebuilt from today's corpus: {n} questions (size {size})",
                "figures": Jsonb({"questions": n, "replaced": deleted, "size": size})})
    log.info("canary_rebuilt", questions=n, replaced=deleted, version=version, size=size)
    return n


def canary_command(conn: psycopg.Connection, action: str, size: int) -> str:
    """``pgsynapse canary [show|rebuild]``: what the set holds, or a rebuild frozen with the active version."""
    if action == "rebuild":
        active = conn.execute(q("active_version")).fetchone()
        version = active["id"] if active else None
        n = rebuild_canary(conn, version, size)
        if not n and size > 0:  # asked for some: the corpus gives none
            return ("canary set rebuilt: 0 questions: no document of the corpus gives one (a canary question is "
                    "asked from a \"NAME — what it does\" line, a configuration parameter, a title of more than one "
                    "word or a numbered section heading), so the retrain gate checks no canary set; rebuild it once "
                    "the corpus has such documents")
        if not n:
            return ("canary set rebuilt: 0 questions: the retrain gate checks no canary set, and no retrain builds "
                    "one (`pgsynapse canary rebuild --size N` does)")
        return f"canary set rebuilt: {n} questions, frozen with model version {version}"
    rows = conn.execute(q("canary_summary", "canary.sql")).fetchall()
    if not rows:
        last = conn.execute(q("last_canary_rebuild", "canary.sql")).fetchone()
        if last is not None:
            return (f"no canary set: emptied by `pgsynapse canary rebuild` at {last['at']:%Y-%m-%d %H:%M:%S %Z} "
                    f"(size {last['figures'].get('size')}); the retrain gate checks no canary and no retrain builds "
                    "one (`pgsynapse canary rebuild --size N` does)")
        # not "the first retrain": a retrain on a corpus that gives no question builds none, and the next tries again
        return ("no canary set yet: the next retrain builds it from the corpus once its documents give canary "
                "questions (or run `pgsynapse canary rebuild`)")
    total = sum(r["n"] for r in rows)
    parts = ", ".join(f"{r['origin']} {r['n']}" for r in rows)
    return (f"canary set: {total} questions ({parts}), frozen with model version {rows[0]['version']} "
            f"at {rows[0]['created_at']:%Y-%m-%d %H:%M:%S %Z}")
