"""The semantic answer cache (``pgsynapse.answer_cache``, migration 0011): frequent questions answered in milliseconds.

A question is answered from an earlier answer when its query embedding is at least ``answer_cache_threshold``
cosine-similar to that earlier question's, under the same model version, the same answerer settings
(:func:`settings_key`) and the same guardrail rules (:func:`rules_key`), and every document the earlier answer
cites still has the content it had then. The row gets the original's answer and sources, ``answerer = 'cache'``
and ``cached_from`` = the original question's id.

What is never cached, and never answered from the cache (:meth:`AnswerCache.may_serve`, :meth:`AnswerCache.may_store`):

- blocked and failed questions; an answer that a guardrail rule flagged (the question or the answer): a cached
  answer is served only to a question that matched no rule, under the same rules, so its outcome is the same;
- the "not found" answer and an answer without sources: nothing cited, nothing invalidates it, and a document added
  later may answer it;
- a session's follow-up that has history: its retrieval and answer depend on the turns before it;
- an answer with flags (e.g. citations the generator was not given);
- a question answered under other settings (answerer, its model, top_k, hybrid, not_found_threshold, a generator's
  token budgets and citation policy, pgsynapse's version): those are part of the entry's key;
- a question whose exact terms (:func:`exact_terms`: identifiers and numbers such as ``dblink_connect_u``,
  ``int8``, ``15``, SQL command verbs, negations and words of direction or degree) differ from the earlier
  question's, however similar the embeddings: "what does dblink_connect do" and "what does dblink_connect_u do"
  are 0.94 similar and want different pages; "how do I make a column nullable?" and "... not nullable?" are 0.98
  similar and want opposite answers;
- a question that puts the earlier question's things in swapped roles (:func:`swapped_roles`: what "to", "into",
  "from", "as" or "than" mark): "cast text to integer" and "cast integer to text" are 0.996 similar (a sentence
  embedding is close to a bag of words), and one with the earlier question's words in another order ("can a view
  reference a materialized view" and the other way round).

:func:`may_share` is the rule, one pair at a time.

Questions of one batch are looked up before any of them is written, so they never hit each other.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from pgsynapse import __version__
from pgsynapse.answerers import NOT_FOUND, Answer
from pgsynapse.answerers.extractive import ExtractiveAnswerer
from pgsynapse.config import Settings
from pgsynapse.logs import get_logger
from pgsynapse.metrics import answer_cache_outcome
from pgsynapse.queries import q

log = get_logger(__name__)

NEAREST = 8  # entries the kNN returns before the other conditions filter them
ANSWERER = "cache"  # questions.answerer of a cache hit


@dataclass(frozen=True)
class Hit:
    question_id: int  # the original question
    answer: Answer
    similarity: float


_TERM = re.compile(r"\w+")
# the verbs of SQL commands: "ALTER LANGUAGE syntax" and "DROP LANGUAGE syntax" are 0.85 similar
SQL_VERBS = frozenset("create alter drop insert update delete truncate select grant revoke copy vacuum analyze "
                      "reindex cluster lock comment".split())


# words that turn a question around or set its direction or degree, each group to one term: "nullable" and "not
# nullable" are 0.98 similar, "increase" and "decrease shared_buffers" 0.93, "why is my query slow / fast" 0.95. A
# question with some of these is served only an answer to a question with the same ones ("largest" and "biggest"
# are one); a paraphrase that words them otherwise is answered afresh: a miss costs time, a false hit a wrong answer.
# "Why", "when", "where" and "who" ask different things ("why / when does VACUUM lock a table": 0.92); "all" and
# "one" count different things ("truncate every / one table in a schema": 0.95). Words common in paraphrases of one
# question are left out ("same": "the type of" / "the same type as"; "up", "down": "set up", "back up"; "how",
# "what", "which"). Chosen on the tune half of bench/data/cache_contrasts.jsonl (bench.answer_cache).
_GROUPS = """
    not: not no never without cannot nor none neither
    enable: enable enables enabled enabling | disable: disable disables disabled disabling
    add: add adds added adding | remove: remove removes removed removing
    start: start starts started starting | stop: stop stops stopped stopping | restart: restart restarts restarted
    increase: increase increases increased increasing raise raises raised raising
    decrease: decrease decreases decreased decreasing reduce reduces reduced reducing
    max: maximum max largest biggest greatest highest most | min: minimum min smallest lowest least fewest
    more: more greater higher larger bigger | less: less fewer lesser smaller
    fast: fast faster fastest quick quicker quickest | slow: slow slower slowest
    import: import imports imported importing | export: export exports exported exporting
    unlock: unlock unlocks unlocked unlocking
    allow: allow allows allowed allowing permit permits
    deny: deny denies denied disallow prevent prevents forbid block
    accept: accept accepts accepted accepting | reject: reject rejects rejected rejecting
    include: include includes included including | exclude: exclude excludes excluded excluding
    before: before | after: after | first: first | last: last | upper: upper uppercase | lower: lower lowercase
    open: open opens opened | close: close closes closed | connect: connect connects connected connecting
    disconnect: disconnect disconnects disconnected
    attach: attach attaches attached | detach: detach detaches detached
    encrypt: encrypt encrypted encrypting | decrypt: decrypt decrypted decrypting
    compress: compress compressed compressing | decompress: decompress decompressed decompressing
    true: true | false: false | above: above | below: below | grow: grow grows | shrink: shrink shrinks
    ascending: ascending asc | descending: descending desc | inner: inner | outer: outer | left: left | right: right
    read: read reads reading | write: write writes writing | private: private | public: public
    enter: enter | exit: exit | upgrade: upgrade upgrades upgrading | downgrade: downgrade downgrades downgrading
    succeed: succeed succeeds success successful | fail: fail fails failed failure failing
    valid: valid | invalid: invalid | visible: visible | invisible: invisible
    temporary: temporary | permanent: permanent | synchronous: synchronous | asynchronous: asynchronous
    logged: logged | unlogged: unlogged | oldest: oldest | newest: newest | older: older | newer: newer
    different: different
    why: why | when: when | where: where | who: who | all: all every each | one: one single
