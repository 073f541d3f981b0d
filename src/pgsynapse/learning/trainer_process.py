"""A training run in its own process, watched: shared by the ``retrain`` job (``pgsynapse.learning.train``) and
the ``sql_retrain`` job (``pgsynapse.textsql.train``).

The trainer is started as ``python -m MODULE`` and reads its spec as JSON on stdin (the spec holds the database URL,
password included: a pipe, never a file, argv or the environment). It reports progress as one JSON line per event
on stdout (:func:`progress`), which the parent relays to its log, and writes ``metrics.json`` into its output
directory. The parent kills it when its resident memory goes over a budget (it must never take the machine down)
or when it runs past a deadline (it must never hang the worker's retrain loop).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from pgsynapse.errors import PgsynapseError
from pgsynapse.logs import get_logger

log = get_logger(__name__)

STEP_LOG_SECONDS = 5.0  # step events are relayed at most this often (and the last one always)


class TrainingFailed(PgsynapseError):
    """The training process failed, ran out of its memory budget or produced no metrics. ``retry``: whether
    running it again as it is may help (not after its memory budget or its deadline stopped it)."""

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


def progress(event: str, **kw: Any) -> None:
    """In the trainer: one JSON line per progress event on stdout; the parent turns them into log events."""
    print(json.dumps({"event": event, **kw}, default=str), flush=True)


def run_trainer(module: str, spec: dict[str, Any], out_dir: str | Path, *, memory_mb: float,
                kill_after_seconds: float, default_event: str, **log_context: Any) -> dict[str, Any]:
    """Run ``python -m module`` with ``spec`` on stdin, relay its progress events to the log (with
    ``log_context``), and return the ``metrics.json`` it wrote into ``out_dir``, plus ``peak_rss_mb_observed``.

    Raises :class:`TrainingFailed` when it goes over ``memory_mb`` of RSS or past ``kill_after_seconds`` (it is
    killed), exits non-zero (the message ends with its stderr's last lines) or writes no metrics."""
    proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        return _follow(proc, spec, Path(out_dir), memory_mb, kill_after_seconds, default_event, log_context)
    finally:
        if proc.poll() is None:  # the parent failed or was interrupted: the trainer must not outlive it
            proc.kill()
            proc.wait()


def _follow(proc: subprocess.Popen[str], spec: dict[str, Any], out_dir: Path, memory_mb: float,
            kill_after_seconds: float, default_event: str, log_context: dict[str, Any]) -> dict[str, Any]:
    try:
        if proc.stdin is not None:
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
    except BrokenPipeError:
        pass  # the trainer died at once: its exit code and stderr below say why
    over_budget = threading.Event()
    overtime = threading.Event()
    peak = [0.0]
    deadline = time.monotonic() + kill_after_seconds

    def watch() -> None:
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                rss = p.memory_info().rss / 2**20
                peak[0] = max(peak[0], rss)
                if rss > memory_mb:
                    over_budget.set()
                    proc.kill()
                    return
                if time.monotonic() > deadline:
                    overtime.set()
                    proc.kill()
                    return
                over_budget.wait(0.5)
        except psutil.NoSuchProcess:
            return

    threading.Thread(target=watch, daemon=True).start()
    stderr_tail: list[str] = []
    reader = threading.Thread(target=lambda: stderr_tail.extend(proc.stderr or []), daemon=True)
    reader.start()
    last_step = 0.0
    for line in proc.stdout or []:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if not isinstance(ev, dict):
            continue
        name = ev.pop("event", default_event)
        if name.endswith("_step") and "step" in ev and ev.get("step") != ev.get("steps"):
            if time.monotonic() - last_step < STEP_LOG_SECONDS:
                continue
            last_step = time.monotonic()
        log.info(name, **log_context, **ev)
    code = proc.wait()
    reader.join(5.0)  # the last lines of stderr, for the message below
    if over_budget.is_set():
        raise TrainingFailed(f"training exceeded its memory budget of {memory_mb:.0f} MB and was stopped",
                             retry=False)
    if overtime.is_set():
        raise TrainingFailed(f"training ran past its deadline ({kill_after_seconds:.0f} s) and was stopped",
                             retry=False)
    if code != 0:
        tail = " ".join("".join(stderr_tail[-5:]).split())[-400:]
        raise TrainingFailed(f"training process exited with {code}: {tail}")
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise TrainingFailed(f"training process wrote no readable metrics.json in {out_dir}: {exc}") from None
    metrics["peak_rss_mb_observed"] = round(peak[0], 1)
    return metrics
