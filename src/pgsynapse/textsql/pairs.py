"""Training pairs of the SQL retrain: where they come from, the held-out split, and execution accuracy on them.

A pair is a corrected question: its text, the schema context its prompt carried, the session's earlier turns and
the statement that answers it. Execution accuracy runs a model's statement for a pair exactly as a user's would be
run (``check_sql``, then ``run_readonly`` as the reader role within the worker's limits) and compares its result
with the target statement's (``same_result``: in order only when the target orders at the top level).

The benchmark uses these directly (its pairs come from Spider, not from a corrections table): :class:`Pair`,
:func:`split_pairs`, :func:`run_targets` and :func:`evaluate`.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pgsynapse.queries import q
from pgsynapse.textsql.execute import run_readonly, same_result
from pgsynapse.textsql.generate import SqlPrompt
from pgsynapse.textsql.names import scope_parameters
from pgsynapse.textsql.safety import UnsafeSQL, check_sql


@dataclass(frozen=True)
class Pair:
    """One training pair: a question, the schema context its prompt carries, and the SQL that answers it."""

    question: str
    schema_context: str
    sql: str  # the target statement
    schema: str = "public"  # the question's target schema: the search path of the checks and runs
    allowed: tuple[tuple[str, str], ...] = ()  # (schema, table) the statements may read
    history: tuple[tuple[str, str], ...] = ()  # earlier (question, sql) turns of the session, oldest first
    correction_id: int | None = None
    question_id: int | None = None


# -- pairs and the split ---------------------------------------------------------------------------------------

def normalise_question(text: str) -> str:
    """The key of a question's group: case, accents' composition, punctuation and spacing do not count."""
    t = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", t).split())


def _side(key: str, seed: int) -> float:
    """A question's stable place in [0, 1): the same in every run, whatever else was corrected."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def split_pairs(pairs: Sequence[Pair], fraction: float, seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): a question is held out when the hash of its normalised text falls under ``fraction``,
    so whole groups of the same question go to one side, and a question keeps its side from one retrain to the
    next (while ``fraction`` and ``seed`` stay): the active model, trained by an earlier run, never saw the
    questions the next run judges it on. About ``fraction`` of the questions are held out; with two or more
    questions, at least one is held out and one trains (the lowest and highest hashes)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(normalise_question(p.question), []).append(i)
    ranked = sorted(groups, key=lambda k: (_side(k, seed), k))
    held_keys = {k for k in ranked if _side(k, seed) < fraction}
    if len(ranked) >= 2:
        held_keys = (held_keys | {ranked[0]}) - {ranked[-1]}
    else:
        held_keys = set()
    held = {i for k in held_keys for i in groups[k]}
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def load_pairs(conn: Any, role: str, *, history_turns: int = 0, max_question_chars: int = 4000) -> list[Pair]:
    """Every corrected question as a pair (its latest correction), in question order (``conn``: dict rows). The
    prompt is rebuilt as it was answered: its schema context, and the session's earlier answered turns (the
    ``history_turns`` setting, read as the sql_answer handler reads them). The tables a pair's statements may read
    are the question's scope that ``role`` may SELECT (every table of its schema, or its ``allowed_tables``)."""
    scopes: dict[tuple[str, tuple[str, ...] | None], tuple[tuple[str, str], ...]] = {}
    out = []
    for r in conn.execute(q("sql_training_pairs", "textsql_models.sql")).fetchall():
        names = tuple(r["allowed_tables"]) if r["allowed_tables"] is not None else None
        key = (r["target_schema"], names)
        if key not in scopes:
            found = conn.execute(q("readable_tables", "textsql.sql"), scope_parameters(r["target_schema"], names, role))
            scopes[key] = tuple((t["schema"], t["name"]) for t in found.fetchall() if t["readable"])
        history: tuple[tuple[str, str], ...] = ()
        if r["session_id"] is not None and history_turns:
            past = conn.execute(q("data_session_history", "textsql.sql"), {
                "session": r["session_id"], "before": r["question_id"], "limit": history_turns,
                "max_chars": max_question_chars}).fetchall()
            history = tuple((p["text"], p["sql"]) for p in reversed(past))
        out.append(Pair(r["question"], r["schema_context"] or "", r["target_sql"], r["target_schema"], scopes[key],
                        history, r["correction_id"], r["question_id"]))
    return out


# -- running statements ------------------------------------------------------------------------------------------

