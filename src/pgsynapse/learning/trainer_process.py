"""A training run in its own process, watched: shared by the ``retrain`` job (``pgsynapse.learning.train``) and
the ``sql_retrain`` job (``pgsynapse.textsql.train``).

The trainer is started as ``python -m MODULE`` (by learning/trainer_start.py, which reports its failures from
the start) and reads its spec as one JSON line on stdin (:func:`read_spec`; the
spec holds the database URL, password included: a pipe, never a file, argv or the environment). The parent holds
stdin open for the whole run: when it closes, the parent is gone (SIGKILL included) and the trainer exits at once,
instead of training on for nobody until its next progress line fails to write. It reports progress as one JSON line per event
on stdout (:func:`progress`), which the parent relays to its log, and writes ``metrics.json`` into its output
directory. The parent kills it when its resident memory goes over a budget (it must never take the machine down)
or when it runs past a deadline (it must never hang the worker's retrain loop), and when its worker is stopping
(:class:`Stop`: a SIGTERM does not wait for a run of up to twice its budget; the job is released instead).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from pgsynapse.errors import ConfigError, PgsynapseError
from pgsynapse.logs import get_logger

log = get_logger(__name__)

STEP_LOG_SECONDS = 5.0  # step events are relayed at most this often (and the last one always)


class TrainingFailed(PgsynapseError):
    """The training process failed, ran out of its memory budget or produced no metrics. ``retry``: whether
    running it again as it is may help (not after its memory budget or its deadline stopped it). ``reason``: why,
    for a line that says already that training failed (the job row, which `pgsynapse retrain` prints after
    "retrain failed: "): the message less its "training failed: ", else the message."""

    def __init__(self, message: str, *, retry: bool = True, stderr: str = "", reason: str | None = None) -> None:
        super().__init__(message)
        self.retry = retry
        self.stderr = stderr  # the trainer's last lines on stderr (its traceback), for the log
        self.reason = reason or message


class TrainingAbandoned(TrainingFailed):
    """The worker is stopping: the training run was stopped (or not started), and nothing of it is kept."""

    def __init__(self) -> None:
        super().__init__("the worker is stopping: the training run was abandoned", retry=True)


class Stop:
    """How a stopping worker abandons its training runs: :meth:`now`, from any thread, kills the trainer running
    and refuses to start another (:func:`run_trainer` raises :class:`TrainingAbandoned`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requested = False
        self._proc: subprocess.Popen[str] | None = None

    def now(self) -> None:
        with self._lock:
            self.requested = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def attach(self, proc: subprocess.Popen[str] | None) -> None:
        """The trainer now running (None: none); killed at once when the stop came first."""
        with self._lock:
            self._proc = proc
            late = self.requested
        if late and proc is not None:
            proc.kill()


PARENT_GONE_EXIT = 3  # the trainer's exit code when its parent went away


def read_spec() -> dict[str, Any]:
    """In the trainer: its spec, the first line on stdin. An exception that ends the trainer from then on is
    reported to the parent as a ``trainer_failed`` event (:func:`describe_failure`), before its traceback goes to
    stderr as usual. Then a thread waits for stdin's end, which comes when the
    parent dies or gives the run up: the trainer exits at once (a silent stretch, data loading or evaluation, takes
    minutes)."""
    report_failures()  # already so when started by run_trainer (learning/trainer_start.py)
    spec = json.loads(sys.stdin.readline())
    threading.Thread(target=_exit_with_parent, args=(sys.stdin.fileno(),), name="parent_watch", daemon=True).start()
    return spec


def report_failures() -> None:
    """In the trainer: an exception that ends it is reported to the parent as a ``trainer_failed`` event
    (:func:`describe_failure`), before its traceback goes to stderr as usual."""
    sys.excepthook = _report_failure


def _exit_with_parent(fd: int) -> None:
    # the raw descriptor, not sys.stdin: a daemon thread blocked holding stdin's lock aborts the interpreter's exit
    while os.read(fd, 4096):  # the parent writes nothing more: b"" when its end of the pipe closes
        pass
    os._exit(PARENT_GONE_EXIT)  # no cleanup: nobody waits for this run's outcome


FAILED_EVENT = "trainer_failed"  # the trainer's last event when an exception ends it: its error, for people
OOM_KILLER_SIGNAL = 9  # the kernel's out-of-memory killer sends SIGKILL


def _report_failure(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    try:
        progress(FAILED_EVENT, error=describe_failure(exc), retry=retry_may_help(exc))
    finally:
        sys.__excepthook__(kind, exc, tb)  # the traceback, on stderr: the parent logs it


def describe_failure(exc: BaseException) -> str:
    """What ended a trainer, for the job row and the CLI: the common failures (out of memory, a full disk, model files
    missing or unreadable) said plainly with what to do, any other as its type and first line; its traceback goes to
    the log."""
    first = (str(exc).strip().splitlines() or [""])[0]
    first = first if len(first) <= 300 else f"{first[:300]}..."
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch's, on a GPU
        return (f"out of memory ({type(exc).__name__}{': ' + first if first else ''}): give the trainer more memory "
                "(free some, or run it on a larger host), or train on less: fewer layers, shorter passages or "
                "smaller batches (docs/learning.md)")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the disk is full: cannot write {exc.filename or 'the trained model'}: free space there (old runs "
                "under DATA_DIR/models that no registry row names can go) and run it again")
    if isinstance(exc, OSError) and exc.errno in (None, errno.ENOENT, errno.EACCES):  # transformers' load errors too
        return (f"missing or unreadable model files: {first}: restore the model directory (config.json, the weights "
                "and the tokenizer files), or train from another")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def retry_may_help(exc: BaseException) -> bool:
    """Whether running a trainer again as it is may help after ``exc`` (not after running out of memory, nor with
    model files or a package missing, nor with a setting that cannot work: they stay so until an operator acts)."""
    if isinstance(exc, (MemoryError, ImportError)) or type(exc).__name__ == "OutOfMemoryError":
        return False  # an ImportError: a package missing or broken stays so
    if isinstance(exc, ConfigError):
        return False  # a model preset not installed, a model path that is not a model: the same at every attempt
    return not (isinstance(exc, OSError) and exc.errno in (None, errno.ENOENT, errno.EACCES))


CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT})


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _why_signal(number: int) -> str:
    if number in CRASH_SIGNALS:
        return "a crash in native code: torch, ONNX Runtime or another library"
    return "sent by another process"


