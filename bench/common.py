"""What every benchmark shares: a database (DATABASE_URL, else an embedded one in a temp dir), the corpus,
model versions per runtime, result lines (one JSON line per result) and a readable table."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsynapse.corpus import debian_html_dir, html_pages, shipped_pages
from pgsynapse.embedded import EmbeddedPostgres
from pgsynapse.errors import PgsynapseError
from pgsynapse.export import export_fp32, quantize_int8
from pgsynapse.listener.worker import Worker
from pgsynapse.migrate import migrate
from pgsynapse.models import ONNX_FILES, default_model_path

DATA = Path(os.environ.get("PGSYNAPSE_BENCH_DATA", "/work/shared/data"))
ARTIFACTS = Path(os.environ.get("PGSYNAPSE_BENCH_MODELS", tempfile.gettempdir())) / "pgsynapse-bench-models"
RESULTS: list[dict[str, Any]] = []


class _NoQuick(argparse.Action):
    """``--quick`` of a benchmark that has no reduced form: said, rather than a full-size run."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{parser.prog} has no --quick: it runs at its full size; its own options (--help) choose "
                     "what it measures")


def parser(description: str, *, quick: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark takes; ``quick=False`` for one without a reduced form (``--quick`` refused)."""
    p = argparse.ArgumentParser(description=description)
    if quick:
        p.add_argument("--quick", action="store_true", help="reduced sizes, for development")
    else:
        p.add_argument("--quick", action=_NoQuick, nargs=0, help=argparse.SUPPRESS)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"), help="default: an embedded server in a temp dir")
    p.add_argument("--threads", type=int, default=0, help="inference threads (0 = cores)")
    return p


def run_benchmark(main: Callable[[], object]) -> None:
    """A benchmark's entry point (its ``main`` run as a script): what it cannot do, said by the project's own errors
    (a model package not installed, a model path that does not exist) or by a database out of reach, ends it in one
    line on stderr, exit 1, not a traceback. A target missed (a result line with ``"passed": false``) ends it with
    exit 1 too, once its results and table are printed, the targets missed named in a line on stderr."""
    prog = sys.argv[0]  # the file under `python -m`, the module's name under `pgsynapse bench`
    name = f"bench.{Path(prog).stem}" if prog.endswith(".py") else prog
    try:
        main()
    except (PgsynapseError, psycopg.OperationalError) as exc:
        # one line: libpq's message goes on over lines ("\n\tIs the server running on that host ...?")
        said = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise SystemExit(f"{name}: error: {said}") from None
    missed = [r for r in RESULTS if r.get("passed") is False]
    if missed:
        said = ", ".join(r["name"] + (f" (ratio {r['ratio']}, target {r['target']})" if "ratio" in r and "target" in r
                                      else "") for r in missed)
        print(f"{name}: target missed: {said}", file=sys.stderr, flush=True)
        raise SystemExit(1)


def add_runtime_option(p: argparse.ArgumentParser) -> None:
    """``--runtime``: the embedding runtime the benchmark's worker serves with (set_runtime)."""
    p.add_argument("--runtime", default="onnx-int8", choices=["torch", "onnx", "onnx-int8"],
                   help="default onnx-int8 (smooth-static): what a default install switches to")


def emit(bench: str, name: str, **fields: Any) -> dict[str, Any]:
    row = {"bench": bench, "name": name, **fields}
    RESULTS.append(row)
    print(json.dumps(row, default=str), flush=True)
    return row


def table(rows: list[dict[str, Any]] | None = None) -> None:
    rows = RESULTS if rows is None else rows
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys and k != "bench")
    cells = [[_fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print()
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"cpu": model, "cores": os.cpu_count(), "load1": round(os.getloadavg()[0], 2), "commit": commit}


@contextlib.contextmanager
def database(url: str | None, *, name: str | None = None) -> Iterator[str]:
    """A fresh migrated database: a new one on the given server, else an embedded server in a temp dir. ``name``:
    the database's (default ``pgsynapse_bench_PID_MS``)."""
    tmp = None
    server = None
    if not url:
        tmp = Path(tempfile.mkdtemp(prefix="pgsynapse-bench-", dir="/tmp"))
        server = EmbeddedPostgres(tmp)
    try:  # the server stopped and its temp dir removed whatever fails, its start and CREATE DATABASE included
        if server is not None:
            url = server.start()
        name = name or f"pgsynapse_bench_{os.getpid()}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        params = conninfo_to_dict(url)
        params["dbname"] = name
        db_url = make_conninfo(**params)
        try:
            migrate(db_url)
            yield db_url
        finally:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def corpus(limit: int | None = None) -> list[dict[str, str]]:
    """The PostgreSQL docs pages ``{id, title, text}``: the shared JSONL, else Debian's HTML, else the shipped pages."""
    path = DATA / "pg_docs_corpus.jsonl"
    if path.exists():
        pages = []
        with path.open() as f:
            for line in f:
                pages.append(json.loads(line))
                if limit and len(pages) >= limit:
                    break
        return pages
    d = debian_html_dir()
    it = html_pages(d, limit or 10**9, []) if d else shipped_pages()
    return [{"id": p.source, "title": p.title, "text": p.text} for p in it][: limit or None]


def questions(name: str) -> list[dict[str, Any]]:
    """The question set ``name`` of DATA; a SystemExit naming it when it is missing (an empty set would be scored
    as 0 questions, or divided by)."""
    path = DATA / name
    if not path.exists():
        raise SystemExit(f"bench: {path} not found: the question sets are in the shared data folder "
                         "(/work/shared/data); set PGSYNAPSE_BENCH_DATA to the folder that holds it")
    return [json.loads(line) for line in path.open()]


# the scheme a default install's start-up export picks for all-MiniLM-L6-v2 (the first of export.SCHEMES whose
# agreement passes)
DEFAULT_INT8_SCHEME = "smooth-static"


def artifact(runtime: str, scheme: str | None = None) -> Path | None:
    """The ONNX artifact of the default model for ``runtime`` (exported once, kept under ARTIFACTS).

    ``scheme``: the INT8 scheme (:data:`pgsynapse.export.SCHEMES`); default PGSYNAPSE_BENCH_INT8_SCHEME or
    :data:`DEFAULT_INT8_SCHEME`.
    """
    if runtime == "torch":
        return None
    base = ARTIFACTS / "default"
    if not (base / ONNX_FILES["onnx"]).exists():
        export_fp32(default_model_path(), base)
    if runtime == "onnx":
        return base
    scheme = scheme or os.environ.get("PGSYNAPSE_BENCH_INT8_SCHEME", DEFAULT_INT8_SCHEME)
    out = ARTIFACTS / f"int8-{scheme}"
    if not (out / ONNX_FILES["onnx-int8"]).exists():
        out.mkdir(parents=True, exist_ok=True)
        for f in base.iterdir():
            if f.is_file() and f.name != ONNX_FILES["onnx-int8"] and not (out / f.name).exists():
                os.link(f, out / f.name) if f.suffix == ".onnx" else shutil.copy2(f, out / f.name)
        quantize_int8(out, scheme)
    return out


def set_runtime(url: str, runtime: str, scheme: str | None = None) -> dict[str, Any]:
    """Point model version 1 at ``runtime`` (``scheme``: its INT8 scheme); returns its row."""
    path = artifact(runtime, scheme)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pgsynapse.model_versions SET runtime = %s, artifact_path = %s WHERE id = 1",
                     (runtime, str(path) if path else None))
    return {"id": 1, "name": "all-MiniLM-L6-v2", "artifact_path": str(path) if path else None, "runtime": runtime, "dim": 384}


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values)


