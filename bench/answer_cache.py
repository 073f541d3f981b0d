"""Benchmark `answer_cache` (issue 18, item 4): the semantic answer cache on a replay of the dev and train questions
and their paraphrases (bench/data/paraphrases.jsonl) over the embedded PostgreSQL docs corpus.

The stream: every original question once (dev, then train), then every paraphrase (a fixed shuffle). A hit is
*false* when the question it was served from has no relevant page in common with the asking question's: a wrong
answer served fast.

1. threshold sweep (no worker): each question's most similar earlier question in the stream, by the same model
   version's embeddings the worker uses; hit rate and false-hit rate per threshold. The default threshold is chosen
   on the tune half only: train questions and the dev questions of the tune half (bench/devsplit.py's rule), the
   lowest threshold whose hits are at most ``--max-false-share`` false; figures are reported on the report half.
2. replay (real worker, `pgsynapse run`, cache on at that threshold): the stream asked one question at a time,
   INSERT -> answer NOTIFY latency of hits and misses (p50/p95), hit and false-hit rates as served (entries that
   are never stored, such as "not found" answers, are not there to hit), and the lookup's own time (its SQL
   against the filled cache, the overhead every miss pays).

3. contrasts (no worker): pairs of questions that read alike and want different answers (negations, directions,
   degrees: "nullable" / "not nullable", "increase" / "decrease shared_buffers"; bench/data/cache_contrasts.jsonl,
   written by hand, halved by the first question's text as the dev questions are): how many pairs are similar
   enough for the cache at the default threshold, and how many of them it would serve the other's answer
   (:func:`may_share`: the same exact terms, no things in swapped roles).

    python -m bench.answer_cache [--quick] [--threshold T] [--no-replay]
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row

from bench.common import RESULTS, emit, machine, parser, pct, questions, run_benchmark, spawn_worker, stop, table
from bench.corpusdb import corpus_clone
from bench.devsplit import half
from bench.paraphrases import OUT as PARAPHRASES
from pgsynapse.answer_cache import NEAREST, lookup_sql, may_share
from pgsynapse.config import load_settings
from pgsynapse.models import ModelCache

THRESHOLDS = [round(0.80 + 0.01 * i, 2) for i in range(20)]
CONTRASTS = Path(__file__).parent / "data" / "cache_contrasts.jsonl"


def stream(quick: bool) -> list[dict[str, Any]]:
    """Originals (dev, then train), then paraphrases in a fixed shuffle; each with its pages, set, kind and half
    (the half of its original dev question; train questions are all tuning material)."""
    dev = questions("pg_docs_dev.jsonl")
    train = questions("pg_docs_train.jsonl")[: 60 if quick else None]
    items = [{"q": d["q"], "of": d["q"], "pages": d["relevant"], "set": "dev", "kind": "original"} for d in dev]
    items += [{"q": t["q"], "of": t["q"], "pages": [t["page"]], "set": "train", "kind": "original"} for t in train]
    asked = {i["q"] for i in items}
    para = [json.loads(line) for line in PARAPHRASES.open()]
    para = [p for p in para if p["of"] in asked]
    para.sort(key=lambda p: hashlib.md5(p["q"].encode()).hexdigest())
    out = items + para
    for item in out:
        item["half"] = half(item["of"]) if item["set"] == "dev" else "tune"
    return out


def nearest_earlier(items: list[dict[str, Any]], vecs: np.ndarray, k: int = NEAREST) -> tuple[np.ndarray, np.ndarray]:
    """For each question, the earlier question the cache would serve it from and their cosine (-1, -inf when
    none): as the lookup does, the most similar of the ``k`` nearest earlier ones that it may share an answer with
    (:func:`may_share`: the same exact terms, no things in swapped roles)."""
    sims = vecs @ vecs.T
    idx = np.full(len(items), -1)
    best = np.full(len(items), -np.inf)
    for i in range(1, len(items)):
        for j in np.argsort(-sims[i, :i], kind="stable")[:k]:
            if may_share(items[i]["q"], items[j]["q"]):
                idx[i], best[i] = int(j), sims[i, j]
                break
    return idx, best


def sweep(items: list[dict[str, Any]], idx: np.ndarray, best: np.ndarray, max_false_share: float) -> float:
    """Hit and false-hit rates per threshold on both halves; returns the lowest threshold whose false hits are at
    most ``max_false_share`` of its hits on the tune half."""
    page = np.array([j >= 0 and bool(set(it["pages"]) & set(items[j]["pages"])) for it, j in zip(items, idx)])
    same = np.array([j >= 0 and items[j]["of"] == it["of"] for it, j in zip(items, idx)])
    para = np.array([it["kind"] != "original" for it in items])
    chosen = None
    for t in THRESHOLDS:
        row: dict[str, Any] = {"threshold": t}
        for h in ("tune", "report"):
            mask = np.array([it["half"] == h for it in items])
            hit = (best >= t) & mask
            n_hit = max(1, int(hit.sum()))
            row[f"{h}_hit_rate"] = round(hit.sum() / mask.sum(), 3)
            row[f"{h}_paraphrase_hit_rate"] = round((hit & para).sum() / (mask & para).sum(), 3)
            row[f"{h}_false_hit_rate"] = round((hit & ~page).sum() / mask.sum(), 4)
            row[f"{h}_false_share_of_hits"] = round((hit & ~page).sum() / n_hit, 4)
            row[f"{h}_other_question_share_of_hits"] = round((hit & ~same).sum() / n_hit, 4)
        emit("answer_cache", "sweep", **row)
        if chosen is None and row["tune_false_share_of_hits"] <= max_false_share:
            chosen = t
    return chosen if chosen is not None else THRESHOLDS[-1]


def contrasts(encode, thresholds: dict[str, float]) -> None:
    """Per half of the contrast pairs and per threshold: the pairs at least that similar, and those of them the
    cache would serve each other's answer (:func:`may_share`)."""
    pairs = [json.loads(line) for line in CONTRASTS.open()]
    vecs = encode([p["a"] for p in pairs] + [p["b"] for p in pairs])
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    sims = np.sum(vecs[: len(pairs)] * vecs[len(pairs):], axis=1)
    for name, t in thresholds.items():
        for h in ("tune", "report"):
            mine = [(p, float(c)) for p, c in zip(pairs, sims, strict=True) if half(p["a"]) == h]
            similar = [(p, c) for p, c in mine if c >= t]
            served = [(p, c) for p, c in similar if may_share(p["b"], p["a"])]
            emit("answer_cache", "contrasts", threshold=name, at=t, half=h, pairs=len(mine), similar=len(similar),
                 served_the_other_answer=len(served))
            for p, c in served:
                emit("answer_cache", "contrast_served", half=h, similarity=round(c, 3), a=p["a"], b=p["b"])