"""
CONTRASTS = {word: group.strip() for entry in _GROUPS.replace("\n", "|").split("|") if entry.strip()
             for group, words in [entry.split(":")] for word in words.split()}
_NOT = re.compile(r"n['\u2019]t\b", re.IGNORECASE)  # "doesn't", "can't": read as "not"


def exact_terms(text: str) -> frozenset[str]:
    """The terms of a question that an answer depends on exactly, case-folded: its words with an underscore or a
    digit (``dblink_connect_u``, ``int8``, ``15``), the verbs of SQL commands, and the group of each of its
    negations and words of direction or degree (:data:`CONTRASTS`; "n't" is "not")."""
    out = set()
    for t in _TERM.findall(_NOT.sub(" not", text)):
        t = t.casefold()
        if "_" in t or any(c.isdigit() for c in t) or t in SQL_VERBS:
            out.add(t)
        elif t in CONTRASTS:
            out.add(CONTRASTS[t])
    return frozenset(out)


def settings_key(s: Settings) -> str:
    """Everything besides the model version and the passages that shapes an answer."""
    generation = f"tokens={s.answer_max_new_tokens} context={s.answer_context_tokens} citations={s.citation_policy}"
    local = f"{s.answerer_model_path} {generation}"
    # another endpoint may serve another model under the same name; the URL is a secret setting (it may carry a
    # token), and the key is stored in the answer_cache table: only its hash is in the key
    endpoint = hashlib.sha256((s.openai_base_url or "").encode()).hexdigest()[:16]
    model = {"transformers": local, "llama-cpp": local, "openai": f"{endpoint} {s.openai_model} {generation}"}
    # the extractive answerer answers every question a generator leaves without text too: its revision is in the key
    return (f"pgsynapse={__version__} answerer={s.answerer} extractive={ExtractiveAnswerer.revision} "
            f"model={model.get(s.answerer, '')} k={s.answer_top_k} "
            f"hybrid={int(s.hybrid)}"
            f"{f' text_weight={s.hybrid_text_weight} text_max_rows={s.hybrid_text_max_rows}' if s.hybrid else ''} "
            f"not_found={s.not_found_threshold}")


def rules_key(rules: list[dict[str, Any]]) -> str:
    """The enabled guardrail rules as one hash: an entry is served only under the rules it was answered under."""
    canon = sorted((int(r["id"]), r["text"], r["action"], float(r["threshold"])) for r in rules)
    return hashlib.md5(json.dumps(canon).encode()).hexdigest()


def lookup_sql(version: dict[str, Any]) -> str:
    """The lookup of one model version, its dim and id formatted in (integers) so its partial index applies."""
    return (q("lookup", "answer_cache.sql").replace("{dim}", str(int(version["dim"])))
            .replace("{version}", str(int(version["id"]))))


# words that name no thing of their own: a question's things, in order, are its other words
_ORDERLESS = frozenset(
    "a an the and or of in on at by for with to from into as than is are be do does did can could should would will "
    "i my me we our you your it its this that these those there how what which who why when where".split())
# the words that mark where a thing goes or comes from, each group to one role, and the words skipped before the
# thing they mark ("to an integer" marks "integer")
_ROLES = {"to": "to", "into": "to", "onto": "to", "from": "from", "as": "as", "than": "than"}
_DETERMINERS = frozenset("a an the its my your our their this that these those some any each every".split())


def _roles(words: list[str]) -> dict[str, set[str]]:
    """What each role word marks: the first word after it that is no determiner."""
    out: dict[str, set[str]] = {}
    for i, w in enumerate(words):
        if w in _ROLES:
            thing = next((x for x in words[i + 1:] if x not in _DETERMINERS), None)
            if thing is not None:
                out.setdefault(_ROLES[w], set()).add(thing)
    return out


def swapped_roles(text: str, other: str) -> bool:
    """Whether two questions put the same things in swapped roles (a sentence embedding is close to a bag of words,
    so they are 0.98-0.996 similar):

    - what "to", "into", "from", "as" or "than" marks: "cast text to integer" and "cast integer to text" mark
      different things, each of which the other question names too;
    - subject and object: "can a view reference a materialized view" and "can a materialized view reference a
      view" have the same words in another order. Words joined by "and" or "or" may come in any order ("options
      and syntax of X", "X syntax and options").

    A rewording that keeps the roles ("convert text into an integer"), adds or drops words, or names another thing
    is not a swap."""
    wa, wb = ([w.casefold() for w in _TERM.findall(t)] for t in (text, other))
    a, b = _roles(wa), _roles(wb)
    if any(a[r] != b[r] and (a[r] - b[r]) <= set(wb) and (b[r] - a[r]) <= set(wa) for r in a.keys() & b.keys()):
        return True
    ca, cb = ([w for w in words if w not in _ORDERLESS] for words in (wa, wb))
    return ca != cb and sorted(ca) == sorted(cb) and not ({"and", "or"} & {*wa, *wb})


def may_share(question: str, earlier: str) -> bool:
    """Whether ``question`` may be served the answer of ``earlier``, besides their embeddings' similarity: the
    same exact terms, and no things in swapped roles."""
    return exact_terms(question) == exact_terms(earlier) and not swapped_roles(question, earlier)


class AnswerCache:
    """Look up, store and count cached answers; ``enabled`` follows the ``answer_cache`` setting."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = settings.answer_cache
        self.settings_key = settings_key(settings)
        self.rules_key = rules_key([])

    def refresh_rules(self, rules: list[dict[str, Any]]) -> None:
        self.rules_key = rules_key(rules)

    def may_serve(self, *, guardrail: dict[str, Any] | None, history: list[Any]) -> bool:
        """Whether a question may be answered from the cache: no guardrail match, no history."""
        return self.enabled and guardrail is None and not history

    def may_store(self, answer: Answer, *, status: str, guardrail: dict[str, Any] | None, history: list[Any]) -> bool:
        """Whether a fresh answer may be served again later."""
        return (self.enabled and status == "answered" and guardrail is None and not history
                and answer.text != NOT_FOUND and bool(answer.sources) and not getattr(answer, "flags", None))

    def key(self, ranker: int | None) -> str:
        """The settings key of an entry: the answerer's settings, and the ranker that ordered its passages (an
        answer of one ranker is never served to a session of another: their A/B test stays clean)."""
        return self.settings_key if ranker is None else f"{self.settings_key}:ranker={int(ranker)}"

    async def lookup(self, conn: psycopg.AsyncConnection, version: dict[str, Any], question: str,
                     vector: np.ndarray, question_id: int, *, rules: str, ranker: int | None = None) -> Hit | None:
        """``rules``: the :func:`rules_key` of the rules the question was checked under."""
        s = self.settings
        rows = await (await conn.execute(lookup_sql(version), {
            "query": vector, "k": NEAREST, "threshold": s.answer_cache_threshold, "settings_key": self.key(ranker),
            "rules_key": rules, "max_age": s.answer_cache_max_age_seconds})).fetchall()
        row = next((r for r in rows if may_share(question, r["question"])), None)
        answer_cache_outcome(version["id"], "hit" if row else "miss")
        if row is None:
            return None
        hit = Hit(row["question_id"], Answer(row["answer"], row["sources"]), float(row["similarity"]))
        log.info("answer_cache_hit", question=question_id, cached_from=hit.question_id,
                 similarity=round(hit.similarity, 4), version=version["id"])
        return hit

    async def lock(self, conn: psycopg.AsyncConnection, question_ids: list[int], hits: list[Hit]) -> None:
        """Lock the entries that :meth:`written` of these questions may change (their own, and those their hits
        count), in question id order: before the first :meth:`written` of a write, after its questions' rows."""
        if self.enabled:
            await conn.execute(q("lock_entries", "answer_cache.sql"),
                               {"ids": sorted({*question_ids, *(h.question_id for h in hits)})})

    async def written(self, conn: psycopg.AsyncConnection, question_id: int, *, version: int, answer: Answer,
                      hit: Hit | None, store: bool, vector: np.ndarray | None, rules: str,
                      ranker: int | None = None) -> None:
        """After an answer's write, in its transaction: mark a hit (its origin and the entry's count), or store a
        fresh answer that may be served again, or forget an earlier entry of this question that may not.
        ``rules``: the :func:`rules_key` its batch was loaded under; the rules read since by another batch (the
        worker's loops share this cache) differ when they changed meanwhile, and then nothing is stored: its
        question was checked under the old rules, its answer under either.
        Nothing while the cache is off: entries left from before are not served, and a hit needs it on."""
        if not self.enabled:
            return
        await conn.execute(q("mark_origin", "answer_cache.sql"),
                           {"id": question_id, "origin": hit.question_id if hit else None})
        if hit is not None:
            await conn.execute(q("count_hit", "answer_cache.sql"), {"origin": hit.question_id})
        elif store and vector is not None and rules == self.rules_key:
            await conn.execute(q("store", "answer_cache.sql"), {
                "id": question_id, "version": version, "settings_key": self.key(ranker), "rules_key": rules,
                "embedding": vector, "answer": answer.text, "sources": Jsonb(answer.sources),
                "documents": sorted({int(src["document_id"]) for src in answer.sources}),
                "chunks": sorted({int(src["chunk_id"]) for src in answer.sources})})
        else:
            await conn.execute(q("forget", "answer_cache.sql"), {"id": question_id})


async def expire(conn: psycopg.AsyncConnection, max_age_seconds: float) -> int:
    """Delete entries past ``max_age_seconds`` (never served any more); 0 = no age limit. Returns the rows removed."""
    if max_age_seconds <= 0:
        return 0
    cur = await conn.execute(q("expire", "answer_cache.sql"), {"max_age": max_age_seconds})
    return cur.rowcount
