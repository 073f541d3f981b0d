"""How the ``pgsynapse`` program ends: a worker that has stopped ends its process at once.

Once ``pgsynapse run`` has drained, released the embedded server and returned, what is left of a normal exit is
the interpreter's teardown: module dictionaries cleared, garbage collections over every object the models and
libraries made (perf: mostly ``gc_collect_main``), the models' memory freed piece by piece. On a loaded 2-core host
that took 2 to 4.5 s after the last log event with torch loaded (a first start's export, ``runtime = torch``), 0.2
to 1 s with ONNX Runtime only, more the busier the host, eating into the stop timeouts of systemd and container
runtimes (which kill a worker that had finished cleanly). The teardown does nothing a process needs at its end:
the exit handlers (``atexit``: the logging handlers' flush, ``weakref.finalize`` and temporary directories,
multiprocessing's children) and the flush of stdout and stderr are run here first, the database connections and
the embedded server's handle are closed by then, and the kernel closes what is left open and frees the memory.
What is skipped: the objects' destructors (``__del__``, C++ destructors) and the teardown's collections.
A non-daemon thread still alive is waited for as Python waits for it: the process then exits the normal way.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import NoReturn

from pgsynapse.logs import get_logger

log = get_logger(__name__)

THREADS_GRACE = 5.0  # seconds the fast exit waits for non-daemon threads to end before it exits the normal way
_done = threading.Event()  # set by :func:`work_done`: the process has nothing left to do but exit


def work_done() -> None:
    """Say that the process has done all its work (a worker drained and stopped, its embedded server released)."""
    _done.set()


def _threads_left(wait: float = THREADS_GRACE) -> list[str]:
    """The non-daemon threads still alive after up to ``wait`` seconds of waiting for them (as Python's own exit
    would wait): AnyIO's worker threads end a moment after their event loop closes, not with it."""
    deadline = time.monotonic() + wait
    for t in threading.enumerate():
        if not t.daemon and t is not threading.main_thread():
            t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread() and t.is_alive()]


def end(code: int) -> NoReturn:
    """End the process with exit status ``code``: at once after :func:`work_done`, else the normal way."""
    if not _done.is_set():
        sys.exit(code)
    threads = _threads_left()
    log.info("process_exiting", code=code, fast=not threads, waits_for_threads=threads)
    if threads:
        sys.exit(code)
    atexit._run_exitfuncs()  # what a normal exit runs before the teardown: every handler registered, newest first
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone, a stream closed: nothing more can reach it
            pass
    os._exit(code)
