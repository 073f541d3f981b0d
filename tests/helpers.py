"""Test helpers that wait on events (NOTIFY, row state, a worker's started line), never on time."""

from __future__ import annotations

import contextlib
import ctypes
import json
import socket
import urllib.error
import urllib.request
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import psutil
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from structlog.testing import capture_logs

from pgsynapse.config import Settings, load_settings
from pgsynapse.db import next_notifies
from pgsynapse.listener.worker import Worker

SAFETY_TIMEOUT = 120.0  # a safety net only: every wait returns on an event
# model version 1 as a fresh database has it (the default model on torch): ModelCache.get() of it in a test
V1_TORCH = {"id": 1, "name": "all-MiniLM-L6-v2", "runtime": "torch", "artifact_path": None, "dim": 384}


def fast_settings(url: str, **overrides: Any) -> Settings:
    values = dict(
        database_url=url,
        lease_seconds=10.0,
        retry_backoff_seconds=0.05,
        retry_backoff_max_seconds=0.2,
        max_attempts=3,
        poll_interval=30.0,
        batch_size=32,
        runtime="torch",  # worker semantics on the source model; the runtime switch has tests of its own
    )
    values.update(overrides)
    return load_settings(environ={}, **values)


async def aconn(url: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row)


async def wait_until(
    conn: psycopg.AsyncConnection,
    sql: str,
    params: Any = None,
    *,
    channel: str = "pgsynapse_documents",
    timeout: float = SAFETY_TIMEOUT,
) -> None:
    """Return once ``sql`` yields a true first column; re-checked on every NOTIFY on ``channel``."""
    await conn.execute(f"LISTEN {channel}")
    deadline = time.monotonic() + timeout
    while True:
        row = await (await conn.execute(sql, params)).fetchone()
        if row and list(row.values())[0]:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"condition not met within {timeout}s: {sql}")
        # a NOTIFY re-checks at once; the short cap covers changes that send none (job rows)
        await next_notifies(conn, min(left, 1.0))


@contextlib.contextmanager
def logs_until(name: str):
    """The log events, captured as by structlog's ``capture_logs``, and ``wait(timeout)``: block until the event
    ``name`` is logged (from any thread), without polling; returns the first such event, or raises TimeoutError."""
    seen = threading.Event()

    def watch(logger: Any, method: str, event: Any) -> Any:
        if event.get("event") == name:
            seen.set()
        return event

    with capture_logs(processors=[watch]) as logs:
        def wait(timeout: float = SAFETY_TIMEOUT) -> dict[str, Any]:
            if not seen.wait(timeout):
                raise TimeoutError(f"{name} not logged within {timeout}s: {[e['event'] for e in logs]}")
            return next(e for e in logs if e["event"] == name)

        yield logs, wait


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, models, url: str | None = None, **kw: Any) -> AsyncIterator[Any]:
    """An in-process worker, started (LISTEN up) before the body runs, drained and stopped after; ``url``: the
    database of settings without one (the embedded server's)."""
    worker = Worker(settings, url or settings.database_url, models=models, **kw)
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: worker.run(task_status=task_status, handle_signals=False))
        try:
            yield worker
        finally:
            worker.request_stop()


