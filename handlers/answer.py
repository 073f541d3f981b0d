"""The ``answer`` job: retrieve passages for a question (with its session's context), answer with citations,
apply guardrails, write the answer and announce it on ``pgsynapse_answers``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from pgsynapse.answerers import (
    NOT_FOUND,
    Answer,
    Answerer,
    AnswerStopped,
    ExtractiveAnswerer,
    OpenAIAnswerer,
    Passage,
    Request,
    TransformersAnswerer,
    Turn,
)
from pgsynapse.answer_cache import ANSWERER as CACHE_ANSWERER, AnswerCache, Hit, rules_key
from pgsynapse.answerers.fallback import FALLBACK_REASONS, ExtractiveFallback
from pgsynapse.answerers.llamacpp import LlamaCppAnswerer
from pgsynapse.cache import embed_queries
from pgsynapse.config import Settings
from pgsynapse.errors import ConfigError, InputError
from pgsynapse.guardrails import Guard, RuleSet
from pgsynapse.handlers.answer_stream import Stream, StreamWriter
from pgsynapse.handlers.answer_stream_guard import AnswerBlocked, GuardedStream
from pgsynapse.handlers.base import (Handler, Job, Outcome, WriteReport, describe, input_error, retry_after,
                                     unanswerable)
from pgsynapse.learning.routing import choose_version
from pgsynapse.logs import get_logger
from pgsynapse.models import Embedder, ModelCache
from pgsynapse.queries import q
from pgsynapse.ranking.registry import REGISTRY as RANKERS
from pgsynapse.ranking.rescore import rescore, rescores
from pgsynapse.ranking.scorer import RankerCache, passage_text, rerank
from pgsynapse.replica import reading, replica_for
from pgsynapse.retrieval import CANDIDATES_FACTOR, fuse_full_text, knn, query_with_context

log = get_logger(__name__)

# a blocked question's answer, by the stage a block rule matched (guardrail.stage): the question (nothing was
# generated), or the answer (generated, then withheld)
BLOCKED_QUESTION = "This question cannot be answered: it matches a guardrail rule."
BLOCKED_ANSWER = "The answer was withheld: it matched a guardrail rule."
SUPERSEDED_MID_STREAM = "superseded: the question was edited, deleted or answered while its answer was generated"


@dataclass
class AnswerWork:
    job: Job
    question: str
    session_id: str | None
    version: dict[str, Any]
    history: list[Turn] = field(default_factory=list)
    retrieval_query: str = ""
    query_vector: np.ndarray | None = None
    passages: list[Passage] = field(default_factory=list)
    guardrail: dict[str, Any] | None = None  # set when the question itself matched a rule
    embedder: Embedder | None = None
    text_hash: str | None = None  # md5 of the text as loaded: the write's stale-write guard
    turn_ids: list[int] = field(default_factory=list)  # the question ids of ``history``
    cached: Hit | None = None  # answered from the semantic answer cache (pgsynapse.answer_cache)
    ranker: dict[str, Any] | None = None  # the ranker routed to (None: the vector order)
    rules_key: str = ""  # the guardrail rules it was loaded (and its question checked) under: answer_cache.rules_key
    rules: RuleSet = field(default_factory=RuleSet)  # those rules: its question and answer are checked under them


def blocked(w: AnswerWork) -> bool:
    return bool(w.guardrail and w.guardrail["action"] == "block")


def vector_sql(version: dict[str, Any]) -> str:
    """The kNN query of one model version, its dim and id formatted in (integers) so its partial index applies."""
    return (q("vector_candidates", "answers.sql").replace("{dim}", str(int(version["dim"])))
            .replace("{version}", str(int(version["id"]))))


class AnswerHandler(Handler[AnswerWork]):
    kind = "answer"
    lock_rows_query = ("lock_question_rows", "answers.sql")
    writes_on_retry = True  # a partial answer streamed before the error is withdrawn
    changed_since_query = ("question_changed_since", "answers.sql")
    requeue_changed_query = ("requeue_changed_questions", "answers.sql")

    def __init__(self, settings: Settings, models: ModelCache) -> None:
        self.settings = settings
        self.models = models
        self._generative: Answerer | None = None
        # a generated answer takes seconds: one question at a time, committed and announced as soon as it is
        # generated (in a batch it waited for every question after it), and a follow-up is loaded once the
        # question before it is answered, with its answer. Extractive answers are batched as every kind is.
        generative = settings.answerer != "extractive"
        self.concurrency = 1 if generative else 2
        self.batch_limit = 1 if generative else None
        self._routable: list[dict[str, Any]] = []  # the versions questions are routed to, read at warm-up
        self.guard = Guard()
        self.cache = AnswerCache(settings)
        self.rankers = RankerCache(settings.onnx_threads or settings.torch_threads, data_dir=settings.data_dir)
        self._streams: StreamWriter | None = None
        # `ask`'s own worker (app.py): a stop (Ctrl-C) abandons the answer being generated, at its next piece, and its
        # job goes back to the queue at once; `pgsynapse run` finishes it (SIGTERM drains)
        self.stop_abandons = False
        self._abandoning = threading.Event()
        self.replica = replica_for(settings.read_url, settings.read_max_lag_ms, settings=settings)  # retrieval may read a replica

    def abandon(self) -> None:
        if self.stop_abandons:
            self._abandoning.set()

    async def aclose(self) -> None:
        if self.replica is not None:
            await self.replica.aclose()

    # -- warm-up (Worker.warm_up): the routable versions' models load before the worker says it started -----------
    async def warm_up(self, conn: psycopg.AsyncConnection) -> None:
        """The embedding models of the versions questions are routed to, then the generative answerer's model
        (:meth:`load_generator`): one that cannot load stops the start, with its error."""
        await self.refresh_versions(conn)
        await anyio.to_thread.run_sync(self.embedders)
        await anyio.to_thread.run_sync(self.load_generator)

    async def refresh_versions(self, conn: psycopg.AsyncConnection) -> None:
        self._routable = list(await (await conn.execute(q("routable_versions", "answers.sql"))).fetchall())

    def embedders(self) -> list[Embedder]:
        return [self.models.get(v) for v in self._routable]

    # -- answerers ----------------------------------------------------------------------------
    def _extractive_for(self, embedder: Embedder) -> ExtractiveAnswerer:
        s = self.settings
        return ExtractiveAnswerer(lambda texts: embedder.encode(texts, s.encode_batch_size),
                                  not_found_threshold=s.not_found_threshold)

    def answerer_for(self, embedder: Embedder) -> Answerer:
        if self.settings.answerer == "extractive":
            return self._extractive_for(embedder)
        # an answer of citations only ("[1]") is answered again from the same passages by the extractive answerer
        return ExtractiveFallback(self.generator(), self._extractive_for(embedder))

    def load_generator(self) -> None:
        """Warm-up (:meth:`warm_up`): the generative answerer's model loads before the worker says it started, as
        the embedding models do, not at the first question (which, and every question queued behind it, waited for
        the load: 30-100 s for a GGUF model on transformers on 2 cores)."""
        if self.settings.answerer != "extractive":
            self.generator()

    def generator(self) -> Answerer:
        """The generative answerer (transformers, llama-cpp, openai), built once."""
        s = self.settings
        if self._generative is None:
            if s.answerer in ("transformers", "llama-cpp") and not s.answerer_model_path:
                raise ConfigError("invalid setting answerer_model_path [PGSYNAPSE_ANSWERER_MODEL_PATH]: "
                                  f"required when answerer = {s.answerer}")
            if s.answerer == "transformers":
                self._generative = TransformersAnswerer(
                    s.answerer_model_path, max_new_tokens=s.answer_max_new_tokens,
                    context_tokens=s.answer_context_tokens, cache_dir=s.data_dir / "models" / "gguf",
                    citation_policy=s.citation_policy)
            elif s.answerer == "llama-cpp":
                self._generative = LlamaCppAnswerer(
                    s.answerer_model_path, max_new_tokens=s.answer_max_new_tokens,
                    context_tokens=s.answer_context_tokens, threads=s.torch_threads,
                    cache_dir=s.data_dir / "models" / "gguf", citation_policy=s.citation_policy)
            else:
                if not s.openai_base_url:
                    raise ConfigError("invalid setting openai_base_url [PGSYNAPSE_OPENAI_BASE_URL]: "
                                      "required when answerer = openai")
                self._generative = OpenAIAnswerer(s.openai_base_url, s.openai_api_key, s.openai_model,
                                                  timeout=s.openai_timeout_seconds,
                                                  max_new_tokens=s.answer_max_new_tokens,
                                                  citation_policy=s.citation_policy)
        return self._generative

    def _stream(self, w: AnswerWork) -> Stream | GuardedStream | None:
        """The partial-answer stream of a generated answer (handlers/answer_stream.py), when streaming is on;
        under a block rule, each sentence checked before it is written (handlers/answer_stream_guard.py)."""
        s = self.settings
        if s.answerer == "extractive" or not s.stream_answers or not s.database_url:
            return None
        if self._streams is None:
            self._streams = StreamWriter(s.database_url, s.stream_interval_ms)
        stream = self._streams.open(w.job.ref_id, w.text_hash, abandoned=self._abandoning)
        if not w.rules.blocks:
            return stream
        assert w.embedder is not None
        return GuardedStream(stream, self.guard, w.embedder, w.rules, question=w.job.ref_id,
                             interval_ms=s.stream_interval_ms)

    # -- load: rows, history, routing, guardrails, query vectors, retrieval -------------------
    async def load(self, conn: psycopg.AsyncConnection, jobs: list[Job]) -> tuple[list[AnswerWork], list[Outcome]]:
        s = self.settings
        rows = {r["id"]: r for r in await (await conn.execute(q("load_questions", "answers.sql"), {
            "ids": [j.ref_id for j in jobs], "max_chars": s.max_question_chars})).fetchall()}
        versions = list(await (await conn.execute(q("routable_versions", "answers.sql"))).fetchall())
        rankers = list(await (await conn.execute(RANKERS.sql("routable_models"))).fetchall())
        work: list[AnswerWork] = []
        known: list[Outcome] = []
        for job in jobs:
            row = rows.get(job.ref_id)
            if row is None:
                known.append(Outcome(job, skip_reason="question gone or already answered"))
                continue
            if (refused := unanswerable(job, row, s.max_question_chars)) is not None:
                known.append(refused)
                continue
            key = row["session_id"] or f"question-{row['id']}"
            version = choose_version(versions, key)
            ranker = RANKERS.choose(rankers, f"ranker:{key}")  # its own split: independent of versions
            # a teacher that is the version routed to (promoted since) would leave the order as it is: the answer
            # is the vector order's, and records no ranker (ab-report credits none with it)
            w = AnswerWork(job, row["text"], row["session_id"], version, text_hash=row["text_hash"],
                           ranker=ranker if ranker is None or rescores(ranker, version["id"]) else None)
            if row["session_id"] is not None and s.history_turns:
                past = await (await conn.execute(q("session_history", "answers.sql"), {
                    "session": row["session_id"], "before": row["id"], "limit": s.history_turns,
                    "max_chars": s.max_question_chars})).fetchall()
                w.turn_ids = [p["id"] for p in reversed(past)]
                w.history = [Turn(p["text"], p["answer"]) for p in reversed(past)]
            work.append(w)
        if not work:
            return work, known
        rules = list(await (await conn.execute(q("guardrail_rules", "answers.sql"))).fetchall())
        self.guard.refresh(rules)
        self.cache.refresh_rules(rules)
        # the batch's own snapshot: another batch's load may refresh the shared checker before this one checks
        snapshot = self.guard.snapshot()
        for w in work:
            w.rules_key, w.rules = self.cache.rules_key, snapshot
        for version in {w.version["id"]: w.version for w in work}.values():
            group = [w for w in work if w.version["id"] == version["id"]]
            embedder = await anyio.to_thread.run_sync(self.models.get, version)
            # the query embeddings come from the inference cache when this version embedded the same text before
            # (its table is off with cache_max_rows = 0: the in-process LRU alone)
            cache = conn if self.settings.cache_max_rows else None
            qvecs = await embed_queries(cache, embedder, [w.question for w in group])
            if snapshot:
                await anyio.to_thread.run_sync(self._check, embedder, group, qvecs, snapshot)
            for w in group:
                # a follow-up ("and how do I undo it?") is retrieved with the previous question's context; a new
                # topic in the same session on its own
                w.retrieval_query = query_with_context(w.question, [t.question for t in w.history])
            follow_ups = [w for w in group if w.retrieval_query != w.question and not blocked(w)]
            rvecs = await embed_queries(cache, embedder, [w.retrieval_query for w in follow_ups]) if follow_ups else []
            by_follow_up = {id(w): v for w, v in zip(follow_ups, rvecs, strict=True)}
            for w, qv in zip(group, qvecs, strict=True):
                w.embedder, w.query_vector = embedder, by_follow_up.get(id(w), qv)
                if self.cache.may_serve(guardrail=w.guardrail, history=w.history):
                    w.cached = await self.cache.lookup(conn, w.version, w.question, qv, w.job.ref_id,
                                                       rules=w.rules_key, ranker=w.ranker["id"] if w.ranker else None)
        retrieve = [w for w in work if not blocked(w) and w.cached is None]
        if retrieve:
            async with reading(self.replica, conn) as reads:  # the replica, once it has caught up with the primary
                for w in retrieve:
                    w.passages = await self._retrieve(reads, w)
        return work, known

    def _check(self, embedder: Embedder, group: list[AnswerWork], qvecs: np.ndarray, rules: RuleSet) -> None:
        """Guard everything that will reach the answerer: each question, and each history turn's question and
        answer against today's rules. A turn that matches a block rule is left out of the history (a flag on a
        turn is not recorded: it was the turn's own question or answer, recorded on its row)."""
        texts = [w.question for w in group]
        texts += [text for w in group for t in w.history for text in (t.question, t.answer or "")]
        hits = iter(self.guard.check(embedder, texts, known={w.question.strip(): v for w, v in zip(group, qvecs)},
                                     rules=rules))
        for w in group:
            hit = next(hits)
            w.guardrail = {**hit, "stage": "question"} if hit else None
        for w in group:
            kept = []
            for turn_id, turn in zip(w.turn_ids, w.history, strict=True):
                if any(h and h["action"] == "block" for h in (next(hits), next(hits))):
                    log.info("history_turn_blocked", question=w.job.ref_id, turn=turn_id)
                else:
                    kept.append((turn_id, turn))
            w.turn_ids, w.history = [i for i, _ in kept], [t for _, t in kept]

    async def _retrieve(self, conn: psycopg.AsyncConnection, w: AnswerWork) -> list[Passage]:
        s, v = self.settings, w.version
        wanted = max(s.answer_top_k, s.rank_candidates) if w.ranker else s.answer_top_k
        k = wanted * (CANDIDATES_FACTOR if s.hybrid else 1)
        vec_rows = await knn(conn, vector_sql(v), w.query_vector, v["id"], k)
        if s.hybrid:
            order, by_id = await fuse_full_text(conn, v["id"], w.query_vector, w.retrieval_query, vec_rows, k,
                                                s.hybrid_text_weight, s.hybrid_text_max_rows)
        else:
            order, by_id = [r["chunk_id"] for r in vec_rows], {r["chunk_id"]: r for r in vec_rows}
        if w.ranker is not None:
            order = await self._rank(conn, w, order[:wanted], by_id)
        out = []
        for rank, cid in enumerate(order[: s.answer_top_k], 1):
            r = by_id[cid]
            out.append(Passage(rank, r["document_id"], cid, r["title"], r["source"], r["text"], float(r["score"])))
        return out

    async def _rank(self, conn: psycopg.AsyncConnection, w: AnswerWork, candidates: list[int],
                    by_id: dict[int, Any]) -> list[int]:
        """The candidates in the routed ranker's order. A ranker that cannot be loaded or fails leaves the vector
        order (logged, and the answer records no ranker): a bad ranker never stops answers."""
        assert w.ranker is not None
        try:
            if w.ranker["runtime"] == "version":  # a teacher version's stored vectors rescore
                return await rescore(conn, self.models, w.ranker, w.retrieval_query, candidates,
                                     w.version["id"])
            ranker = await anyio.to_thread.run_sync(self.rankers.get, w.ranker)
            return await anyio.to_thread.run_sync(rerank, ranker, w.retrieval_query, candidates,
                                                  lambda c: passage_text(by_id[c]["title"], by_id[c]["text"]),
                                                  lambda c: by_id[c]["score"])
        except Exception as exc:  # noqa: BLE001 - any failure of the ranker: the vector order stands
            log.error("ranker_failed", ranker=w.ranker["id"], question=w.job.ref_id, error=describe(exc))
            w.ranker = None
            return candidates

    # -- compute: answer, then the answer's own guardrail --------------------------------------
    def served_by(self, work: list[AnswerWork]) -> list[dict[str, Any]] | None:
        """The versions the batch's questions were routed to (each session's, sticky), not one unlabelled series."""
        return list({w.version["id"]: w.version for w in work}.values()) or None  # none computed: not observed

    def compute(self, work: list[AnswerWork]) -> list[Outcome]:
        out = []
        for w in work:
            if blocked(w):
                out.append(Outcome(w.job, result=self._result(w, "blocked", Answer(BLOCKED_QUESTION, []), w.guardrail)))
                continue
            if w.cached is not None:
                out.append(Outcome(w.job, result=self._result(w, "answered", w.cached.answer, None)))
                continue
            try:
                assert w.embedder is not None
                answerer = self.answerer_for(w.embedder)
                req = Request(w.question, w.passages, w.history, w.query_vector)
                stream = self._stream(w)
                try:
                    answer = answerer.answer(req, on_delta=stream) if stream else answerer.answer(req)
                except AnswerBlocked as exc:  # a sentence matched a block rule before it was streamed
                    assert stream is not None
                    log.info("answer_generation_stopped", question=w.job.ref_id, reason="blocked",
                             pieces=stream.pieces)
                    out.append(Outcome(w.job, result=self._result(w, "blocked", Answer(BLOCKED_ANSWER, []), exc.hit)))
                    continue
                except AnswerStopped:  # its stream found the row changed: nobody reads the rest
                    assert stream is not None
                    if self._abandoning.is_set():  # its worker stops: the next worker answers it
                        log.info("answer_generation_stopped", question=w.job.ref_id, reason="abandoned",
                                 pieces=stream.pieces)
                        out.append(Outcome(w.job, error="abandoned: its worker stopped", abandoned=True))
                        continue
                    log.info("answer_generation_stopped", question=w.job.ref_id, reason="superseded",
                             pieces=stream.pieces)
                    out.append(Outcome(w.job, skip_reason=SUPERSEDED_MID_STREAM, superseded=True))
                    continue
                finally:
                    if stream:
                        stream.close()
                if "extractive_fallback" in answer.flags:
                    reason = next(f for f in answer.flags if f in FALLBACK_REASONS)
                    log.warning("answer_fallback", question=w.job.ref_id, reason=reason, answerer=answerer.name)
                guard = w.guardrail
                if answer.text != NOT_FOUND and w.rules:
                    [hit] = self.guard.check(w.embedder, [answer.text], rules=w.rules,
                                             memo=stream.vectors if isinstance(stream, GuardedStream) else None)
                    hit = {**hit, "stage": "answer"} if hit else None
                    if hit and hit["action"] == "block":
                        out.append(Outcome(w.job, result=self._result(w, "blocked", Answer(BLOCKED_ANSWER, []), hit)))
                        continue
                    guard = guard or hit
                out.append(Outcome(w.job, result=self._result(w, "answered", answer, guard)))
            except ConfigError as exc:
                out.append(Outcome(w.job, error=str(exc), retry=False, read_hash=w.text_hash))
            except InputError as exc:  # e.g. a question too long for the generator's context
                out.append(input_error(w.job, exc, w.text_hash))
            except Exception as exc:  # noqa: BLE001 - one question's failure is that question's alone
                out.append(Outcome(w.job, error=describe(exc), read_hash=w.text_hash, retry_after=retry_after(exc)))
        return out

    def _result(self, w: AnswerWork, status: str, answer: Answer, guard: dict | None) -> dict[str, Any]:
        return {"status": status, "answer": answer, "guardrail": guard, "version": w.version["id"],
                "ranker": w.ranker["id"] if w.ranker and (w.passages or w.cached) else None,
                "retrieval_query": w.retrieval_query, "text_hash": w.text_hash, "cached": w.cached,
                "cache_store": w.cached is None and self.cache.may_store(answer, status=status, guardrail=guard,
                                                                         history=w.history),
                "query_vector": w.query_vector, "rules_key": w.rules_key}

    # -- write ---------------------------------------------------------------------------------
    async def write(self, conn: psycopg.AsyncConnection, outcomes: list[Outcome]) -> WriteReport:
        report = WriteReport()
        images = await self._document_images(conn, outcomes)
        # the questions, then their cache entries, each in id order (a single question's row is not locked by the
        # writer), before the first write: two workers' writes take them in one order
        ids = [o.job.ref_id for o in outcomes]
        await self.lock_rows(conn, ids)
        await self.cache.lock(conn, ids, [o.result["cached"] for o in outcomes if o.result["cached"]])
        # an answer is written only under the rules its question and answer were checked under: the rules as they
        # are now, read in this transaction (a rule changed since the batch loaded them, or since the checker the
        # worker's loops share was refreshed, leaves the question to its job, which answers it again under them)
        rules_now = rules_key(list(await (await conn.execute(q("guardrail_rules", "answers.sql"))).fetchall()))
        for o in outcomes:
            r = o.result
            if r["rules_key"] != rules_now:
                log.info("answer_rules_changed", question=o.job.ref_id, job=o.job.id)
                report.superseded.append(o.job.id)
                report.notes[o.job.id] = "superseded: the guardrail rules changed since it was checked"
                continue
            status, answer, guard = r["status"], r["answer"], r["guardrail"]
            for src in answer.sources:  # a cited passage's document may have images: the answer cites them too
                linked = images.get(src.get("document_id"))
                if linked:
                    src["images"] = linked
                else:
                    src.pop("images", None)
            # the stale-write guard: written only while the question is pending with the text it was loaded with
            cur = await conn.execute(q("write_answer", "answers.sql"), {
                "id": o.job.ref_id, "status": status, "answer": answer.text, "sources": Jsonb(answer.sources),
                "version": r["version"], "retrieval_query": r["retrieval_query"], "ranker": r["ranker"],
                "guardrail": Jsonb(guard) if guard else None, "text_hash": r["text_hash"], "flags": answer.flags,
                "answerer": "guardrail" if status == "blocked" else CACHE_ANSWERER if r["cached"] else self.settings.answerer})
            if cur.rowcount == 0:
                # edited meanwhile (its UPDATE queued a new job), answered by another job, or deleted
                report.superseded.append(o.job.id)
                continue
            await self.cache.written(conn, o.job.ref_id, version=r["version"], answer=answer, hit=r["cached"],
                                     store=r["cache_store"], vector=r["query_vector"], rules=r["rules_key"],
                                     ranker=r["ranker"])
            await conn.execute(q("notify_answer", "answers.sql"), {"id": o.job.ref_id, "status": status})
            report.written.append(o.job.id)
        return report

    async def _document_images(self, conn: psycopg.AsyncConnection, outcomes: list[Outcome]) -> dict[int, list[dict]]:
        """The embedded images linked to the documents the answers cite, per document (at most 3 each)."""
        ids = {s["document_id"] for o in outcomes for s in o.result["answer"].sources if s.get("document_id")}
        out: dict[int, list[dict]] = {}
        if ids:
            for row in await (await conn.execute(q("document_images", "images.sql"),
                                                 {"ids": list(ids), "per_document": 3})).fetchall():
                out.setdefault(row.pop("document_id"), []).append({"image_id": row.pop("id"), **row})
        return out

    @classmethod
    async def record_retry(cls, conn: psycopg.AsyncConnection, job: Job, error: str) -> None:
        await conn.execute(q("withdraw_partial_answer", "answers.sql"), {"id": job.ref_id})

    @classmethod
    async def record_failure(cls, conn: psycopg.AsyncConnection, job: Job, error: str) -> None:
        cur = await conn.execute(q("fail_question", "answers.sql"), {"id": job.ref_id, "error": error})
        if cur.rowcount:  # none when the question was edited meanwhile: its new job answers it
            await conn.execute(q("notify_answer", "answers.sql"), {"id": job.ref_id, "status": "failed"})
