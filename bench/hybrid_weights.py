"""Benchmark `hybrid_weights` (issue 18): how full-text ranks should be fused with vector ranks, chosen honestly.

The answer handler's two candidate lists, fetched once per question with its own SQL (``vector_candidates`` over
the active version's HNSW index, ``text_candidates``: ``ts_rank`` over the OR-ed question words), each ``--depth``
chunks deep (default 15, the handler's own: ``answer_top_k`` 5 x 3), then fused offline by the handler's weighted
reciprocal-rank fusion (``rrf``), score(chunk) = 1 / (k + vector rank) + w / (k + text rank), for every ``w``
(``--weights``; 0 is the vector order) and ``k`` (``--ks``). Page level recall@5 / MRR@10 per question set of bench/devsplit.py's
``held_out`` and on the 340 train questions (nothing is trained here).

A setting is chosen on the ``tune``, ``users-tune`` and ``train`` sets only (``--choose``: the best mean MRR@10 over
them, recall@5 not lower than the vector order's on any of them); the ``report`` halves are printed for the
chosen setting, the product's and the vector order only.

``--page-votes``: a fused chunk also gets this share of the fused scores of the other chunks of its page in the
lists (a page that several candidates come from ranks higher; 0, the product's, is plain fusion), tried at every
weight. Measured in session 19 and not adopted (BENCHMARKS.md, "answers").

``--text-ranks``: the full-text lists to try, the product's (``or_ts_rank``) and any of bench.text_rank_variants'
(``bm25``: Okapi BM25 with idf), each fused at every weight; the text query's median time is printed for each.

    python -m bench.hybrid_weights
    python -m bench.hybrid_weights --text-ranks or_ts_rank,bm25 --weights 0,0.5,0.75,1,1.5 --ks 60
    python -m bench.hybrid_weights --weights 0.75 --ks 60 --page-votes 0,0.1,0.25,0.5,1
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg.rows import dict_row

from bench.common import emit, machine, parser, questions, run_benchmark, table
from bench.corpusdb import corpus_clone
from bench.devsplit import held_out
from bench.retrieval import score
from bench.text_rank_variants import MAX_ROWS, VARIANTS
from pgsynapse.handlers.answer import vector_sql
from pgsynapse.learning.metrics import distinct_documents
from pgsynapse.models import ModelCache
from pgsynapse.queries import q as sql
from pgsynapse.retrieval import RRF_K, rrf_scores

B = "hybrid_weights"
CHOOSE = ("tune", "users-tune", "train")
REPORT = ("report", "users-report")


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--depth", type=int, default=15,
                   help="chunks per candidate list (the handler's: answer_top_k 5 x 3; bench.answers': 40 x 3)")
    p.add_argument("--weights", default="0,0.25,0.5,0.75,1,1.5,2")
    p.add_argument("--ks", default="10,30,60")
    p.add_argument("--text-ranks", default="or_ts_rank", help=f"of: {', '.join(VARIANTS)}")
    p.add_argument("--page-votes", default="0", help="shares of a page's other fused chunks' scores a chunk adds")
    args = p.parse_args()
    ranks = args.text_ranks.split(",")
    emit(B, "machine", **machine())
    sets: dict[str, list[dict[str, Any]]] = {**held_out(), "train": [
        {"q": t["q"], "relevant": [t["page"]]} for t in questions("pg_docs_train.jsonl")]}
    models = ModelCache()
    with corpus_clone(database_url=args.database_url) as (url, info), psycopg.connect(url, row_factory=dict_row) as conn:
        emit(B, "corpus", **info)
        register_vector(conn)
        version = conn.execute("SELECT id, name, artifact_path, runtime, dim, status FROM pgsynapse.model_versions"
                               " WHERE status = 'active'").fetchone()
        embedder = models.get(version)
        page: dict[int, str] = {}
        vector: dict[str, list[list[int]]] = {}
        text: dict[str, dict[str, list[list[int]]]] = {r: {} for r in ranks}
        took: dict[str, list[float]] = {r: [] for r in ranks}
        for name, items in sets.items():
            vecs = embedder.encode([it["q"] for it in items])
            vector[name] = []
            for r in ranks:
                text[r][name] = []
            for it, v in zip(items, vecs, strict=True):
                vrows = conn.execute(vector_sql(version), {"query": v, "k": args.depth}).fetchall()
                page.update({row["chunk_id"]: row["source"] for row in vrows})
                vector[name].append([row["chunk_id"] for row in vrows])
                for r in ranks:
                    started = time.perf_counter()
                    query = sql("text_candidates", "answers.sql") if r == "or_ts_rank" else VARIANTS[r]
                    trows = conn.execute(query, {"text": it["q"], "k": args.depth, "max_rows": MAX_ROWS}).fetchall()
                    took[r].append(1000 * (time.perf_counter() - started))
                    page.update({row["chunk_id"]: row["source"] for row in trows})
                    text[r][name].append([row["chunk_id"] for row in trows])
    for r in ranks:
        emit(B, "text_query", text_rank=r, p50_ms=round(statistics.median(took[r]), 1))
    results: dict[tuple[str, float, int, float], dict[str, dict[str, float]]] = {}
    weights = sorted({0.0, *(float(x) for x in args.weights.split(","))})  # the vector order: the rule's floor
    ks = [int(x) for x in args.ks.split(",")]
    votes = sorted({float(x) for x in args.page_votes.split(",")})
    for r, w, k, vote in itertools.product(ranks, weights, ks, votes):
        if w == 0 and (k != ks[0] or r != ranks[0] or vote != votes[0]):
            continue  # the vector order depends on none of them
        key = ("vector", 0.0, RRF_K, 0.0) if w == 0 else (r, w, k, vote)
        results[key] = {name: score([distinct_documents(voted(rrf_scores([v, t], [1.0, w], k), page, key[3]), page)
                                     for v, t in zip(vector[name], text[r][name], strict=True)],
                                    [set(it["relevant"]) for it in sets[name]]) for name in sets}
        emit(B, "choose", text_rank=key[0], weight=w, k=key[2], page_vote=key[3],
             **{f"{n}_{m}": results[key][n][m] for n in CHOOSE for m in ("recall@5", "mrr@10")},
             mean_mrr10=round(statistics.mean(results[key][n]["mrr@10"] for n in CHOOSE), 4))
    base = results[("vector", 0.0, RRF_K, 0.0)]
    ok = {key: r for key, r in results.items()
          if all(r[n]["recall@5"] >= base[n]["recall@5"] for n in CHOOSE)}
    chosen = max(ok, key=lambda key: statistics.mean(ok[key][n]["mrr@10"] for n in CHOOSE))
    product = ("or_ts_rank", 0.75, RRF_K, 0.0)
    for key in dict.fromkeys([("vector", 0.0, RRF_K, 0.0), product, chosen]):
        if key in results:
            emit(B, "report", text_rank=key[0], weight=key[1], k=key[2], page_vote=key[3], chosen=key == chosen,
                 **{f"{n}_{m}": results[key][n][m] for n in REPORT for m in ("recall@5", "mrr@10")})
    table()


def voted(scores: dict[int, float], page: dict[int, str], vote: float) -> list[int]:
    """The fused chunks best first, each chunk's score raised by ``vote`` x the scores of its page's other chunks."""
    if vote:
        total: dict[str, float] = {}
        for cid, s in scores.items():
            total[page[cid]] = total.get(page[cid], 0.0) + s
        scores = {cid: s + vote * (total[page[cid]] - s) for cid, s in scores.items()}
    return sorted(scores, key=lambda c: -scores[c])


if __name__ == "__main__":
    run_benchmark(main)
