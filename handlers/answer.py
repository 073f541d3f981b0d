"""The ``answer`` job: retrieve passages for a question (with its session's context), answer with citations,
apply guardrails, write the answer and announce it on ``pgsynapse_answers``."""

from __future__ import annotations

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
    ExtractiveAnswerer,
    OpenAIAnswerer,
    Passage,
    Request,
    TransformersAnswerer,
    Turn,
)
from pgsynapse.cache import embed_queries
from pgsynapse.config import Settings
from pgsynapse.errors import ConfigError
from pgsynapse.handlers.base import Handler, Job, Outcome, WriteReport, describe
from pgsynapse.learning.routing import choose_version
from pgsynapse.logs import get_logger
from pgsynapse.models import Embedder, ModelCache
from pgsynapse.queries import q

log = get_logger(__name__)

RRF_K = 60
BLOCKED_ANSWER = "This question cannot be answered: it matches a guardrail rule."


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


def rrf(rankings: list[list[int]], k: int = RRF_K) -> list[int]:
    """Reciprocal-rank fusion of several rankings of chunk ids."""
    score: dict[int, float] = {}
    for ranking in rankings:
        for r, cid in enumerate(ranking):
            score[cid] = score.get(cid, 0.0) + 1.0 / (k + r + 1)
    return sorted(score, key=lambda c: -score[c])


def match_rules(vector: np.ndarray, rules: list[dict[str, Any]], rule_vectors: np.ndarray, stage: str) -> dict | None:
    """The strongest rule the vector matches (block before flag), or None."""
    if not rules:
        return None
    sims = rule_vectors @ vector
    hits = [(r, float(s)) for r, s in zip(rules, sims, strict=True) if s >= r["threshold"]]
    if not hits:
        return None
    hits.sort(key=lambda h: (h[0]["action"] != "block", -h[1]))
    rule, sim = hits[0]
    return {"rule_id": rule["id"], "action": rule["action"], "similarity": round(sim, 4), "stage": stage,
            "rule": rule["text"]}


def vector_sql(version: dict[str, Any]) -> str:
    """The kNN query of one model version, its dim and id formatted in (integers) so its partial index applies."""
    return (q("vector_candidates", "answers.sql").replace("{dim}", str(int(version["dim"])))
            .replace("{version}", str(int(version["id"]))))


