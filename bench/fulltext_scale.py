"""Benchmark `fulltext_scale`: the answers' full-text query (``text_candidates``, the hybrid default's other list) as
the chunks table grows.

The docs corpus (bench/corpusdb.py, 7,087 chunks) is copied into itself ``--copies`` times (the same texts under other
``ord``s, so every copy's ``tsv`` and the GIN index are real); at each size the product's own SQL runs for the first
``--questions`` dev questions, 15 deep (the handler's depth at ``answer_top_k`` 5), twice, at each bound of
``--max-rows`` (``hybrid_text_max_rows``; ``off`` ranks every chunk with one of the words, as before session 16).
Prints the p50/p95/max latency, how many chunks the OR-ed question words match and how many of them the bound lets
the query rank. The vector side is an HNSW index scan and is measured by ``bench.scale --part vectors``.

    python -m bench.fulltext_scale [--copies 1,10,50] [--questions 40] [--max-rows off,20000]
"""

from __future__ import annotations

import statistics
import time

import psycopg
from psycopg.rows import dict_row

from bench.common import emit, machine, parser, pct, questions, run_benchmark, table
from bench.corpusdb import corpus_clone
from bench.text_rank_variants import MAX_ROWS, OR
from pgsynapse.queries import q

B = "fulltext_scale"
COPY = """INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start, char_end, content_hash)
SELECT document_id, ord + 100000 * g, text, token_count, char_start, char_end, content_hash
FROM pgsynapse.chunks CROSS JOIN generate_series(%(first)s::int, %(last)s::int) g WHERE ord < 100000"""
MATCHED = f"SELECT count(*) AS n FROM pgsynapse.chunks c WHERE c.tsv @@ {OR}"  # the product's query, its matches
UNBOUNDED = 10**15
# The chunks the product's query ranks under a bound: its CTEs up to the ranking, then its FROM and WHERE counted.
_PRODUCT = q("text_candidates", "answers.sql")
_HEAD, _RANKING = _PRODUCT.split("ranked AS (")
RANKED = _HEAD.rstrip().rstrip(",") + " SELECT count(*) AS n FROM" + _RANKING.split(" FROM", 1)[1].split(" ORDER BY")[0]


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--copies", default="1,10,50", help="sizes, in copies of the corpus (increasing)")
    p.add_argument("--questions", type=int, default=40)
    p.add_argument("--max-rows", default=f"off,{MAX_ROWS}", help="bounds to time (off: none)")
    args = p.parse_args()
    bounds = [UNBOUNDED if b == "off" else int(b) for b in args.max_rows.split(",")]
    emit(B, "machine", **machine())
    texts = [d["q"] for d in questions("pg_docs_dev.jsonl")][: args.questions]
    with corpus_clone(database_url=args.database_url) as (url, info), psycopg.connect(url, row_factory=dict_row, autocommit=True) as conn:
        have = 1
        for copies in (int(x) for x in args.copies.split(",")):
            if copies > have:
                started = time.perf_counter()
                conn.execute(COPY, {"first": have, "last": copies - 1})
                conn.execute("VACUUM ANALYZE pgsynapse.chunks")
                emit(B, "grown", copies=copies, seconds=round(time.perf_counter() - started, 1))
                have = copies
            chunks = conn.execute("SELECT count(*) AS n FROM pgsynapse.chunks").fetchone()["n"]
            matched = [conn.execute(MATCHED, {"text": t}).fetchone()["n"] for t in texts]
            for bound in bounds:
                ranked = [conn.execute(RANKED, {"text": t, "max_rows": bound}).fetchone()["n"]
                          for t in texts]
                for run in (1, 2):
                    took = []
                    for t in texts:
                        started = time.perf_counter()
                        conn.execute(q("text_candidates", "answers.sql"), {"text": t, "k": 15, "max_rows": bound}
                                     ).fetchall()
                        took.append(1000 * (time.perf_counter() - started))
                    emit(B, "text_candidates", chunks=chunks, max_rows="off" if bound == UNBOUNDED else bound,
                         run=run, p50_ms=round(statistics.median(took), 1), p95_ms=round(pct(took, 95), 1),
                         max_ms=round(max(took), 1), matched_p50=int(statistics.median(matched)),
                         matched_share=round(statistics.median(matched) / chunks, 3),
                         ranked_p50=int(statistics.median(ranked)), ranked_max=max(ranked))
    table()


if __name__ == "__main__":
    run_benchmark(main)
