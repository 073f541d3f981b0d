"""Benchmark `answer_quality` (issue 18): how good the answers are, per answerer, on the same retrieved passages.

Retrieval goes through the product's own path (the answer handler's ``_retrieve`` with the default settings) on
the embedded PostgreSQL docs corpus (bench/corpusdb.py); then every answerer answers the same passages:
``extractive-v1`` (the answerer of commit 211e1c9, frozen in bench/extractive_v1.py), ``extractive`` (today's
default, built as the handler builds it) and each ``--generator NAME=PATH`` (answerer = transformers, or
``--generator-runtime llama-cpp``, with that model path and ``--context`` tokens, built by the handler from the
settings).

Per answerer and per half of the dev questions and of the user-worded set (bench/devsplit.py's ``held_out``:
``tune``, ``report``, ``users-tune``, ``users-report``; the headline is ``report``, the larger ``users-report``
beside it):

- ``first_cite``: % of answers whose first citation ``[n]`` is a passage of a relevant page;
- ``any_cite``: % whose cited passages include a relevant page;
- ``grounded``: mean over answers (not "not found") of the share of their sentences whose best-matching sentence
  in the passages they cite has cosine >= ``--threshold`` (default model; a sentence without its own citation
  takes its run's, else the answer's; an answer citing nothing is not grounded). The threshold is calibrated on
  hand-labelled pairs (bench/data/groundedness_calibration.jsonl): the one that agrees best with the labels;
- ``gw_first_cite``: groundedness-weighted first-citation accuracy, mean over the half's questions of
  [first citation on a relevant page] x [the answer's groundedness] ("not found" counts 0);
- ``wrong_not_found``: % of these answerable questions answered "not found";
- ``rel_sentences``: % of answer sentences whose best match (cosine >= threshold) is in a passage of a relevant
  page: how much of what is said comes from the right page;
- ``answered`` / ``answered_first``: % of the questions with an answer pattern (bench/answer_patterns.py) whose
  answer quotes a sentence that answers them / starts with one: the right sentence, not only the right page;
- latency of ``answer()`` p50/p95 (ms); for generators, time to first token (first ``on_delta``) p50/p95 and
  tokens/s.

``short`` (bench/data/short_questions.jsonl): 26 questions that name a term and nothing else ("What is MVCC?"),
the figures above (``wrong_not_found`` most of all). On bench/data/unanswerable.jsonl (20 questions the PostgreSQL
15 docs cannot answer): ``not_found_ok``, the %
answered "not found". Then INSERT -> answer NOTIFY p50/p95 through a real worker (the default answerer).
``--samples PATH`` writes 20 answers per answerer (report half) as markdown for BENCHMARKS.md; ``--pairs PATH``
writes (answer sentence, best passage sentence, cosine) pairs to label for the calibration; ``--answers PATH`` every
answer of every set, with its flags and scores, as JSON lines.

    python -m bench.answer_quality [--generator qwen=/work/llm/qwen.gguf] [--samples /tmp/samples.md]
"""

from __future__ import annotations

import inspect
import json
import re
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import psycopg
from pgvector.psycopg import register_vector_async
from psycopg.rows import dict_row

from bench import answer_patterns
from bench.common import (
    ask_one_at_a_time, emit, machine, parser, pct, questions, run_benchmark, spawn_worker, stop, table)
from bench.corpusdb import corpus_clone
from bench.devsplit import held_out
from bench.extractive_v1 import ExtractiveV1Answerer
from bench.extractive_v1 import split_sentences as v1_split
from bench.teacher import teacher_ranker
from pgsynapse.answerers import NOT_FOUND, Answer, Passage, Request, split_sentences
from pgsynapse.config import load_settings
from pgsynapse.handlers.answer import AnswerHandler, AnswerWork
from pgsynapse.handlers.base import Job
from pgsynapse.models import ModelCache

