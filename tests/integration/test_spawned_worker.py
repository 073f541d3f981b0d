"""A worker that a test spawns goes when the test process goes, even one killed outright (kill -9 of pytest, a CI
job cancelled): it used to live on with ppid 1, retrying a database that its fixture had dropped."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

from tests.helpers import SAFETY_TIMEOUT

# a stand-in for pytest: spawns a worker the way the tests do, says its pid, and waits to be killed
PARENT = """
import sys
from tests.helpers import spawn_worker
worker = spawn_worker(sys.argv[1])
print(worker.proc.pid, flush=True)
sys.stdin.read()
"""


def test_a_spawned_worker_stops_when_the_test_process_is_killed(db_url):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, db_url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=str(Path(__file__).parents[2]))
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    worker = os.pidfd_open(pid)  # readable once the worker has exited
    try:
        parent.kill()
        parent.wait()
        ready, _, _ = select.select([worker], [], [], SAFETY_TIMEOUT)
        assert ready, f"worker {pid} outlived the process that spawned it"
    finally:
        if not select.select([worker], [], [], 0)[0]:
            os.kill(pid, 9)
        os.close(worker)