class AnswerHandler(Handler[AnswerWork]):
    kind = "answer"

    def __init__(self, settings: Settings, models: ModelCache) -> None:
        self.settings = settings
        self.models = models
        self._generative: Answerer | None = None
        self._rules: list[dict[str, Any]] = []
        self._rule_vectors: dict[int, np.ndarray] = {}
        self._rules_key: tuple = ()

    # -- answerers ----------------------------------------------------------------------------
    def answerer_for(self, embedder: Embedder) -> Answerer:
        s = self.settings
        if s.answerer == "extractive":
            return ExtractiveAnswerer(lambda texts: embedder.encode(texts, s.encode_batch_size),
                                      not_found_threshold=s.not_found_threshold)
        if self._generative is None:
            if s.answerer == "transformers":
                if not s.answerer_model_path:
                    raise ConfigError("invalid setting answerer_model_path [PGSYNAPSE_ANSWERER_MODEL_PATH]: "
                                      "required when answerer = transformers")
                self._generative = TransformersAnswerer(s.answerer_model_path, max_new_tokens=s.answer_max_new_tokens)
            else:
                if not s.openai_base_url:
                    raise ConfigError("invalid setting openai_base_url [PGSYNAPSE_OPENAI_BASE_URL]: "
                                      "required when answerer = openai")
                self._generative = OpenAIAnswerer(s.openai_base_url, s.openai_api_key, s.openai_model)
        return self._generative

    # -- load: rows, history, routing, query vectors, retrieval --------------------------------
    async def load(self, conn: psycopg.AsyncConnection, jobs: list[Job]) -> tuple[list[AnswerWork], list[Outcome]]:
        s = self.settings
        rows = {r["id"]: r for r in await (await conn.execute(
            q("load_questions", "answers.sql"), {"ids": [j.ref_id for j in jobs]})).fetchall()}
        versions = list(await (await conn.execute(q("routable_versions", "answers.sql"))).fetchall())
        work: list[AnswerWork] = []
        known: list[Outcome] = []
        for job in jobs:
            row = rows.get(job.ref_id)
            if row is None:
                known.append(Outcome(job, skip_reason="question gone or already answered"))
                continue
            text = row["text"]
            if len(text) > s.max_question_chars:
                known.append(Outcome(job, error=f"InputError: question has {len(text):,} characters, over "
                                                f"max_question_chars={s.max_question_chars:,}", retry=False))
                continue
            history: list[Turn] = []
            if row["session_id"] is not None and s.history_turns:
                past = await (await conn.execute(q("session_history", "answers.sql"), {
                    "session": row["session_id"], "before": row["id"], "limit": s.history_turns})).fetchall()
                history = [Turn(p["text"], p["answer"]) for p in reversed(past)]
            version = choose_version(versions, row["session_id"] or f"question-{row['id']}")
            # a follow-up ("and how do I undo it?") is retrieved with the previous question's context
            rq = f"{history[-1].question} {text}" if history else text
            work.append(AnswerWork(job, text, row["session_id"], version, history, rq))
        if not work:
            return work, known
        await self._load_rules(conn)
        for version in {w.version["id"]: w.version for w in work}.values():
            group = [w for w in work if w.version["id"] == version["id"]]
            embedder = await anyio.to_thread.run_sync(self.models.get, version)
            texts = [w.retrieval_query for w in group] + [w.question for w in group if w.retrieval_query != w.question]
            # the query embeddings come from the inference cache when this version embedded the same text before
            vecs = await embed_queries(conn, embedder, texts)
            rule_vecs = await self._rule_vectors_for(embedder)
            extra = iter(vecs[len(group):])
            for w, v in zip(group, vecs[: len(group)], strict=True):
                w.embedder, w.query_vector = embedder, v
                qv = v if w.retrieval_query == w.question else next(extra)
                w.guardrail = match_rules(qv, self._rules, rule_vecs, "question")
                if w.guardrail is None or w.guardrail["action"] != "block":
                    w.passages = await self._retrieve(conn, w)
        return work, known

    async def _load_rules(self, conn: psycopg.AsyncConnection) -> None:
        rules = list(await (await conn.execute(q("guardrail_rules", "answers.sql"))).fetchall())
        key = tuple((r["id"], r["text"], r["action"], r["threshold"]) for r in rules)
        if key != self._rules_key:
            self._rules, self._rules_key, self._rule_vectors = rules, key, {}

    async def _rule_vectors_for(self, embedder: Embedder) -> np.ndarray:
        vid = embedder.spec.version_id
        if vid not in self._rule_vectors:
            texts = [r["text"] for r in self._rules]
            self._rule_vectors[vid] = await anyio.to_thread.run_sync(embedder.encode, texts)
        return self._rule_vectors[vid]

    async def _retrieve(self, conn: psycopg.AsyncConnection, w: AnswerWork) -> list[Passage]:
        s, v = self.settings, w.version
        k = s.answer_top_k * (3 if s.hybrid else 1)
        vec_rows = list(await (await conn.execute(vector_sql(v), {"query": w.query_vector, "k": k})).fetchall())
        by_id = {r["chunk_id"]: r for r in vec_rows}
        order = [r["chunk_id"] for r in vec_rows]
        if s.hybrid:
            text_rows = list(await (await conn.execute(q("text_candidates", "answers.sql"),
                                                       {"text": w.retrieval_query, "k": k})).fetchall())
            missing = [r["chunk_id"] for r in text_rows if r["chunk_id"] not in by_id]
            if missing:
                scores = {r["chunk_id"]: float(r["score"]) for r in await (await conn.execute(
                    q("chunk_scores", "answers.sql"),
                    {"version": v["id"], "ids": missing, "query": w.query_vector})).fetchall()}
                for r in text_rows:
                    if r["chunk_id"] in scores:
                        by_id[r["chunk_id"]] = {**r, "score": scores[r["chunk_id"]]}
            order = rrf([order, [r["chunk_id"] for r in text_rows if r["chunk_id"] in by_id]])
        out = []
        for rank, cid in enumerate(order[: s.answer_top_k], 1):
            r = by_id[cid]
            out.append(Passage(rank, r["document_id"], cid, r["title"], r["source"], r["text"], float(r["score"])))
        return out

    # -- compute: answer, then the answer's own guardrail --------------------------------------
    def compute(self, work: list[AnswerWork]) -> list[Outcome]:
        out = []
        for w in work:
            if w.guardrail and w.guardrail["action"] == "block":
                out.append(Outcome(w.job, result=self._result(w, "blocked", Answer(BLOCKED_ANSWER, []), w.guardrail)))
                continue
            try:
                assert w.embedder is not None
                answer = self.answerer_for(w.embedder).answer(
                    Request(w.question, w.passages, w.history, w.query_vector))
                guard = w.guardrail
                if answer.text != NOT_FOUND and self._rules:
                    vec = w.embedder.encode([answer.text])[0]
                    hit = match_rules(vec, self._rules, self._rule_vectors[w.embedder.spec.version_id], "answer")
                    if hit and hit["action"] == "block":
                        out.append(Outcome(w.job, result=self._result(w, "blocked", Answer(BLOCKED_ANSWER, []), hit)))
                        continue
                    guard = guard or hit
                out.append(Outcome(w.job, result=self._result(w, "answered", answer, guard)))
            except ConfigError as exc:
                out.append(Outcome(w.job, error=str(exc), retry=False))
            except Exception as exc:  # noqa: BLE001 - one question's failure is that question's alone
                out.append(Outcome(w.job, error=describe(exc)))
        return out

    def _result(self, w: AnswerWork, status: str, answer: Answer, guard: dict | None) -> dict[str, Any]:
        return {"status": status, "answer": answer, "guardrail": guard, "version": w.version["id"],
                "retrieval_query": w.retrieval_query}

    # -- write ---------------------------------------------------------------------------------
    async def write(self, conn: psycopg.AsyncConnection, outcomes: list[Outcome]) -> WriteReport:
        report = WriteReport()
        for o in outcomes:
            r = o.result
            status, answer, guard = r["status"], r["answer"], r["guardrail"]
            await conn.execute(q("write_answer", "answers.sql"), {
                "id": o.job.ref_id, "status": status, "answer": answer.text, "sources": Jsonb(answer.sources),
                "version": r["version"], "retrieval_query": r["retrieval_query"],
                "guardrail": Jsonb(guard) if guard else None,
                "answerer": "guardrail" if status == "blocked" else self.settings.answerer})
            await conn.execute(q("notify_answer", "answers.sql"), {"id": o.job.ref_id, "status": status})
            report.written.append(o.job.id)
        return report

    async def record_failure(self, conn: psycopg.AsyncConnection, job: Job, error: str) -> None:
        await conn.execute(q("fail_question", "answers.sql"), {"id": job.ref_id, "error": error})
        await conn.execute(q("notify_answer", "answers.sql"), {"id": job.ref_id, "status": "failed"})
