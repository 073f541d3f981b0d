"""Scale (issue 21): how far one PostgreSQL carries a fleet of workers, and what limits it.

Parts (``--part``, all by default), each one run on a fresh database of one server:

* ``claims``: the queue alone, without a model: 1, 2, 4 (and 8) connections each looping the worker's own claim
  (``claim_jobs``, 32 at a time) and completion (``complete_jobs``) over a backlog: jobs/s, claim latency
  p50/p99, and lock waits sampled from ``pg_stat_activity`` every 50 ms. Where the database side stops scaling.
* ``workers``: 1, 2, 4 real ``pgsynapse run`` processes draining documents, with a cheap stand-in model (a
  1-layer BERT, so the database side shows) and with the real default model (onnx-int8): documents/s end to end.
* ``writes``: sustained single-row INSERT + COMMIT into ``pgsynapse.documents`` from 1, 8, 32 connections with
  the enqueue trigger off, on, on without its NOTIFY (the same function minus ``pg_notify``, in this database
  only) and on with ``pgsynapse queue-notify off``: commits/s and p50/p99 commit latency. NOTIFY serialises
  notifying commits on one global lock.
* ``queue`` and ``vectors``: bench/scale_size.py (tables at size).

    python -m bench.scale [--quick] [--part claims|workers|writes|queue|vectors]
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import torch
from sentence_transformers import SentenceTransformer, models as st_models
from transformers import AutoTokenizer, BertConfig, BertModel

from bench import scale_size
from bench.common import database, emit, machine, parser, run_benchmark, set_runtime, spawn_worker, stop, table
from bench.scale_size import ms
from pgsynapse.models import default_model_path
from pgsynapse.queries import q

CLAIM_BATCH = 32


# -- shared -------------------------------------------------------------------------------------------
class LockSampler:
    """Samples ``pg_stat_activity`` of one database every ``interval`` s on its own connection: how many backends
    wait on a heavyweight lock (``Lock``) or an internal one (``LWLock``), and which."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        self.url, self.interval = url, interval
        self.samples = 0
        self.lock_waits = 0  # backend-samples waiting on a heavyweight lock
        self.lwlock_waits = 0
        self.events: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LockSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(self.interval):
                rows = conn.execute(
                    "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND state = 'active'").fetchall()
                self.samples += 1
                for kind, event in rows:
                    if kind == "Lock":
                        self.lock_waits += 1
                    elif kind == "LWLock":
                        self.lwlock_waits += 1
                    if kind in ("Lock", "LWLock"):
                        self.events[f"{kind}:{event}"] = self.events.get(f"{kind}:{event}", 0) + 1

    def figures(self) -> dict[str, Any]:
        n = max(1, self.samples)
        top = sorted(self.events.items(), key=lambda kv: -kv[1])[:3]
        return {"lock_waiting_avg": round(self.lock_waits / n, 3), "lwlock_waiting_avg": round(self.lwlock_waits / n, 3),
                "top_waits": {k: v for k, v in top}}


def run_threads(n: int, target: Callable[[int], None]) -> float:
    """``target(i)`` in ``n`` threads that start together; the wall seconds until all have finished."""
    ready = threading.Barrier(n + 1)

    def body(i: int) -> None:
        ready.wait()
        target(i)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - started


# -- claims: the queue without a model ------------------------------------------------------------------
def claims(url: str, backlog: int, clients: list[int]) -> None:
    for n in clients:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("TRUNCATE pgsynapse.jobs")
            conn.execute("INSERT INTO pgsynapse.jobs (kind, ref_id) SELECT 'embed', g FROM generate_series(1, %s) g",
                         (backlog,))
            conn.execute("VACUUM ANALYZE pgsynapse.jobs")
        latencies: list[list[float]] = [[] for _ in range(n)]
        done = [0] * n

        def loop(i: int) -> None:
            with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
                params = {"kind": "embed", "limit": CLAIM_BATCH, "worker": f"bench-{i}", "lease": 60}
                while True:
                    s = time.perf_counter()
                    with conn.transaction():
                        ids = [r[0] for r in conn.execute(q("claim_jobs"), params).fetchall()]
                    latencies[i].append(time.perf_counter() - s)
                    if not ids:
                        return
                    with conn.transaction():
                        conn.execute(q("complete_jobs"), {"ids": ids, "worker": f"bench-{i}"})
                    done[i] += len(ids)

        with LockSampler(url) as sampler:
            wall = run_threads(n, loop)
        lat = [x for per in latencies for x in per]
        with psycopg.connect(url, autocommit=True) as conn:
            dup = conn.execute("SELECT count(*) FROM pgsynapse.jobs WHERE status <> 'done' OR completions <> 1").fetchone()[0]
        emit("scale", "claims", clients=n, jobs=sum(done), jobs_per_s=round(sum(done) / wall), claim_p50_ms=ms(lat, 50),
             claim_p99_ms=ms(lat, 99), not_done_exactly_once=dup, **sampler.figures())