def replay(url: str, items: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    worker = spawn_worker(url, {"PGSYNAPSE_KINDS": "answer", "PGSYNAPSE_ANSWER_CACHE": "true",
                                "PGSYNAPSE_ANSWER_CACHE_THRESHOLD": str(threshold)})
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("LISTEN pgsynapse_answers")
            # one question first, not measured: the worker's first answer loads its model
            qid = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('warm-up question, not measured')"
                               " RETURNING id").fetchone()[0]
            for n in conn.notifies(timeout=300):
                if json.loads(n.payload)["id"] == qid:
                    break
            for it in items:
                s = time.perf_counter()
                qid = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES (%s) RETURNING id",
                                   (it["q"],)).fetchone()[0]
                for n in conn.notifies(timeout=120):
                    if json.loads(n.payload)["id"] == qid:
                        break
                it["ms"] = (time.perf_counter() - s) * 1000
                it["id"] = qid
    finally:
        stop(worker)
    with psycopg.connect(url, row_factory=dict_row) as conn:
        rows = {r["id"]: r for r in conn.execute(
            "SELECT id, status, answerer, cached_from, answer, latency_ms FROM pgsynapse.questions")}
    by_id = {it["id"]: it for it in items}
    for it in items:
        r = rows[it["id"]]
        it["hit"] = r["answerer"] == "cache"
        it["origin"] = by_id.get(r["cached_from"], {"q": "(warm-up)", "of": "", "pages": []}) if r["cached_from"] else None
        it["false"] = bool(it["hit"] and not set(it["pages"]) & set(it["origin"]["pages"]))
        it["other"] = bool(it["hit"] and it["origin"]["of"] != it["of"])
    return items


