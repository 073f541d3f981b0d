"""Which full-text query and rank make hybrid retrieval help: page-level recall@5 / MRR@10 of vector-only and of
RRF-fused hybrid with several full-text variants, on the dev questions and on the train questions (as a second,
larger check: nothing is trained here, the variants are only compared).

    python -m bench.text_rank_variants

The product's variant is ``or_ts_rank`` (src/pgsynapse/sql/answers.sql, ``text_candidates``).
"""

from __future__ import annotations

import anyio
import psycopg

from bench.common import emit, machine, parser, questions, run_benchmark, table
from bench.corpusdb import corpus_clone
from bench.retrieval import retrieve_pages, score
from pgsynapse.config import Settings
import pgsynapse.handlers.answer as answer_handler
from pgsynapse.models import ModelCache
from pgsynapse.queries import q as sql

BASE = """SELECT c.id AS chunk_id, c.document_id, d.title, d.source, c.text, {rank} AS text_rank
FROM (SELECT {query} AS query) qq, pgsynapse.chunks c JOIN pgsynapse.documents d ON d.id = c.document_id
WHERE c.tsv @@ qq.query ORDER BY text_rank DESC, c.id LIMIT %(k)s"""
AND = "websearch_to_tsquery('english', %(text)s)"
OR = "replace(plainto_tsquery('english', %(text)s)::text, ' & ', ' | ')::tsquery"
VARIANTS = {
    "and_ts_rank_cd": BASE.format(rank="ts_rank_cd(c.tsv, qq.query)", query=AND),
    "or_ts_rank_cd": BASE.format(rank="ts_rank_cd(c.tsv, qq.query)", query=OR),
    "or_ts_rank_cd_norm2": BASE.format(rank="ts_rank_cd(c.tsv, qq.query, 2)", query=OR),
    "or_ts_rank_norm1": BASE.format(rank="ts_rank(c.tsv, qq.query, 1)", query=OR),
    "or_ts_rank": BASE.format(rank="ts_rank(c.tsv, qq.query)", query=OR),
}
# Okapi BM25 over the chunks' tsvectors (k1 1.2, b 0.75, the textbook values): ts_rank has no idf, so a chunk with
# the question's common words ("table", "use") outranks one with its one rare word. Document frequencies are
# counted through the GIN index per query word; N and the mean length over all chunks (a scan: ~5 ms on 7,087
# chunks, which a product would keep in a statistics row). Tried in session 15: BENCHMARKS.md, "answers".
VARIANTS["bm25"] = """
WITH q AS (SELECT DISTINCT lexeme FROM unnest(to_tsvector('english', %(text)s))),
st AS MATERIALIZED (SELECT count(*)::float8 AS n, avg(length(tsv))::float8 AS avglen FROM pgsynapse.chunks),
df AS MATERIALIZED (SELECT q.lexeme, (SELECT count(*) FROM pgsynapse.chunks c
                                      WHERE c.tsv @@ quote_literal(q.lexeme)::tsquery)::float8 AS df FROM q),
cand AS (SELECT c.id, c.tsv FROM pgsynapse.chunks c,
         (SELECT string_agg(quote_literal(lexeme), ' | ')::tsquery AS query FROM q) qq WHERE c.tsv @@ qq.query),
scored AS (
    SELECT cand.id, sum(ln(1 + (st.n - df.df + 0.5) / (df.df + 0.5))
                        * (coalesce(array_length(u.positions, 1), 1) * 2.2)
                        / (coalesce(array_length(u.positions, 1), 1)
                           + 1.2 * (0.25 + 0.75 * length(cand.tsv) / st.avglen))) AS text_rank
    FROM cand CROSS JOIN LATERAL unnest(cand.tsv) u JOIN df ON df.lexeme = u.lexeme, st
    GROUP BY cand.id)
SELECT c.id AS chunk_id, c.document_id, d.title, d.source, c.text, s.text_rank
FROM scored s JOIN pgsynapse.chunks c ON c.id = s.id JOIN pgsynapse.documents d ON d.id = c.document_id
ORDER BY s.text_rank DESC, c.id LIMIT %(k)s"""