HERE = Path(__file__).parent / "data"
CALIBRATION = HERE / "groundedness_calibration.jsonl"
UNANSWERABLE = HERE / "unanswerable.jsonl"
SHORT = HERE / "short_questions.jsonl"  # "What is MVCC?": a term and nothing else (session 33)
TEACHER_DATA = Path("/tmp/pgsynapse-bench-answer-quality")  # the teacher version's worker writes here
# a generator's own words for "not found" (the extractive answerers return NOT_FOUND itself)
_NOT_FOUND_WORDS = re.compile(r"could ?n[o']t find|can ?n[o']t find|cannot find|unable to find|no (?:relevant )?information|"
                              r"not (?:mentioned|covered|contain|provide)|do(?:es)? not (?:contain|mention|say)", re.I)
_CITE = re.compile(r"\[(\d+)\]")


def is_not_found(text: str) -> bool:
    return text.strip() == NOT_FOUND or (len(text) < 200 and bool(_NOT_FOUND_WORDS.search(text)))


def cited_ranks(text: str) -> list[int]:
    """The ``[n]`` of an answer in order of first appearance."""
    out: list[int] = []
    for m in _CITE.finditer(text):
        if int(m.group(1)) not in out:
            out.append(int(m.group(1)))
    return out


def answer_sentences(text: str) -> list[tuple[str, list[int]]]:
    """``(sentence without its markers, the ranks it cites)``; a sentence without a marker takes the next marked
    sentence's (a run of one passage cited once at its end)."""
    t = re.sub(r"((?:\s*\[\d+\])+)\s*([.!?])", r"\2\1", text)  # "... [1]." -> "... . [1]"
    t = re.sub(r"([.!?])((?:\s*\[\d+\])+)", lambda m: m.group(1) + m.group(2) + "\n\n", t)
    out: list[list[Any]] = []
    for s in split_sentences(t, prose_only=False):
        clean = _CITE.sub("", s).strip()
        clean = " ".join(clean.split())
        if len(clean) >= 20:
            out.append([clean, [int(x) for x in _CITE.findall(s)]])
    nxt: list[int] = []
    for item in reversed(out):
        if item[1]:
            nxt = item[1]
        elif nxt:
            item[1] = nxt
    return [(s, c) for s, c in out]


# -- retrieval through the product's path ------------------------------------------------------------------
async def retrieve(url: str, texts: list[str], version: dict[str, Any], models: ModelCache,
                   hybrid: bool | None = None, ranker: dict[str, Any] | None = None, top_k: int | None = None
                   ) -> list[tuple[list[Passage], np.ndarray]]:
    """Each text's passages and query vector, as the answer handler retrieves them (``top_k``: ``answer_top_k``)."""
    overrides = {k: v for k, v in (("hybrid", hybrid), ("answer_top_k", top_k)) if v is not None}
    settings = load_settings(environ={}, database_url=url, **overrides)
    handler = AnswerHandler(settings, models)
    embedder = await anyio.to_thread.run_sync(models.get, version)
    vecs = await anyio.to_thread.run_sync(embedder.encode, texts)
    out = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row) as conn:
        await register_vector_async(conn)
        for text, v in zip(texts, vecs, strict=True):
            w = AnswerWork(Job(0, "answer", 0, {}, 1, None), text, None, version, [], text, v,  # type: ignore[arg-type]
                           ranker=ranker)
            out.append((await handler._retrieve(conn, w), v))
    return out