def report(items: list[dict[str, Any]], name: str) -> None:
    if not items:
        return
    hits = [it for it in items if it["hit"]]
    misses = [it for it in items if not it["hit"]]
    emit("answer_cache", name, n=len(items), hit_rate=round(len(hits) / len(items), 3),
         false_hit_rate=round(sum(it["false"] for it in items) / len(items), 4),
         other_question_hits=sum(it["other"] for it in items),
         hit_ms_p50=round(pct([it["ms"] for it in hits], 50), 1), hit_ms_p95=round(pct([it["ms"] for it in hits], 95), 1),
         miss_ms_p50=round(pct([it["ms"] for it in misses], 50), 1),
         miss_ms_p95=round(pct([it["ms"] for it in misses], 95), 1))


def lookup_overhead(url: str, version: dict[str, Any], vecs: np.ndarray, threshold: float) -> None:
    """The lookup SQL alone against the filled cache: what a miss pays for the cache."""
    from pgvector.psycopg import register_vector

    sql = lookup_sql(version)
    t = []
    with psycopg.connect(url, row_factory=dict_row) as conn:
        register_vector(conn)
        n = conn.execute("SELECT count(*) AS n FROM pgsynapse.answer_cache").fetchone()["n"]
        for v in vecs[:200]:
            s = time.perf_counter()
            conn.execute(sql, {"query": v, "k": NEAREST, "threshold": threshold, "settings_key": "", "rules_key": "",
                               "max_age": 0}).fetchall()
            t.append((time.perf_counter() - s) * 1000)
    emit("answer_cache", "lookup_sql_ms", entries=n, p50=round(pct(t, 50), 2), p95=round(pct(t, 95), 2))


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--threshold", type=float, default=None, help="replay at this threshold (default: the chosen one)")
    p.add_argument("--max-false-share", type=float, default=0.0025,
                   help="the chosen threshold's false hits, as a share of its hits on the tune half, at most this")
    p.add_argument("--no-replay", action="store_true", help="the sweep and the contrasts only (no worker)")
    args = p.parse_args()
    emit("answer_cache", "machine", **machine())
    items = stream(args.quick)
    with corpus_clone(database_url=args.database_url) as (url, info):
        emit("answer_cache", "corpus", **info)
        with psycopg.connect(url, row_factory=dict_row) as conn:
            version = conn.execute("SELECT id, name, artifact_path, runtime, dim, status FROM pgsynapse.model_versions"
                                   " WHERE status = 'active'").fetchone()
        model = ModelCache().get(version)
        vecs = model.encode([it["q"] for it in items])
        vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        idx, best = nearest_earlier(items, vecs)
        chosen = sweep(items, idx, best, args.max_false_share)
        threshold = args.threshold if args.threshold is not None else chosen
        emit("answer_cache", "threshold", chosen_on_tune=chosen, replayed_at=threshold,
             max_false_share=args.max_false_share, questions=len(items), runtime=version["runtime"])
        contrasts(model.encode, {"default": load_settings(environ={}).answer_cache_threshold, "chosen": chosen})
        if args.no_replay:
            table([r for r in RESULTS if r["name"] in ("sweep", "contrasts")])
            return
        replay(url, items, threshold)
        report(items, "replay_all")
        report([it for it in items if it["half"] == "report"], "replay_dev_report_half")
        report([it for it in items if it["half"] == "report" and it["kind"] == "hand"], "replay_dev_report_hand")
        report([it for it in items if it["half"] == "tune"], "replay_tune_half")
        report([it for it in items if it["kind"] == "original"], "replay_originals")
        report([it for it in items if it["kind"] != "original"], "replay_paraphrases")
        lookup_overhead(url, version, vecs, threshold)
        falses = [it for it in items if it["false"]][:10]
        for it in falses:
            emit("answer_cache", "false_hit_example", q=it["q"], served_from=it["origin"]["q"],
                 pages=it["pages"], origin_pages=it["origin"]["pages"])
    table([r for r in RESULTS if r["name"] in ("sweep", "contrasts")])
    table([r for r in RESULTS if r["name"].startswith("replay")])
    table([r for r in RESULTS if r["name"] in ("machine", "corpus", "threshold", "lookup_sql_ms")])


if __name__ == "__main__":
    run_benchmark(main)