def progress(event: str, **kw: Any) -> None:
    """In the trainer: one JSON line per progress event on stdout; the parent turns them into log events."""
    print(json.dumps({"event": event, **kw}, default=str), flush=True)


def run_trainer(module: str, spec: dict[str, Any], out_dir: str | Path, *, memory_mb: float,
                kill_after_seconds: float, default_event: str, stop: Stop | None = None,
                budget_setting: str = "retrain_budget_seconds", **log_context: Any) -> dict[str, Any]:
    """Run ``python -m module`` (through learning/trainer_start.py) with ``spec`` on stdin, relay its progress
    events to the log (with ``log_context``), and return the ``metrics.json`` it wrote into ``out_dir``, plus
    ``peak_rss_mb_observed``.

    Raises :class:`TrainingFailed` when it goes over ``memory_mb`` of RSS or past ``kill_after_seconds`` (it is
    killed; ``budget_setting``: the setting that deadline is twice of, plus a margin, for the message), exits
    non-zero (the message ends with its stderr's last lines) or writes no metrics;
    :class:`TrainingAbandoned` when ``stop`` was requested before it started or while it ran (it is killed)."""
    if stop is not None and stop.requested:
        raise TrainingAbandoned()
    # started by trainer_start: a failure is reported from the start, as the trainer imports its packages too
    proc = subprocess.Popen([sys.executable, "-m", "pgsynapse.learning.trainer_start", module], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if stop is not None:
        stop.attach(proc)
    try:
        metrics = _follow(proc, spec, Path(out_dir), memory_mb, kill_after_seconds, budget_setting, default_event,
                          log_context)
    except TrainingFailed as exc:
        if stop is not None and stop.requested:  # killed by the stop, not failed: its error says nothing
            raise TrainingAbandoned() from None
        if exc.stderr:
            log.error("training_process_failed", module=module, **log_context, error=str(exc), stderr=exc.stderr)
        raise
    finally:
        if stop is not None:
            stop.attach(None)
        if proc.poll() is None:  # the parent failed or was interrupted: the trainer must not outlive it
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
    return metrics  # ended as the stop came: a finished run is kept


def _follow(proc: subprocess.Popen[str], spec: dict[str, Any], out_dir: Path, memory_mb: float,
            kill_after_seconds: float, budget_setting: str, default_event: str,
            log_context: dict[str, Any]) -> dict[str, Any]:
    try:
        if proc.stdin is not None:  # held open until the trainer ends (read_spec)
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.flush()
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
    failure: dict[str, Any] = {}
    for line in proc.stdout or []:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if not isinstance(ev, dict):
            continue
        name = ev.pop("event", default_event)
        if name == FAILED_EVENT:
            failure = ev
            continue
        if name.endswith("_step") and "step" in ev and ev.get("step") != ev.get("steps"):
            if time.monotonic() - last_step < STEP_LOG_SECONDS:
                continue
            last_step = time.monotonic()
        log.info(name, **log_context, **ev)
    code = proc.wait()
    reader.join(5.0)  # the last lines of stderr, for the message below
    if over_budget.is_set():
        raise TrainingFailed(f"training exceeded its memory budget of {memory_mb:.0f} MB and was stopped: raise the "
                             "budget (retrain_memory_mb; sql_retrain_memory_mb for the SQL trainer) where the host has "
                             "the memory free, or train on less: smaller batches, fewer layers or shorter passages",
                             retry=False)
    if overtime.is_set():
        raise TrainingFailed(f"training ran past its deadline ({kill_after_seconds:.0f} s: twice {budget_setting} "
                             "plus a margin) and was stopped: a trainer stops itself at that budget, so a step or its "
                             "evaluation hung or was far slower than expected (the log's progress events say how far "
                             f"it got): raise {budget_setting} where longer runs are fine, or train on less: smaller "
                             "batches, fewer layers or shorter passages", retry=False)
    if code != 0:
        stderr = "".join(stderr_tail[-60:])  # the traceback, for the log (run_trainer)
        if failure.get("error"):
            raise TrainingFailed(f"training failed: {failure['error']}", retry=bool(failure.get("retry", True)),
                                 stderr=stderr, reason=failure["error"])
        if code == -OOM_KILLER_SIGNAL:  # not this process's kill (its budget, its deadline: above)
            raise TrainingFailed(
                f"the training process was killed (SIGKILL) at {peak[0]:.0f} MB: most likely by the system's "
                f"out-of-memory killer, the host having less free memory than the trainer's budget of "
                f"{memory_mb:.0f} MB: set that budget (retrain_memory_mb; sql_retrain_memory_mb for the SQL trainer) "
                "below what the host has free, or free memory", retry=False, stderr=stderr or "(nothing on stderr)")
        if code < 0:  # another signal: a crash in native code, or one sent from outside
            raise TrainingFailed(f"the training process was killed by {_signal_name(-code)} ({_why_signal(-code)}; "
                                 "what it wrote on stderr is in the log)", stderr=stderr or "(nothing on stderr)")
        tail = " ".join("".join(stderr_tail[-5:]).split())[-400:]
        raise TrainingFailed(f"training process exited with {code}: {tail}", stderr=stderr)
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise TrainingFailed(f"training process wrote no readable metrics.json in {out_dir}: {exc}") from None
    metrics["peak_rss_mb_observed"] = round(peak[0], 1)
    return metrics
