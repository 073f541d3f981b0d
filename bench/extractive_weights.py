"""Benchmark `extractive_weights` (issue 18): the extractive answerer's weights, chosen on the tune sets only.

Retrieval once, through the answer handler's own ``_retrieve`` with the default settings (bench.answer_quality's
``retrieve``); then, for each variant (``--variants``: a JSON list of ``{"name", ExtractiveAnswerer keyword
arguments...}``; the default's arguments are the handler's), the share of answers whose first citation is on a
relevant page (``first_cite``, as bench.answer_quality) on the tune sets: the dev tune half, the user-worded set's
tune half (bench/devsplit.py ``held_out``) and the 150 train questions bench.answer_quality's ``train-heldout``
leaves out (indices 0, 2, ..., 298). The variant with the best mean over them is chosen (the default on a tie);
then only the default and the chosen are answered on the report sets (``report``, ``users-report``,
``train-heldout``). Beside each set's first citation, on the sets with answer patterns (the dev and user-worded
halves, bench/answer_patterns.py), ``answered`` and ``answered_first`` (%: the answer quotes a sentence that
answers the question, and starts with one; the ``tune`` line also has ``answered_mean``, over ``tune`` and
``users-tune``): the right sentence, not only the page.

    python -m bench.extractive_weights --variants '[{"name": "rank 0.25", "rank_weight": 0.25}]'
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import anyio
import psycopg
from psycopg.rows import dict_row

from bench import answer_patterns
from bench.answer_quality import answer_sentences, first_on_relevant, retrieve, train_split
from bench.common import emit, machine, parser, questions, run_benchmark, table
from bench.corpusdb import corpus_clone
from bench.devsplit import held_out
from pgsynapse.answerers.base import Request
from pgsynapse.answerers.extractive import ExtractiveAnswerer
from pgsynapse.config import load_settings
from pgsynapse.models import ModelCache

B = "extractive_weights"
TUNE = ("tune", "users-tune", "train-tune")
REPORT = ("report", "users-report", "train-heldout")


def scores(answerer: ExtractiveAnswerer, name: str, items: list[dict[str, Any]],
           patterns: dict[str, Any]) -> dict[str, float]:
    """``{name: first_cite}``, and ``{"answered_" + name: answered, "answered_first_" + name: answered_first}``
    where the set's questions have patterns."""
    hits, rows = 0, []
    for it in items:
        text = answerer.answer(Request(it["q"], it["passages"], [], it["vector"])).text
        hits += first_on_relevant(text, it["passages"], it["relevant"])
        if patterns.get(it["q"]) is not None:
            answered, first = answer_patterns.matches(patterns[it["q"]], [s for s, _ in answer_sentences(text)])
            rows.append({"answered": answered, "answered_first": first})
    out = {name: round(100 * hits / len(items), 1)}
    if rows:
        fig = answer_patterns.figures(rows)
        out[f"answered_{name}"], out[f"answered_first_{name}"] = fig["answered"], fig["answered_first"]
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--variants", required=True)
    args = p.parse_args()
    variants = [{"name": "default"}, *json.loads(args.variants)]
    emit(B, "machine", **machine())
    sets = {**held_out(), **train_split(questions("pg_docs_train.jsonl"))}
    models = ModelCache()
    with corpus_clone(database_url=args.database_url) as (url, info):
        emit(B, "corpus", **info)
        with psycopg.connect(url, row_factory=dict_row) as conn:
            version = conn.execute("SELECT id, name, artifact_path, runtime, dim, status FROM pgsynapse.model_versions"
                                   " WHERE status = 'active'").fetchone()
        every = [it for items in sets.values() for it in items]
        for it, (passages, vec) in zip(every, anyio.run(retrieve, url, [it["q"] for it in every], version, models),
                                       strict=True):
            it.update(passages=passages, vector=vec, relevant=set(it["relevant"]))
    embedder = models.get(version)
    s = load_settings(environ={})

    def build(variant: dict[str, Any]) -> ExtractiveAnswerer:
        kw = {k: v for k, v in variant.items() if k != "name"}
        return ExtractiveAnswerer(lambda texts: embedder.encode(texts, s.encode_batch_size),
                                  not_found_threshold=s.not_found_threshold, **kw)

    patterns = answer_patterns.load()
    tuned = []
    for v in variants:
        fc = {k: x for name in TUNE for k, x in scores(build(v), name, sets[name], patterns).items()}
        mean = statistics.mean(fc[name] for name in TUNE)
        answered = [fc[f"answered_{name}"] for name in TUNE if f"answered_{name}" in fc]
        tuned.append((mean, v))
        emit(B, "tune", variant=v["name"], **fc, mean=round(mean, 2),
             **({"answered_mean": round(statistics.mean(answered), 2)} if answered else {}))
    best = max(tuned, key=lambda t: (t[0], t[1]["name"] == "default"))[1]
    for v in dict.fromkeys([0, variants.index(best)]):
        emit(B, "report", variant=variants[v]["name"], chosen=variants[v] is best,
             **{k: x for name in REPORT for k, x in scores(build(variants[v]), name, sets[name], patterns).items()})
    table()


if __name__ == "__main__":
    run_benchmark(main)