def ordered_target(sql: str) -> bool:
    """Whether the statement orders its result at the top level (then row order counts in the comparison)."""
    import pglast

    try:
        stmt = pglast.parse_sql(sql)[0].stmt
    except Exception:  # noqa: BLE001 - unparsable: the check refuses it anyway
        return False
    return bool(getattr(stmt, "sortClause", None))


@dataclass
class Outcome:
    """How one statement fared: ``correct``, ``wrong`` (another result), ``refused`` (the safety check, with its
    reason), ``failed`` (the statement errored or timed out) or ``no_sql`` (the model gave none)."""

    outcome: str
    sql: str = ""
    reason: str = ""
    seconds: float = 0.0


def run_statement(conn: Any, sql: str, pair: Pair, limits: Any, role: str) -> tuple[Any, Outcome | None]:
    """Check and run one statement for ``pair`` as the reader role: (result, None) or (None, what went wrong)."""
    if not sql.strip():
        return None, Outcome("no_sql", sql, "the model generated no statement")
    try:
        checked = check_sql(sql, allowed=pair.allowed, search_path=(pair.schema,))
    except UnsafeSQL as exc:
        return None, Outcome("refused", sql, exc.reason)
    try:
        return run_readonly(conn, checked, limits, role=role, search_path=(pair.schema,)), None
    except UnsafeSQL as exc:  # refused once the catalog was seen (a function of the schema)
        return None, Outcome("refused", sql, exc.reason)
    except Exception as exc:  # noqa: BLE001 - QueryFailed, or the connection's own error: the statement failed
        return None, Outcome("failed", sql, " ".join(str(exc).split())[:300])


def run_targets(conn: Any, pairs: Sequence[Pair], limits: Any, role: str) -> tuple[list[Pair], list[Any], Counter]:
    """The pairs whose target SQL passes the check and runs, their results, and the others counted by reason
    (``target_refused:<reason>``, ``target_failed``)."""
    kept, results, dropped = [], [], Counter()
    for p in pairs:
        result, bad = run_statement(conn, p.sql, p, limits, role)
        if bad is not None:
            dropped["target_" + (f"refused:{bad.reason}" if bad.outcome == "refused" else bad.outcome)] += 1
            continue
        kept.append(p)
        results.append(result)
    return kept, results, dropped


@dataclass
class Evaluation:
    """A model's execution accuracy on pairs, and how each pair went."""

    outcomes: list[Outcome]
    seconds: float

    @property
    def correct(self) -> list[bool]:
        return [o.outcome == "correct" for o in self.outcomes]

    def summary(self) -> dict[str, Any]:
        n = len(self.outcomes)
        counts = Counter(o.outcome for o in self.outcomes)
        refused = Counter(o.reason for o in self.outcomes if o.outcome == "refused")
        return {"accuracy": counts["correct"] / n if n else None, "pairs": n, "correct": counts["correct"],
                "wrong": counts["wrong"], "failed": counts["failed"], "no_sql": counts["no_sql"],
                "refused": counts["refused"], "refused_by_reason": dict(sorted(refused.items())),
                "seconds": round(self.seconds, 2)}


def evaluate(generator: Any, pairs: Sequence[Pair], targets: Sequence[Any], conn: Any, limits: Any, role: str,
             *, on_pair: Callable[[int, Outcome], None] | None = None) -> Evaluation:
    """Execution accuracy of ``generator`` on ``pairs`` (greedy, one statement each), against the results of their
    targets (:func:`run_targets`): check, run as ``role`` within ``limits`` (``conn``: an idle autocommit
    connection), compare (ordered only when the target orders at the top level). ``on_pair(i, outcome)`` after
    each pair."""
    started = time.time()
    outcomes = []
    for i, (p, target) in enumerate(zip(pairs, targets, strict=True)):
        t0 = time.time()
        try:
            [sql] = generator.generate(SqlPrompt(p.question, p.schema_context, p.history), n=1)[:1]
        except Exception as exc:  # noqa: BLE001 - a model that cannot answer this prompt gets it wrong
            outcomes.append(Outcome("failed", "", f"generation failed: {type(exc).__name__}: {exc}"[:300]))
            if on_pair:
                on_pair(i, outcomes[-1])
            continue
        result, bad = run_statement(conn, sql, p, limits, role)
        if bad is None:
            bad = Outcome("correct" if same_result(target, result, ordered=ordered_target(p.sql)) else "wrong", sql)
        bad.seconds = round(time.time() - t0, 3)
        outcomes.append(bad)
        if on_pair:
            on_pair(i, bad)
    return Evaluation(outcomes, time.time() - started)