@dataclass
class WorkerProcess:
    """A ``pgsynapse run`` subprocess whose JSON log lines are collected as events."""

    proc: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "raw", "line": line.rstrip()}
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "process_exited"})
            self._cond.notify_all()

    def wait_event(self, name: str | tuple[str, ...], timeout: float = SAFETY_TIMEOUT, start: int = 0) -> dict[str, Any]:
        """The first event named ``name`` (or any of a tuple of names) from ``start`` on."""
        names = (name,) if isinstance(name, str) else name
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[start:]:
                    if ev.get("event") in names:
                        return ev
                    if ev.get("event") == "process_exited" and "process_exited" not in names:
                        raise RuntimeError(f"worker exited before {name!r}: {self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {name!r} event within {timeout}s: {self.tail()}")
                self._cond.wait(left)

    def fatal_errors(self) -> list[str]:
        """What it stopped on: the ``error`` of its ``fatal_error`` events (the JSON log's ``pgsynapse: error:``)."""
        return [e["error"] for e in self.events if e.get("event") == "fatal_error"]

    def tail(self, n: int = 15) -> str:
        return "\n".join(json.dumps(e) for e in self.events[-n:])

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when the test process dies, even killed outright, instead of living
    on with ppid 1 (Linux; elsewhere a no-op). Popen from the main thread only: the signal follows the forking
    thread."""
    parent = os.getpid()

    def arm() -> None:
        if sys.platform == "linux":
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # it died between the fork and the prctl
                os._exit(1)

    return arm


def spawn_worker(
    url: str,
    *args: str,
    env: dict[str, str] | None = None,
    wait_started: bool = True,
    entry: list[str] | None = None,
    prefix: list[str] | None = None,
    migrate: bool = False,
) -> WorkerProcess:
    """``pgsynapse run`` in a subprocess; ``entry`` replaces ``-m pgsynapse`` (a script with a fault injected),
    ``prefix`` goes before the interpreter (``ip netns exec NS``: tests/chaos/partition.py); ``migrate``: without
    ``--no-migrate`` (the worker takes the migrations' lock and applies what is pending)."""
    full_env = {**os.environ, "PGSYNAPSE_LEASE_SECONDS": "10", "PGSYNAPSE_RETRY_BACKOFF_SECONDS": "0.05",
                "PGSYNAPSE_POLL_INTERVAL": "30", **(env or {})}
    full_env.pop("DATABASE_URL", None)
    proc = subprocess.Popen(
        [*(prefix or []), sys.executable, *(entry or ["-m", "pgsynapse"]), "--database-url", url, "--log-format", "json", "run",
         *([] if migrate else ["--no-migrate"]), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=full_env,
        cwd=str(Path(__file__).parent),
        preexec_fn=die_with_parent(),
    )
    wp = WorkerProcess(proc)
    threading.Thread(target=wp._pump, daemon=True).start()
    if wait_started:
        wp.wait_event("worker_started")
    return wp


def pgsynapse(*args: str, url: str | None = None, cwd: str = "/tmp", env: dict[str, str] | None = None,
              timeout: int = 600, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    """``python -m pgsynapse ARGS`` as a user runs it: in ``cwd``, with ``url`` as DATABASE_URL (none without it)."""
    full = {**os.environ, **(env or {})}
    full.pop("DATABASE_URL", None)
    if url:
        full["DATABASE_URL"] = url
    return subprocess.run([python, "-m", "pgsynapse", *args], capture_output=True, text=True, cwd=cwd,
                          env=full, timeout=timeout, stdin=subprocess.DEVNULL)


def adopt_runtime(url: str, version: dict[str, Any]) -> None:
    """Give a test's database the version exported by ``default_runtime``, as after a fresh install's first start."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE pgsynapse.model_versions SET runtime = %s, artifact_path = %s, metrics = %s::jsonb"
                     " WHERE id = 1", (version["runtime"], version["artifact_path"], json.dumps(version["metrics"])))


def admin_connection(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


def with_db(url: str, dbname: str) -> str:
    """``url`` with another database name."""
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


def drop_database(admin_url: str, name: str) -> None:
    with admin_connection(admin_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def insert_docs(url: str, docs: list[tuple[str, str]]) -> list[int]:
    """One INSERT statement for all ``(title, body)`` pairs; returns ids."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "INSERT INTO pgsynapse.documents (title, body) SELECT * FROM unnest(%s::text[], %s::text[]) RETURNING id",
            ([t for t, _ in docs], [b for _, b in docs]),
        ).fetchall()
    return [r[0] for r in rows]


def connections_opened(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, dict[str, str]]]:
    """From now on, each sync connection this process opens, as (its prepare_threshold, libpq's parameters of it):
    the real connections, only watched."""
    opened: list[tuple[Any, dict[str, str]]] = []
    real = psycopg.Connection.connect

    def connect(*args: Any, **kwargs: Any) -> psycopg.Connection:
        conn = real(*args, **kwargs)
        opened.append((conn.prepare_threshold, conn.info.get_parameters()))
        return conn

    monkeypatch.setattr(psycopg, "connect", connect)
    monkeypatch.setattr(psycopg.Connection, "connect", connect)
    return opened


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def kill_and_see_its_backend_end(proc: subprocess.Popen, backend_pid: int, what: str, lock: str) -> None:
    """SIGKILL ``proc``, a client waiting on a lock through server backend ``backend_pid``, and fail unless that
    backend ends with it (within 30 s: a backend blocked in a lock wait never reads its closed socket)."""
    backend = psutil.Process(backend_pid)  # taken before the kill: the pid is the backend's while it lives
    proc.kill()
    proc.wait(60)
    try:
        backend.wait(30)  # returns as soon as the backend exits
    except psutil.TimeoutExpired:
        pytest.fail(f"the killed {what}'s backend still waits on the {lock} after 30 s")
