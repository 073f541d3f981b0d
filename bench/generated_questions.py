"""Generated questions for issue 23 item 3: a local instruct model writes one user's question per corpus chunk.

Qwen2.5-Coder-0.5B-Instruct (GGUF, through llama-cpp-python: ``pip install 'pgsynapse[llama]'``) on chunks of the
corpus template drawn at random (seeded), each chunk's title and first 1,200 characters in the prompt, greedy, at
most 40 tokens. Writes JSON lines ``{"chunk", "doc", "question"}`` as it goes (a run stopped early keeps what it
wrote) for ``bench.learning_recipes --generated FILE``. About 1.3 s a chunk on 2 cores.

    python -m bench.generated_questions --model qwen2.5-coder-0.5b-instruct-q4.gguf --chunks 1800 --out FILE
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import psycopg

try:
    from llama_cpp import Llama
except ImportError:  # an optional extra: said in a line, not a traceback
    raise SystemExit("bench.generated_questions needs llama-cpp-python: pip install 'pgsynapse[llama]'") from None

from bench.common import emit, machine, parser, run_benchmark
from bench.corpusdb import corpus_clone, on_corpus_server

B = "generated_questions"
SYSTEM = ("Write one question that a PostgreSQL user could ask and that this passage answers. Use the user's own "
          "everyday words, not the passage's phrasing. Reply with the question only.")


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--model", type=Path, required=True, help="the instruct model's GGUF file")
    p.add_argument("--chunks", type=int, default=1800, help="chunks to write a question for")
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    on_corpus_server(args.database_url, lambda: run(args))


def run(args) -> None:  # noqa: ANN001 - argparse's namespace
    emit(B, "machine", **machine())
    with corpus_clone() as (url, _info), psycopg.connect(url, autocommit=True) as conn:
        chunks = conn.execute("SELECT c.id, c.document_id, d.title, c.text FROM pgsynapse.chunks c"
                              " JOIN pgsynapse.documents d ON d.id = c.document_id ORDER BY c.id").fetchall()
    random.Random(args.seed).shuffle(chunks)
    model = Llama(model_path=str(args.model), n_ctx=1024, n_threads=args.threads or None, n_batch=512, verbose=False)
    started = time.perf_counter()
    with args.out.open("w") as f:
        for n, (chunk, doc, title, text) in enumerate(chunks[:args.chunks], 1):
            reply = model.create_chat_completion([
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Page: {title}\n\nPassage:\n{text[:1200]}"}], max_tokens=40, temperature=0.0)
            question = reply["choices"][0]["message"]["content"].strip()
            f.write(json.dumps({"chunk": chunk, "doc": doc, "question": question}) + "\n")
            f.flush()
            if n % 100 == 0:
                emit(B, "progress", chunks=n, seconds=round(time.perf_counter() - started))
    emit(B, "done", chunks=min(args.chunks, len(chunks)), of=len(chunks),
         seconds_per_chunk=round((time.perf_counter() - started) / max(1, min(args.chunks, len(chunks))), 2))


if __name__ == "__main__":
    run_benchmark(main)
