"""The ``sql_answer`` job: a question about the data becomes one checked, read-only SELECT and its result.

load: the question, its session's earlier turns, the SQL model it is routed to (sql_models, A/B by session like the
text versions; none registered: the settings' model). compute (a thread, outside any transaction, on its own
autocommit connection): the schema context from the catalog (only what the reader role may read), the statement
(or several for self-consistency), ``safety.check_sql``, ``execute.run_readonly``. write: the statement, the
result or the reason on the row, under the stale-write guard, and a NOTIFY on ``pgsynapse_data_answers``.

Fix turns (``sql_fix_attempts``): when no candidate ran and one failed in Postgres with an error a rewrite can fix
(``QueryFailed.fixable_error``: an unknown column, a scalar subquery of several rows...), the model is asked again,
greedily, with its statement and the server's message as extra chat turns, and the corrected statement goes
through the same check and read-only run. Fixed statements do not vote: the vote is among the independent
candidates, and a fix runs only when none of them has a result. An answer after a fix carries
``result.fix = {"attempts", "first_sql", "first_error"}``; a row still failing says so in its error.

Guardrails: the question (and its history turns' questions) is checked against the enabled guardrail rules as a
text question is (pgsynapse.guardrails, the rules as its batch loaded them, the active text model's vectors). One a
block rule matches ends ``blocked``, the rule on the row (``guardrail``), with no statement generated or run; one a
flag rule matches is answered, the rule on the row. A history turn a block rule matches is left out of the prompt.
An answer is written only under the rules it was checked under (else its job asks again under today's).

What a row ends as: ``answered`` (a result), ``refused`` (the statement was not run: why), ``failed`` (no statement
could be made or it failed when run: why), ``blocked`` (a guardrail rule). Only model and database trouble are
retried.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import psycopg
from psycopg.types.json import Jsonb

from pgsynapse.answer_cache import rules_key
from pgsynapse.config import Settings
from pgsynapse.errors import ConfigError, InputError
from pgsynapse.guardrails import Guard, RuleSet
from pgsynapse.handlers.base import (Handler, Job, Outcome, WriteReport, describe, input_error, retry_after,
                                     unanswerable)
from pgsynapse.logs import get_logger
from pgsynapse.models import ModelCache
from pgsynapse.queries import q
from pgsynapse.textsql.context import SchemaContext, schema_context
from pgsynapse.textsql.execute import Limits, QueryFailed, Result, result_signature, run_readonly
from pgsynapse.textsql import reader, registry
from pgsynapse.textsql.registry import REGISTRY, choose_sql_model
from pgsynapse.textsql.generate import GenerationStopped, SqlGenerator, SqlPrompt, make_generator
from pgsynapse.textsql.safety import UnsafeSQL, check_sql

log = get_logger(__name__)

NO_STATEMENT = "refused: the model wrote no SQL statement"


@dataclass
class SqlWork:
    job: Job
    question: str
    text_hash: str
    schema: str
    tables: list[str] | None
    model: dict[str, Any]  # a sql_models row, or the settings' model (id None)
    text_version: dict[str, Any] | None = None  # the active text model: it narrows a large schema to the question
    history: list[tuple[str, str]] = field(default_factory=list)
    history_ids: list[int] = field(default_factory=list)  # the data question ids of ``history``
    rules: RuleSet = field(default_factory=RuleSet)  # the guardrail rules its batch loaded: it is checked under them
    rules_key: str = ""  # those rules as answer_cache.rules_key: the write's check that they still stand


@dataclass
class Attempt:
    sql: str  # as checked (and run): what the row keeps
    result: Result | None = None
    error: str | None = None
    refused: bool = False
    reason: str | None = None  # the safety check's code, when refused
    said: str = ""  # the statement as the model wrote it: a fix turn shows the model its own words
    fixable_error: str | None = None  # what a fix turn may tell the model (QueryFailed.fixable_error)


@dataclass
class Answer:
    best: Attempt
    candidates: int  # statements the first generation gave
    fixes: list[Attempt] = field(default_factory=list)  # the fix turns' statements, in order
    first: Attempt | None = None  # the failed candidate the first fix turn was about
    seconds: float = 0.0  # generation, checks and runs, fixes included
    first_seconds: float = 0.0  # the same up to the vote, before any fix turn (what sql_fix_attempts = 0 takes)
    # the schema the base prompt gave the model, after the budget's trimming (the trainer rebuilds the prompt
    # from it; a fix prompt, longer, may have been trimmed more)
    given: str = ""

    @property
    def status(self) -> str:
        return "answered" if self.best.result is not None else "refused" if self.best.refused else "failed"

    @property
    def error(self) -> str | None:
        """The row's error: the chosen attempt's, and what the fix turns did when they did not help."""
        if not self.fixes or self.best.result is not None:
            return self.best.error
        n = len(self.fixes)
        return (f"{self.best.error}; {n} fix attempt{'s' if n > 1 else ''} (sql_fix_attempts) did not help, the last: "
                f"{self.fixes[-1].error}")

    def fix_metadata(self) -> dict[str, Any] | None:
        if self.first is None:
            return None
        return {"attempts": len(self.fixes), "first_sql": self.first.sql, "first_error": self.first.error}


def settings_model(settings: Settings) -> dict[str, Any]:
    """The SQL model when no sql_models row is active."""
    return {"id": None, "name": settings.sql_model_path, "path": settings.sql_model_path,
            "runtime": settings.sql_runtime, "status": "active", "traffic_percent": 100}


class SqlAnswerHandler(Handler[SqlWork]):
    kind = "sql_answer"
    lock_rows_query = ("lock_data_question_rows", "textsql.sql")
    changed_since_query = ("data_question_changed_since", "textsql.sql")
    requeue_changed_query = ("requeue_changed_data_questions", "textsql.sql")
    concurrency = 1  # one model generating at a time: a second batch would only share the same cores
    # one question a batch: each result is committed and announced once generated, not once every question claimed
    # with it is (their generations ran one after the other anyway)
    batch_limit = 1

    def __init__(self, settings: Settings, models: ModelCache) -> None:
        self.settings = settings
        self.models = models  # the embedding model narrows large schemas to the tables most like the question
        self._generators: dict[tuple[str, str], SqlGenerator] = {}
        self._lock = threading.Lock()
        self.guard = Guard()
        # `sql-ask`'s own worker (app.py): a stop (Ctrl-C, SIGTERM) abandons the statement being generated, at its
        # next step, and its job goes back to the queue at once; `pgsynapse run` finishes it (SIGTERM drains)
        self.stop_abandons = False
        self._abandoning = threading.Event()

    def abandon(self) -> None:
        if self.stop_abandons:
            self._abandoning.set()

    # -- models ---------------------------------------------------------------------------------------
    async def warm_up(self, conn: psycopg.AsyncConnection) -> None:
        """The SQL models data questions are routed to load before the worker says it started (Worker.warm_up), not
        at the first data question, which, with every one queued behind it, waited for the load (Qwen2.5-Coder-0.5B
        on transformers: 45 s on 2 cores). Routed to: the registry's active model and its candidates with traffic
        (:func:`~pgsynapse.textsql.registry.choose_sql_model`), and a set ``sql_model_path`` while no row is active.
        The default, not set, loads at its first data question as before: a worker of the default kinds where the
        ``qwen`` extra is installed (after the demo) would otherwise pay its load and memory at every start, data
        questions asked or not. A model routed to later (a promote, a traffic share) loads at its first question.

        One that cannot load: a set ``sql_model_path`` stops the start with its error, as a bad
        ``answerer_model_path`` does; a registered row that fails to load is logged (``sql_model_load_failed``): the
        worker starts and serves its other kinds and models, and the questions routed to that model fail on their
        rows with the same error, as before."""
        s = self.settings
        routable = list(await (await conn.execute(REGISTRY.sql("routable_models"))).fetchall())
        models = list(routable)
        # the settings' model while no row is active, if set (env, file or flag); the default: at its first question
        if not any(r["status"] == "active" for r in routable) and "sql_model_path" in s.model_fields_set:
            models.append(settings_model(s))
        for model in models:
            try:
                await anyio.to_thread.run_sync(self.generator, model)
            except Exception as exc:  # noqa: BLE001 - a registered model's error is its questions', as before
                if model["id"] is None:  # the set sql_model_path: the start fails, as for answerer_model_path
                    raise
                log.warning("sql_model_load_failed", model=model["name"], id=model["id"], error=describe(exc),
                            effect="the data questions routed to it fail with this error until it loads")

    def generator(self, model: dict[str, Any]) -> SqlGenerator:
        key = (model["runtime"], model["path"])
        with self._lock:
            gen = self._generators.get(key)
            if gen is None:
                started = time.perf_counter()
                gen = self._make(model)
                # the runtime logged sql_model_loaded (how it loaded); this names the registry's model it serves
                log.info("sql_model_ready", model=model["name"], id=model["id"], runtime=gen.name,
                         seconds=round(time.perf_counter() - started, 2))
                self._generators[key] = gen
            return gen

    def _make(self, model: dict[str, Any]) -> SqlGenerator:
        """The generator of the settings' model, or of a registry's row: one that cannot be loaded is named by its
        row (not by sql_model_path, which did not choose it), with what to do."""
        if model["id"] is None:
            return make_generator(model["runtime"], model["path"], self.settings)
        try:
            return make_generator(model["runtime"], model["path"], self.settings, subject=registry.entry(model))
        except ConfigError as exc:
            raise ConfigError(f"{exc}: {registry.out_of_service(model)}") from None

    # -- load -----------------------------------------------------------------------------------------
    async def load(self, conn: psycopg.AsyncConnection, jobs: list[Job]) -> tuple[list[SqlWork], list[Outcome]]:
        s = self.settings
        rows = {r["id"]: r for r in await (await conn.execute(q("load_data_questions", "textsql.sql"), {
            "ids": [j.ref_id for j in jobs], "max_chars": s.max_question_chars})).fetchall()}
        routable = list(await (await conn.execute(REGISTRY.sql("routable_models"))).fetchall())
        text_version = await (await conn.execute(q("active_version"))).fetchone()
        work: list[SqlWork] = []
        known: list[Outcome] = []
        for job in jobs:
            row = rows.get(job.ref_id)
            if row is None:
                known.append(Outcome(job, skip_reason="data question gone or already answered"))
                continue
            if (refused := unanswerable(job, row, s.max_question_chars)) is not None:
                known.append(refused)
                continue
            key = row["session_id"] or f"data-question-{row['id']}"
            model = choose_sql_model(routable, key) or settings_model(s)
            w = SqlWork(job, row["text"], row["text_hash"], row["target_schema"], row["allowed_tables"], model,
                        text_version)
            if row["session_id"] is not None and s.history_turns:
                past = await (await conn.execute(q("data_session_history", "textsql.sql"), {
                    "session": row["session_id"], "before": row["id"], "limit": s.history_turns,
                    "max_chars": s.max_question_chars})).fetchall()
                w.history = [(p["text"], p["sql"]) for p in reversed(past)]
                w.history_ids = [p["id"] for p in reversed(past)]
            work.append(w)
        if work:
            rules = list(await (await conn.execute(q("guardrail_rules", "answers.sql"))).fetchall())
            self.guard.refresh(rules)
            snapshot, key = self.guard.snapshot(), rules_key(rules)  # the batch's own: another may refresh the guard
            for w in work:
                w.rules, w.rules_key = snapshot, key
        return work, known

    # -- compute --------------------------------------------------------------------------------------
    def compute(self, work: list[SqlWork]) -> list[Outcome]:
        out: list[Outcome] = []
        with reader.connect(self.settings) as conn:  # the reader's own login when there is one (textsql/reader.py)
            for w in work:
                try:
                    out.append(Outcome(w.job, result=self._answer(conn, w)))
                except GenerationStopped:  # its worker stops: the next worker answers it, from the start
                    log.info("sql_generation_stopped", question=w.job.ref_id, reason="abandoned")
                    out.append(Outcome(w.job, error="abandoned: its worker stopped", abandoned=True))
                except InputError as exc:  # the question's scope is wrong (no readable table...): no retry helps
                    out.append(input_error(w.job, exc, w.text_hash))
                except ConfigError as exc:  # the model is not installed or not usable: an operator must act
                    out.append(Outcome(w.job, error=describe(exc), retry=False, read_hash=w.text_hash))
                except Exception as exc:  # noqa: BLE001 - model or database trouble: this job's error, retried
                    out.append(Outcome(w.job, error=describe(exc), read_hash=w.text_hash, retry_after=retry_after(exc)))
        return out

    def _guardrail(self, w: SqlWork) -> dict[str, Any] | None:
        """The rule the question matches (None: none), as a text question is checked: with the active text model,
        under the rules its batch loaded. A history turn a block rule matches is left out of ``w.history``."""
        if not w.rules:
            return None
        if w.text_version is None:
            raise ConfigError("guardrail rules are enabled but no text model version is active to check data "
                              "questions against them: promote one (`pgsynapse model list`, `pgsynapse promote N`)")
        embedder = self.models.get(w.text_version)
        hits = self.guard.check(embedder, [w.question] + [t for t, _ in w.history], rules=w.rules)
        kept = []
        for turn_id, turn, hit in zip(w.history_ids, w.history, hits[1:], strict=True):
            if hit and hit["action"] == "block":
                log.info("history_turn_blocked", question=w.job.ref_id, turn=turn_id)
            else:
                kept.append((turn_id, turn))
        w.history_ids, w.history = [i for i, _ in kept], [t for _, t in kept]
        return {**hits[0], "stage": "question"} if hits[0] else None

    def _answer(self, conn: psycopg.Connection, w: SqlWork) -> dict[str, Any]:
        s = self.settings
        guard = self._guardrail(w)
        if guard and guard["action"] == "block":  # no statement is generated, none runs
            log.info("sql_answer_blocked", question=w.job.ref_id, rule=guard["rule_id"], similarity=guard["similarity"])
            return {"status": "blocked", "sql": None, "schema_context": None, "result": None, "row_count": None,
                    "error": f"blocked: the question matches guardrail rule {guard['rule_id']}: no SQL was generated",
                    "truncated": None, "model": None, "text_hash": w.text_hash, "guardrail": Jsonb(guard),
                    "rules_key": w.rules_key}
        version = w.text_version
        encode = (lambda texts: self.models.get(version).encode(texts, s.encode_batch_size)) if version else None
        ctx: SchemaContext = schema_context(
            conn, w.schema, w.tables, question=w.question, encode=encode, samples=s.sql_sample_values,
            max_tables=s.sql_max_tables, role=s.sql_reader_role)
        gen = self.generator(w.model)
        ans = answer(conn, gen, SqlPrompt(w.question, ctx.text, tuple(w.history)), ctx, w.schema, s,
                     stop=self._abandoning)
        log.info("sql_answer_generated", question=w.job.ref_id, model=w.model["name"], status=ans.status,
                 candidates=ans.candidates, fixes=len(ans.fixes), seconds=round(ans.seconds, 2), error=ans.error)
        res = ans.best.result
        payload = res.as_json() if res else None
        if payload is not None and ans.fix_metadata():
            payload["fix"] = ans.fix_metadata()
        if payload is not None and res.truncated_by:  # which limit cut it (truncated says only that one did)
            payload["truncated_by"] = {"setting": res.truncated_by[0], "limit": res.truncated_by[1]}
        return {"status": ans.status, "sql": ans.best.sql or None, "error": ans.error, "schema_context": ans.given,
                "result": Jsonb(payload) if payload else None, "row_count": res.row_count if res else None,
                "truncated": res.truncated if res else None, "model": w.model["id"], "text_hash": w.text_hash,
                "guardrail": Jsonb(guard) if guard else None, "rules_key": w.rules_key}

    # -- write ----------------------------------------------------------------------------------------
    async def write(self, conn: psycopg.AsyncConnection, outcomes: list[Outcome]) -> WriteReport:
        report = WriteReport()
        # written only under the rules it was checked under (as AnswerHandler.write): the rules as they are now
        rules_now = rules_key(list(await (await conn.execute(q("guardrail_rules", "answers.sql"))).fetchall()))
        for o in outcomes:
            r = dict(o.result)
            if r.pop("rules_key") != rules_now:
                log.info("sql_answer_rules_changed", question=o.job.ref_id, job=o.job.id)
                report.superseded.append(o.job.id)
                report.notes[o.job.id] = "superseded: the guardrail rules changed since it was checked"
                continue
            cur = await conn.execute(q("write_data_answer", "textsql.sql"), {"id": o.job.ref_id, **r})
            if cur.rowcount == 0:  # edited meanwhile (its UPDATE queued a new job), or deleted
                report.superseded.append(o.job.id)
                continue
            await conn.execute(q("notify_data_answer", "textsql.sql"), {"id": o.job.ref_id, "status": r["status"]})
            report.written.append(o.job.id)
        return report

    @classmethod
    async def record_failure(cls, conn: psycopg.AsyncConnection, job: Job, error: str) -> None:
        cur = await conn.execute(q("fail_data_question", "textsql.sql"), {"id": job.ref_id, "error": error})
        if cur.rowcount:
            await conn.execute(q("notify_data_answer", "textsql.sql"), {"id": job.ref_id, "status": "failed"})


def attempt(conn: psycopg.Connection, sql: str, ctx: SchemaContext, schema: str, settings: Settings) -> Attempt:
    """One generated statement through ``check_sql`` and, when accepted, ``run_readonly`` as the reader role."""
    s = settings
    if not sql.strip():
        return Attempt(sql, error=NO_STATEMENT, refused=True, reason="empty", said=sql)
    try:
        checked = check_sql(sql, allowed=ctx.allowed, search_path=(schema,))
    except UnsafeSQL as exc:  # kept on the row as said, but a NUL (refused) cannot be stored in text: U+FFFD there
        return Attempt(sql.replace("\x00", "\ufffd"), error=str(exc), refused=True, reason=exc.reason, said=sql)
    try:
        return Attempt(checked.sql, result=run_readonly(conn, checked, Limits.of(s), role=s.sql_reader_role,
                                                        search_path=(schema,)), said=sql)
    except QueryFailed as exc:
        return Attempt(checked.sql, error=str(exc), said=sql, fixable_error=exc.fixable_error)
    except UnsafeSQL as exc:  # refused once the catalog was seen (a function of the schema): it did not run
        return Attempt(checked.sql, error=str(exc), refused=True, reason=exc.reason, said=sql)


def answer(conn: psycopg.Connection, gen: SqlGenerator, prompt: SqlPrompt, ctx: SchemaContext, schema: str,
           settings: Settings, *, stop: threading.Event | None = None) -> Answer:
    """A question's statement and result, as the handler makes them (the benchmark calls this too): the
    candidates (``sql_candidates``), each checked and run, the vote (:func:`choose`), then, when no candidate ran
    and one failed with a fixable error, up to ``sql_fix_attempts`` fix turns (greedy, one statement each, each
    shown the statements and errors before it). The first fixed statement that runs is the answer. ``stop``, once
    set, ends it at the generation's next step (:class:`~pgsynapse.textsql.generate.GenerationStopped`)."""
    s = settings
    started = time.perf_counter()
    candidates = gen.generate(prompt, n=s.sql_candidates, temperature=s.sql_temperature, stop=stop)
    attempts = [attempt(conn, sql, ctx, schema, s) for sql in candidates] or [
        Attempt("", error=NO_STATEMENT, refused=True, reason="empty")]
    fitted = getattr(gen, "last_fitted", None)
    ans = Answer(choose(attempts), len(candidates), given=fitted.schema_context if fitted is not None else ctx.text)
    failing = next((a for a in attempts if a.fixable_error), None) if ans.best.result is None else None
    ans.first = failing if s.sql_fix_attempts else None
    ans.first_seconds = time.perf_counter() - started
    turns: list[tuple[str, str]] = []
    while failing is not None and failing.fixable_error and len(ans.fixes) < s.sql_fix_attempts:
        turns.append((failing.said, failing.fixable_error))
        said = gen.generate(replace(prompt, fix=tuple(turns)), n=1, stop=stop)
        fixed = attempt(conn, said[0] if said else "", ctx, schema, s)
        ans.fixes.append(fixed)
        log.info("sql_fix_attempted", attempt=len(ans.fixes), error=failing.error,
                 status="answered" if fixed.result is not None else "refused" if fixed.refused else "failed",
                 fixed_error=fixed.error)
        if fixed.result is not None:
            ans.best = fixed
            break
        failing = fixed
    ans.seconds = time.perf_counter() - started
    return ans


def choose(attempts: list[Attempt]) -> Attempt:
    """Self-consistency: the result most candidates agree on (the earliest such, so the greedy one on a tie);
    with no result at all, the first candidate's reason."""
    ran = [a for a in attempts if a.result is not None]
    if not ran:
        return attempts[0]
    votes = Counter(result_signature(a.result) for a in ran)  # type: ignore[arg-type]
    top = max(votes.values())
    return next(a for a in ran if votes[result_signature(a.result)] == top)  # type: ignore[arg-type]