# The question's words, each with the share of the chunks it is in (0 when ANALYZE did not list it) and its rank
# from the rarest (n).
WORD_SHARES = """
WITH words AS (SELECT DISTINCT lexeme FROM unnest(to_tsvector('english', %(text)s))),
freq AS (SELECT e AS lexeme, f FROM pg_stats, unnest(most_common_elems::text::text[], most_common_elem_freqs) AS u(e, f)
         WHERE schemaname = 'pgsynapse' AND tablename = 'chunks' AND attname = 'tsv' AND e IS NOT NULL),
ranked AS (SELECT w.lexeme, coalesce(f.f, 0) AS f, row_number() OVER (ORDER BY coalesce(f.f, 0), w.lexeme) AS n
           FROM words w LEFT JOIN freq f USING (lexeme)),"""

# The OR of the question's words without its common ones: a word in more than ``share`` of the chunks, by the
# frequencies ANALYZE keeps for the tsv column (pg_stats.most_common_elems), is left out, the rarest word always
# kept. Bounds how many chunks ts_rank scores (bench.fulltext_scale: the OR matches ~40 % of them). Session 15.
RARE = WORD_SHARES + """
qq AS (SELECT string_agg(quote_literal(lexeme), ' | ')::tsquery AS query FROM ranked WHERE f <= {share} OR n = 1)
SELECT c.id AS chunk_id, c.document_id, d.title, d.source, c.text, ts_rank(c.tsv, qq.query) AS text_rank
FROM qq, pgsynapse.chunks c JOIN pgsynapse.documents d ON d.id = c.document_id
WHERE c.tsv @@ qq.query ORDER BY text_rank DESC, c.id LIMIT %(k)s"""
for share in ("0.05", "0.1", "0.2", "0.3"):
    VARIANTS[f"or_ts_rank_rare{share}"] = RARE.format(share=share)

# The common words still rank, they only do not select: the chunks scored are those with one of the question's
# rarer words (as in RARE), and each is ranked by ts_rank over all the words (the product's OR). Session 16.
SELECT_RARE = WORD_SHARES + """
qq AS (SELECT string_agg(quote_literal(lexeme), ' | ') FILTER (WHERE f <= {share} OR n = 1)::tsquery AS sel,
              {or_} AS query FROM ranked)
SELECT c.id AS chunk_id, c.document_id, d.title, d.source, c.text, ts_rank(c.tsv, qq.query) AS text_rank
FROM qq, pgsynapse.chunks c JOIN pgsynapse.documents d ON d.id = c.document_id
WHERE c.tsv @@ qq.sel ORDER BY text_rank DESC, c.id LIMIT %(k)s"""
for share in ("0.02", "0.05", "0.1", "0.2"):
    VARIANTS[f"or_ts_rank_select{share}"] = SELECT_RARE.format(share=share, or_=OR)

# The product's query at other bounds (``hybrid_text_max_rows``): on the docs corpus (7,087 chunks), a bound of N
# selects as a bound of N x 50 does on a table 50 times its size (bench.fulltext_scale's copies). Session 16.
MAX_ROWS = Settings.model_fields["hybrid_text_max_rows"].default
for rows in (100, 250, 500, 1000, 2000, 5000):
    VARIANTS[f"or_ts_rank_max{rows}"] = sql("text_candidates", "answers.sql").replace("%(max_rows)s", str(rows))


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    args = p.parse_args()
    emit("text_rank_variants", "machine", **machine())
    sets = {"dev": [(d["q"], set(d["relevant"])) for d in questions("pg_docs_dev.jsonl")],
            "train": [(d["q"], {d["page"]}) for d in questions("pg_docs_train.jsonl")]}
    models = ModelCache()
    original_q = answer_handler.q
    with corpus_clone(database_url=args.database_url) as (url, _info):
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT id, name, artifact_path, runtime, dim, status FROM pgsynapse.model_versions"
                               " WHERE status = 'active'").fetchone()
        version = dict(zip(["id", "name", "artifact_path", "runtime", "dim", "status"], row, strict=True))
        try:
            for variant in ["vector", *VARIANTS]:
                def q(name: str, filename: str = "queries.sql", variant: str = variant) -> str:
                    return VARIANTS[variant] if name == "text_candidates" and variant in VARIANTS else original_q(name, filename)

                answer_handler.q = q
                for set_name, items in sets.items():
                    ranked = anyio.run(lambda items=items, variant=variant: retrieve_pages(
                        url, [t for t, _ in items], version=version, hybrid=variant != "vector", models=models))
                    emit("text_rank_variants", f"{set_name}_{variant}", **score(ranked, [r for _, r in items]))
        finally:
            answer_handler.q = original_q
    table()


if __name__ == "__main__":
    run_benchmark(main)