# -- scoring --------------------------------------------------------------------------------------------------
class Grounding:
    """Sentence embeddings (cached) and the best-match cosine of an answer sentence in a set of passages."""

    def __init__(self, encode) -> None:
        self.encode = encode
        self.cache: dict[str, np.ndarray] = {}

    def vecs(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            for t, v in zip(new, self.encode(new), strict=True):
                self.cache[t] = np.asarray(v, dtype=np.float32)
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, 384), dtype=np.float32)

    def best(self, sentence: str, passages: list[Passage]) -> tuple[float, str, Passage | None]:
        # a passage's sentences as any of the answerers may quote them: its prose sentences, its pieces between
        # sentence ends and line breaks, and the pieces of the splitter of extractive-v1 (headings and all)
        cands = [(s, p) for p in passages
                 for s in dict.fromkeys([*split_sentences(p.text), *split_sentences(p.text, prose_only=False),
                                         *v1_split(p.text)])]
        if not cands:
            return 0.0, "", None
        sims = self.vecs([s for s, _ in cands]) @ self.vecs([sentence])[0]
        i = int(np.argmax(sims))
        return float(sims[i]), cands[i][0], cands[i][1]


def first_on_relevant(text: str, passages: list[Passage], relevant: set[str]) -> bool:
    """Whether an answer's first citation of a given passage is on a relevant page (never for "not found")."""
    by_rank = {p.rank: p for p in passages}
    ranks = [r for r in cited_ranks(text) if r in by_rank]
    return bool(ranks) and not is_not_found(text) and by_rank[ranks[0]].source in relevant