def spawn_worker(url: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A ``pgsynapse run`` subprocess; returns once it logged ``worker_started``."""
    # the benchmark sets the version's runtime itself (set_runtime): no export at the worker's start
    full = {**os.environ, "PGSYNAPSE_LOG_LEVEL": "warning", "PGSYNAPSE_RUNTIME": "torch", **(env or {})}
    full.pop("DATABASE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgsynapse", "--database-url", url, "--log-format", "json", "--log-level", "info",
         "run", "--no-migrate"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=full,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if '"worker_started"' in line:
            break
    else:
        raise RuntimeError(f"worker exited with {proc.wait()}")
    # keep draining its log so it never blocks on a full pipe
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def ask_one_at_a_time(conn: psycopg.Connection, texts: list[str], session_prefix: str,
                      timeout: float = 120) -> list[float]:
    """INSERT each question and wait for its final answer NOTIFY (not a ``streaming`` one) before the next: the
    milliseconds from INSERT to that NOTIFY, per question. ``conn`` is an autocommit connection; it LISTENs here."""
    conn.execute("LISTEN pgsynapse_answers")
    lat = []
    for i, text in enumerate(texts):
        s = time.perf_counter()
        qid = conn.execute("INSERT INTO pgsynapse.questions (session_id, text) VALUES (%s, %s) RETURNING id",
                           (f"{session_prefix}-{i}", text)).fetchone()[0]
        for n in conn.notifies(timeout=timeout):
            payload = json.loads(n.payload)
            if payload["id"] == qid and payload["status"] != "streaming":
                break
        lat.append((time.perf_counter() - s) * 1000)
    return lat


def run_worker_until(settings: Any, url: str, done_sql: str, channels: tuple[str, ...], poll: float = 30.0) -> None:
    """Run a worker in this process until ``done_sql`` (one boolean) is true, re-checked at each NOTIFY on
    ``channels`` (and every ``poll`` seconds at the latest), then stop it."""
    async def run() -> None:
        worker = Worker(settings, url)
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: worker.run(task_status=task_status, handle_signals=False))
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                for channel in channels:
                    await conn.execute(f"LISTEN {channel}")
                while not (await (await conn.execute(done_sql)).fetchone())[0]:
                    async for _ in conn.notifies(timeout=poll, stop_after=1):
                        pass
            worker.request_stop()

    anyio.run(run)