# -- workers: real pgsynapse processes ------------------------------------------------------------------
def stand_in_model(path: Path) -> Path:
    """A 1-layer, 384-wide BERT with mean pooling (random weights, the default model's tokenizer): vectors of the
    default's size at a fraction of its cost, so the database side of a worker shows."""
    if (path / "modules.json").exists():
        return path
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=384, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=256, max_position_embeddings=256))
    (path / "hf").mkdir(parents=True, exist_ok=True)
    bert.save_pretrained(path / "hf")
    tokenizer.save_pretrained(path / "hf")
    word = st_models.Transformer(str(path / "hf"), max_seq_length=128)
    SentenceTransformer(modules=[word, st_models.Pooling(384, "mean")]).save(str(path))
    return path


def insert_documents(url: str, n: int, tag: str) -> None:
    """``n`` one-chunk documents in statements of 500 rows (one job per row: under the bulk path's threshold)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for start in range(0, n, 500):
            conn.execute(
                "INSERT INTO pgsynapse.documents (source, title, body) SELECT %s || g, 'Note ' || g,"
                " 'Row ' || g || ' is a short note about topic ' || (g %% 97) || ' in plain words.'"
                " FROM generate_series(%s::int, %s::int) g", (tag, start + 1, min(n, start + 500)))


def wait_embedded(url: str, n: int, timeout: float = 1800) -> None:
    """Until ``n`` documents are embedded: re-checked on each NOTIFY of the documents channel (1 s at most)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("LISTEN pgsynapse_documents")
        while conn.execute("SELECT count(*) FROM pgsynapse.documents WHERE status = 'embedded'").fetchone()[0] < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} documents not embedded within {timeout}s")
            for _ in conn.notifies(timeout=1.0, stop_after=1):
                pass