def train_split(train: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The train questions as two sets: ``train-tune``, every other one of the first 300 (indices 0, 2, ..., 298:
    what the extractive answerer's settings were tuned on), and ``train-heldout``, the odd ones and the last 40 (a
    second, larger report set; feedback-style phrasing). Each ``{"q", "relevant": {page}}``."""
    sets: dict[str, list[dict[str, Any]]] = {"train-tune": [], "train-heldout": []}
    for i, t in enumerate(train):
        sets["train-tune" if i % 2 == 0 and i < 300 else "train-heldout"].append({"q": t["q"], "relevant": {t["page"]}})
    return sets


def judge(ans: Answer, passages: list[Passage], relevant: set[str], g: Grounding, threshold: float,
          pattern: re.Pattern[str] | None = None) -> dict[str, Any]:
    by_rank = {p.rank: p for p in passages}
    ranks = [r for r in cited_ranks(ans.text) if r in by_rank]
    nf = is_not_found(ans.text)
    first = first_on_relevant(ans.text, passages, relevant)
    anyc = not nf and any(by_rank[r].source in relevant for r in ranks)
    sents = answer_sentences(ans.text) if not nf else []
    pairs, ok, on_rel = [], 0, 0
    for s, cites in sents:
        cited = [by_rank[r] for r in (cites or ranks) if r in by_rank]
        cos, match, p = g.best(s, cited) if cited else (0.0, "", None)
        pairs.append({"sentence": s, "passage_sentence": match, "cosine": round(cos, 4), "cites": cites or ranks})
        ok += cos >= threshold
        on_rel += cos >= threshold and p is not None and p.source in relevant
    grounded = ok / len(sents) if sents else (0.0 if not nf else None)
    answered, answered_first = answer_patterns.matches(pattern, [s for s, _ in sents]) if pattern else (None, None)
    return {"not_found": nf, "first": first, "any": anyc, "grounded": grounded, "pairs": pairs,
            "n_sentences": len(sents), "on_relevant": on_rel, "answered": answered, "answered_first": answered_first}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    answered = [r for r in rows if not r["not_found"]]
    sentences = sum(r["n_sentences"] for r in rows)
    return {
        "n": n,
        "first_cite": round(100 * sum(r["first"] for r in rows) / n, 1),
        "any_cite": round(100 * sum(r["any"] for r in rows) / n, 1),
        "grounded": round(100 * float(np.mean([r["grounded"] for r in answered])), 1) if answered else float("nan"),
        "gw_first_cite": round(100 * sum(r["first"] * (r["grounded"] or 0.0) for r in rows) / n, 1),
        "wrong_not_found": round(100 * (n - len(answered)) / n, 1),
        "rel_sentences": round(100 * sum(r["on_relevant"] for r in rows) / sentences, 1) if sentences else 0.0,
        **answer_patterns.figures(rows),
        "p50_ms": round(pct([r["ms"] for r in rows], 50), 1),
        "p95_ms": round(pct([r["ms"] for r in rows], 95), 1),
    }


def calibrate(path: Path = CALIBRATION) -> tuple[float, float, int]:
    """The threshold that agrees best with the hand labels, its agreement (%) and the number of labels."""
    labels = [json.loads(line) for line in path.open()] if path.exists() else []
    if not labels:
        return 0.7, float("nan"), 0
    cos = sorted({round(x["cosine"], 4) for x in labels})
    cuts = [(a + b) / 2 for a, b in zip(cos, cos[1:])] or cos

    def agreement(t: float) -> float:
        return sum((x["cosine"] >= t) == bool(x["supported"]) for x in labels) / len(labels)

    best = max(cuts, key=lambda t: (agreement(t), -abs(t - 0.7)))
    return round(best, 3), round(100 * agreement(best), 1), len(labels)


# -- answering ----------------------------------------------------------------------------------------------
def run_answerer(answerer, items: list[dict[str, Any]], tokenizer=None) -> list[dict[str, Any]]:
    streams = "on_delta" in inspect.signature(answerer.answer).parameters
    out = []
    for it in items:
        first: list[float] = []
        pieces: list[str] = []

        def on_delta(piece: str) -> None:
            if not first:
                first.append(time.perf_counter())
            pieces.append(piece)

        req = Request(it["q"], it["passages"], [], it["vector"])
        s = time.perf_counter()
        ans = answerer.answer(req, on_delta=on_delta) if streams else answerer.answer(req)
        end = time.perf_counter()
        row = {"answer": ans, "ms": (end - s) * 1000}
        if first:
            row["ttft_ms"] = (first[0] - s) * 1000
            n_tok = len(tokenizer.encode("".join(pieces), add_special_tokens=False)) if tokenizer else len(pieces)
            row["tokens"] = n_tok
            row["tok_s"] = n_tok / max(end - s, 1e-6)
        out.append(row)
    return out


def build_answerers(url: str, models: ModelCache, embedder, generators: list[str], max_new_tokens: int | None,
                    runtime: str = "transformers", context_tokens: int | None = None) -> dict[str, Any]:
    defaults = load_settings(environ={}, database_url=url)
    out: dict[str, Any] = {
        "extractive-v1": ExtractiveV1Answerer(lambda t: embedder.encode(t, defaults.encode_batch_size),
                                              not_found_threshold=defaults.not_found_threshold),
        "extractive": AnswerHandler(defaults, models).answerer_for(embedder),
    }
    for spec in generators:
        name, _, path = spec.partition("=")
        extra = {"answer_max_new_tokens": max_new_tokens} if max_new_tokens else {}
        if context_tokens:
            extra["answer_context_tokens"] = context_tokens
        s = load_settings(environ={}, database_url=url, answerer=runtime, answerer_model_path=path, **extra)
        out[name] = AnswerHandler(s, models).answerer_for(embedder)
    return out


def worker_latency(url: str, texts: list[str]) -> list[float]:
    worker = spawn_worker(url, {"PGSYNAPSE_KINDS": "answer"})
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            return ask_one_at_a_time(conn, texts, "quality")
    finally:
        stop(worker)


def samples_md(name: str, items: list[dict[str, Any]], rows: list[dict[str, Any]], k: int = 20) -> str:
    lines = [f"#### {name}", ""]
    for it, r in list(zip(items, rows, strict=True))[:k]:
        by_rank = {p.rank: p for p in it["passages"]}
        cites = [f"[{n}] {by_rank[n].title} ({by_rank[n].source}{' *' if by_rank[n].source in it['relevant'] else ''})"
                 for n in cited_ranks(r["answer"].text) if n in by_rank]
        lines.append(f"- **{it['q']}**  ")
        lines.append(f"  {' '.join(r['answer'].text.split())}  ")
        lines.append(f"  <sub>cited: {'; '.join(cites) or 'none'} (* = a relevant page)</sub>")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--generator", action="append", default=[], metavar="NAME=PATH",
                   help="a generative answerer: answerer = transformers with this model path (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer_max_new_tokens of the generators")
    p.add_argument("--generator-runtime", choices=["transformers", "llama-cpp"], default="transformers",
                   help="the generators' answerer")
    p.add_argument("--context", type=int, default=None, help="answer_context_tokens of the generators")
    p.add_argument("--threshold", type=float, default=None, help="groundedness cosine (default: calibrated)")
    p.add_argument("--worker-questions", type=int, default=100, help="questions asked through a real worker (0: skip)")
    p.add_argument("--samples", type=Path, default=None, help="write 20 answers per answerer (markdown) here")
    p.add_argument("--pairs", type=Path, default=None, help="write (sentence, best match, cosine) pairs here")
    p.add_argument("--answers", type=Path, default=None, help="write every answer (JSON lines: answerer, set, "
                   "question, text, flags, first citation relevant, groundedness) here")
    p.add_argument("--only", default=None, help="comma-separated answerer names to run (default: all)")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions of each set (development)")
    p.add_argument("--sets", default="tune,report,users-tune,users-report,train-heldout,unanswerable,short",
                   help="which question sets to run")
    p.add_argument("--teacher-vectors", type=Path, default=None, help="retrieval: the mpnet teacher as the ranker "
                   "(bench.ranker --teacher): its vectors computed elsewhere (bench/gpu_distill.py)")
    p.add_argument("--teacher-model", type=Path, default=None, help="with --teacher-vectors: its earlier ONNX export")
    p.add_argument("--hybrid", choices=["on", "off"], default=None, help="retrieval: full text fused (default: the setting's default)")
    args = p.parse_args()
    emit("answer_quality", "machine", **machine())
    threshold, agreement, n_labels = calibrate()
    if args.threshold is not None:
        threshold = args.threshold
    emit("answer_quality", "groundedness_threshold", threshold=threshold, label_agreement=agreement, labels=n_labels)
    dev = questions("pg_docs_dev.jsonl")
    halves = held_out()
    unanswerable = [json.loads(line) for line in UNANSWERABLE.open()]
    models = ModelCache()
    with corpus_clone(database_url=args.database_url) as (url, info):
        emit("answer_quality", "corpus", **info)
        with psycopg.connect(url, row_factory=dict_row) as conn:
            version = conn.execute("SELECT id, name, artifact_path, runtime, dim, status FROM pgsynapse.model_versions"
                                   " WHERE status = 'active'").fetchone()
        ranker = None
        if args.teacher_vectors:  # the teacher version orders the first rank_candidates chunks (handler._rank)
            teacher, ranker, bf = teacher_ranker(load_settings(environ={}, database_url=url, data_dir=TEACHER_DATA),
                                                 url, args.teacher_vectors, args.teacher_model, status="active")
            emit("answer_quality", "ranker", ranker=ranker["id"], teacher=teacher["id"], runtime=teacher["runtime"],
                 preloaded=bf["preloaded"])
        embedder = models.get(version)
        sets = {name: [{"q": q["q"], "relevant": set(q["relevant"])} for q in items] for name, items in halves.items()}
        sets["unanswerable"] = [{"q": q["q"], "relevant": set()} for q in unanswerable]
        sets["short"] = [{"q": q["q"], "relevant": set(q["relevant"])} for q in map(json.loads, SHORT.open())]
        # train questions no setting was chosen on: a second, larger report set (feedback-style phrasing)
        sets["train-heldout"] = train_split(questions("pg_docs_train.jsonl"))["train-heldout"]
        sets = {k: v[: args.limit] if args.limit else v for k, v in sets.items() if k in args.sets.split(",")}
        every = [it for items in sets.values() for it in items]
        for it, (passages, vec) in zip(every, anyio.run(retrieve, url, [it["q"] for it in every], version, models,
                                                                None if args.hybrid is None else args.hybrid == "on",
                                                                ranker),
                                       strict=True):
            it["passages"], it["vector"] = passages, vec
        g = Grounding(lambda t: embedder.encode(t))
        patterns = {**answer_patterns.load(), **answer_patterns.load(answer_patterns.SHORT_PATTERNS)}
        answerers = build_answerers(url, models, embedder, args.generator, args.max_new_tokens,
                                    args.generator_runtime, args.context)
        if args.only:
            answerers = {k: v for k, v in answerers.items() if k in args.only.split(",")}
        samples, pairs, every_answer = [], [], []
        for name, answerer in answerers.items():
            answerer.answer(Request("warm up", every[0]["passages"], [], every[0]["vector"]))
            tok = getattr(answerer, "tokenizer", None)
            for half, items in sets.items():
                rows = run_answerer(answerer, items, tok)
                for it, r in zip(items, rows, strict=True):
                    r.update(judge(r["answer"], it["passages"], it["relevant"], g, threshold, patterns.get(it["q"])))
                    pairs.extend({"answerer": name, "question": it["q"], "against": "cited", **pr} for pr in r["pairs"])
                    if args.pairs and r["pairs"]:
                        # the same sentence against the passages it does not cite: what a wrong citation looks like
                        cites = set(cited_ranks(r["answer"].text))
                        others = [p for p in it["passages"] if p.rank not in cites]
                        pr = r["pairs"][0]
                        cos, match, _ = g.best(pr["sentence"], others)
                        pairs.append({"answerer": name, "question": it["q"], "against": "uncited",
                                      "sentence": pr["sentence"], "passage_sentence": match, "cosine": round(cos, 4)})
                every_answer += [{"answerer": name, "set": half, "question": it["q"], "text": r["answer"].text,
                                  "flags": r["answer"].flags, "first_relevant": r["first"], "grounded": r["grounded"],
                                  "answered": r["answered"], "answered_first": r["answered_first"]}
                                 for it, r in zip(items, rows, strict=True)]
                if args.answers:
                    args.answers.write_text("".join(json.dumps(x) + "\n" for x in every_answer))
                if half == "unanswerable":
                    nf = sum(r["not_found"] for r in rows)
                    emit("answer_quality", f"{name}/unanswerable", n=len(rows), not_found_ok=round(100 * nf / len(rows), 1),
                         p50_ms=round(pct([r["ms"] for r in rows], 50), 1))
                    continue
                extra = {}
                if any("ttft_ms" in r for r in rows):
                    tt = [r["ttft_ms"] for r in rows if "ttft_ms" in r]
                    extra = {"ttft_p50_ms": round(pct(tt, 50), 1), "ttft_p95_ms": round(pct(tt, 95), 1),
                             "tok_s": round(float(np.median([r["tok_s"] for r in rows if "tok_s" in r])), 1)}
                emit("answer_quality", f"{name}/{half}", **summarise(rows), **extra)
                if half == "report":
                    samples.append(samples_md(name, items, rows))
                # written as they come: a long generator run leaves what it has
                if args.samples:
                    args.samples.write_text("\n".join(samples))
                if args.pairs:
                    args.pairs.write_text("".join(json.dumps(x) + "\n" for x in pairs))
        if args.worker_questions:
            texts = [q["q"] for q in dev] + [q["q"] for q in questions("pg_docs_train.jsonl")]
            lat = worker_latency(url, texts[: args.worker_questions])
            emit("answer_quality", "extractive/insert_to_answer_notify_ms", n=len(lat), p50=round(pct(lat, 50), 1),
                 p95=round(pct(lat, 95), 1))
    table()


if __name__ == "__main__":
    run_benchmark(main)
