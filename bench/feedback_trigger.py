"""Benchmark `feedback_trigger`: what the feedback trigger costs an application's feedback INSERT.

One database, migrated to today's schema; three runs, each on the same fresh state (``--questions`` answered
questions, ``--history`` earlier feedback rows on each, one per statement's worth of examples made): ``--inserts``
one-row feedback INSERTs, one per statement, timed from the client (p50 / p95 ms):

- ``none``: the trigger disabled, the ceiling (the INSERT alone);
- ``v3``: ``feedback_to_examples_v3`` (every feedback row a training example, counted towards the threshold);
- ``v4``: ``feedback_to_examples_v4``, today's (one example per question: the question's others superseded by its
  latest, migration 0021).

    python -m bench.feedback_trigger [--questions 1000] [--history 20] [--inserts 2000]
"""

from __future__ import annotations

import statistics
import time

import psycopg

from bench.common import database, emit, machine, parser, run_benchmark, table

B = "feedback_trigger"
TRIGGER = ("CREATE OR REPLACE TRIGGER feedback_to_examples AFTER INSERT ON pgsynapse.feedback REFERENCING NEW TABLE"
           " AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.feedback_to_examples_{}()")


def run(conn: psycopg.Connection, trigger: str, questions: list[int], history: int, inserts: int) -> list[float]:
    conn.execute("TRUNCATE pgsynapse.feedback, pgsynapse.training_examples")
    conn.execute(TRIGGER.format("v4"))  # the history as today's trigger leaves it
    conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) SELECT q, true"
                 " FROM unnest(%s::bigint[]) q, generate_series(1, %s)", (questions, history))
    if trigger == "none":
        conn.execute("ALTER TABLE pgsynapse.feedback DISABLE TRIGGER feedback_to_examples")
    else:
        conn.execute(TRIGGER.format(trigger))
    conn.execute("VACUUM ANALYZE pgsynapse.feedback, pgsynapse.training_examples")
    took = []
    for i in range(inserts):
        started = time.perf_counter()
        conn.execute("INSERT INTO pgsynapse.feedback (question_id, helpful) VALUES (%s, true)",
                     (questions[i % len(questions)],))
        took.append(1000 * (time.perf_counter() - started))
    conn.execute("ALTER TABLE pgsynapse.feedback ENABLE TRIGGER feedback_to_examples")
    conn.execute(TRIGGER.format("v4"))
    return took


def main() -> None:
    p = parser(__doc__.splitlines()[0], quick=False)
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--history", type=int, default=20, help="earlier feedback rows per question")
    p.add_argument("--inserts", type=int, default=2000)
    args = p.parse_args()
    emit(B, "machine", **machine())
    with database(args.database_url) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pgsynapse.learning_settings SET retrain_min_feedback = 1000000")  # no retrain job
        doc = conn.execute("INSERT INTO pgsynapse.documents (title, body) VALUES ('t', 'b') RETURNING id").fetchone()[0]
        chunk = conn.execute("INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start, char_end,"
                             " content_hash) VALUES (%s, 0, 'x', 1, 0, 1, 'h') RETURNING id", (doc,)).fetchone()[0]
        questions = [r[0] for r in conn.execute(
            "INSERT INTO pgsynapse.questions (text, status, sources) SELECT 'question ' || g, 'answered',"
            " jsonb_build_array(jsonb_build_object('chunk_id', %s::bigint)) FROM generate_series(1, %s) g RETURNING id",
            (chunk, args.questions))]
        for trigger in ("none", "v3", "v4"):
            took = sorted(run(conn, trigger, questions, args.history, args.inserts))
            emit(B, "insert", trigger=trigger, questions=args.questions, history=args.history, inserts=args.inserts,
                 p50_ms=round(statistics.median(took), 2), p95_ms=round(took[int(0.95 * len(took))], 2))
    table()


if __name__ == "__main__":
    run_benchmark(main)