def workers(server_url: str | None, docs: int, counts: list[int], model: str, model_dir: Path) -> None:
    env = {"PGSYNAPSE_KINDS": "embed", "PGSYNAPSE_BATCH_SIZE": "64", "PGSYNAPSE_POLL_INTERVAL": "30"}
    for n in counts:
        with database(server_url) as url:
            if model == "stand-in":
                env_n = {**env, "PGSYNAPSE_MODEL_PATH": str(stand_in_model(model_dir)),
                         # the cores shared out: n processes of 2/n threads each (1 at least)
                         "PGSYNAPSE_TORCH_THREADS": str(max(1, 2 // n))}
            else:
                set_runtime(url, "onnx-int8")
                env_n = {**env, "PGSYNAPSE_ONNX_THREADS": str(max(1, 2 // n)), "PGSYNAPSE_TORCH_THREADS": str(max(1, 2 // n))}
            procs = [spawn_worker(url, env_n) for _ in range(n)]
            try:
                with LockSampler(url) as sampler:
                    started = time.perf_counter()
                    insert_documents(url, docs, f"w{n}-")
                    wait_embedded(url, docs)
                    wall = time.perf_counter() - started
            finally:
                for p in procs:
                    stop(p)
            with psycopg.connect(url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(DISTINCT worker) AS workers, count(*) FILTER (WHERE completions <> 1) AS not_once,"
                    " percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)) AS wait_p50,"
                    " percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)) AS done_p99"
                    " FROM pgsynapse.jobs WHERE kind = 'embed'").fetchone()
            emit("scale", "workers", model=model, processes=n, documents=docs, docs_per_s=round(docs / wall, 1),
                 workers_seen=row[0], not_done_exactly_once=row[1], queue_wait_p50_s=round(row[2], 2),
                 insert_to_done_p99_s=round(row[3], 2), **sampler.figures())


# -- writes: the application's INSERT path --------------------------------------------------------------
NO_NOTIFY = """
CREATE OR REPLACE FUNCTION pgsynapse.bench_enqueue_no_notify() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgsynapse, pg_temp AS $$
BEGIN
    INSERT INTO pgsynapse.jobs (kind, ref_id) SELECT 'embed', id FROM new_rows
    ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER bench_enqueue_no_notify AFTER INSERT ON pgsynapse.documents
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION pgsynapse.bench_enqueue_no_notify();
ALTER TABLE pgsynapse.documents DISABLE TRIGGER bench_enqueue_no_notify;
"""


@contextlib.contextmanager
def trigger_mode(conn: psycopg.Connection, mode: str) -> Iterator[None]:
    """``on`` as shipped; ``off``: no enqueue trigger; ``no_notify``: the job insert without its NOTIFY (a copy of
    the function); ``notify_off``: as shipped with ``pgsynapse queue-notify off`` (queue_settings)."""
    real, copy = "documents_enqueue_insert", "bench_enqueue_no_notify"
    enable = {"on": [real], "off": [], "no_notify": [copy], "notify_off": [real]}[mode]
    for t in (real, copy):
        conn.execute(f"ALTER TABLE pgsynapse.documents {'ENABLE' if t in enable else 'DISABLE'} TRIGGER {t}")
    conn.execute(q("set_enqueue_notify"), {"on": mode != "notify_off"})
    try:
        yield
    finally:
        conn.execute(f"ALTER TABLE pgsynapse.documents ENABLE TRIGGER {real}")
        conn.execute(f"ALTER TABLE pgsynapse.documents DISABLE TRIGGER {copy}")
        conn.execute(q("set_enqueue_notify"), {"on": True})


def writes(url: str, clients: list[int], seconds: float) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(NO_NOTIFY)
        for round_, n in enumerate([1, *clients]):  # the first round warms the server up (not kept)
            warm_up = round_ == 0
            for mode in ("off", "no_notify", "notify_off", "on"):
                admin.execute("TRUNCATE pgsynapse.documents, pgsynapse.jobs CASCADE")
                admin.execute("CHECKPOINT")
                with trigger_mode(admin, mode):
                    latencies: list[list[float]] = [[] for _ in range(n)]
                    stop_at = [0.0]

                    def loop(i: int) -> None:
                        with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
                            while time.perf_counter() < stop_at[0]:
                                s = time.perf_counter()
                                conn.execute("INSERT INTO pgsynapse.documents (source, title, body)"
                                             " VALUES (%s, 'w', 'a sustained write of one row')",
                                             (f"c{i}-{len(latencies[i])}",))
                                latencies[i].append(time.perf_counter() - s)

                    stop_at[0] = time.perf_counter() + seconds + 0.5  # the threads start within 0.5 s
                    with LockSampler(url) as sampler:
                        wall = run_threads(n, loop)
                lat = [x for per in latencies for x in per]
                jobs = admin.execute("SELECT count(*) FROM pgsynapse.jobs").fetchone()[0]
                if warm_up:
                    continue
                emit("scale", "writes", clients=n, trigger=mode, commits=len(lat), commits_per_s=round(len(lat) / wall),
                     commit_p50_ms=ms(lat, 50), commit_p99_ms=ms(lat, 99), jobs=jobs, **sampler.figures())


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--part", action="append", choices=["claims", "workers", "writes", "queue", "vectors"])
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/pgsynapse-bench-models/stand-in"))
    p.add_argument("--done-jobs", type=int, default=0, help="queue: done jobs (default 10M, --quick 200k)")
    p.add_argument("--pending-jobs", type=int, default=0, help="queue: pending jobs (default 1M, --quick 20k)")
    p.add_argument("--vectors", type=int, default=0, help="vectors: rows of one version (default 200k, --quick 20k)")
    p.add_argument("--maintenance-work-mem", default="4GB",
                   help="vectors: for the HNSW build; the graph must fit (about 2.3 kB a 384-d vector, m 16)")
    p.add_argument("--retire-vectors", type=int, default=-1,
                   help="vectors: rows of the retire comparison (default: --vectors up to 200k; 0: skip it)")
    args = p.parse_args()
    parts = args.part or ["claims", "workers", "writes", "queue", "vectors"]
    quick = args.quick
    emit("scale", "machine", **machine())
    if "claims" in parts:
        with database(args.database_url) as url:
            claims(url, 5_000 if quick else 50_000, [1, 2, 4] if quick else [1, 2, 4, 8])
    if "workers" in parts:
        docs = 1_000 if quick else 10_000
        workers(args.database_url, docs, [1, 2] if quick else [1, 2, 4], "stand-in", args.model_dir)
        workers(args.database_url, docs // 5, [1, 2], "default onnx-int8", args.model_dir)
    if "writes" in parts:
        with database(args.database_url) as url:
            writes(url, [1, 8, 32], 2.0 if quick else 10.0)
    if "queue" in parts:
        with database(args.database_url) as url:
            scale_size.queue(url, args.done_jobs or (200_000 if quick else 10_000_000),
                             args.pending_jobs or (20_000 if quick else 1_000_000))
    if "vectors" in parts:
        with database(args.database_url) as url:
            n = args.vectors or (20_000 if quick else 200_000)
            retire = min(n, 200_000) if args.retire_vectors < 0 else args.retire_vectors
            scale_size.vectors(url, n, args.maintenance_work_mem, retire)
    table()


if __name__ == "__main__":
    run_benchmark(main)
