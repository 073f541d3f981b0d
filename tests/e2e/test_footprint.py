"""What a worker on the default settings costs the machine beyond its model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import aconn, adopt_runtime, insert_docs, spawn_worker, wait_until

pytestmark = pytest.mark.anyio

MODULES_WORKER = Path(__file__).resolve().parents[1] / "modules_worker.py"


async def test_a_worker_on_the_default_runtime_never_imports_torch(db_url: str, default_runtime: dict[str, Any]):
    """The default runtime (ONNX INT8) needs neither torch nor transformers: importing them costs a process about
    2 s and 200 MB. The image handler's module imported both at start-up for the torch image models, so every
    worker (and every `pgsynapse ask` and `search`) paid for them with no image model registered."""
    adopt_runtime(db_url, default_runtime)
    env = {"PGSYNAPSE_RUNTIME": "onnx-int8", "PGSYNAPSE_DATA_DIR": default_runtime["data_dir"]}
    worker = spawn_worker(db_url, env=env, entry=[str(MODULES_WORKER)])  # every job kind: the default
    try:
        insert_docs(db_url, [("Savepoints", "SAVEPOINT establishes a new savepoint within the current transaction. "
                                            "ROLLBACK TO SAVEPOINT rolls back all commands executed after it.")])
        conn = await aconn(db_url)
        await wait_until(conn, "SELECT bool_and(status = 'embedded') FROM pgsynapse.documents")
        row = await (await conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('How do I undo part of a "
                                        "transaction?') RETURNING id")).fetchone()
        await wait_until(conn, "SELECT status = 'answered' FROM pgsynapse.questions WHERE id = %s", (row["id"],),
                         channel="pgsynapse_answers")
        await conn.close()
        assert worker.wait_event("model_loaded")["runtime"] == "onnx-int8"
    finally:
        code = worker.stop()
    assert code == 0, worker.tail()
    assert worker.wait_event("modules_at_exit") == {
        "event": "modules_at_exit", "torch": False, "transformers": False, "sentence_transformers": False}


@pytest.mark.parametrize("command", [["status"], ["model", "list"], ["image-model", "list"], ["ranker", "list"],
                                     ["sql-model", "list"], ["ab-report"]])
def test_a_command_that_lists_never_imports_torch(db_url: str, command: list[str]):
    """A command that reads a few rows and prints them has no model to load: importing torch would make it take
    4 s and 300 MB instead of 1 s and 70 MB. ``image-model list`` did, through the module of ``image-model
    export``."""
    r = subprocess.run([sys.executable, str(MODULES_WORKER), "--database-url", db_url, "--log-format", "json",
                        *command], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    modules = json.loads(r.stderr.strip().splitlines()[-1])
    assert modules == {"event": "modules_at_exit", "torch": False, "transformers": False,
                       "sentence_transformers": False}, command
