"""The retrain handler's trainer process gets the database URL (password included) through a pipe: it is
never in a file, on the command line or in the environment, and nothing is left behind when training fails."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

import psutil
from structlog.testing import capture_logs

from pgsynapse.config import load_settings
from pgsynapse.handlers.base import Job
from pgsynapse.handlers.retrain import RetrainHandler, RetrainWork
from pgsynapse.learning.train import TrainSpec, load_data
from pgsynapse.models import ModelCache
from tests.helpers import SAFETY_TIMEOUT, connections_opened

SECRET = "pw-TRAINER-S3CRET-9731"
V1 = {"id": 1, "name": "all-MiniLM-L6-v2", "artifact_path": None, "runtime": "torch", "dim": 384}


def _files_holding(text: str, *roots: Path) -> list[Path]:
    found = []
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and text.encode() in p.read_bytes():
                found.append(p)
    return found


def test_trainer_gets_the_url_through_a_pipe_and_a_failed_run_leaves_nothing(tmp_path, monkeypatch):
    tmp, data = tmp_path / "tmp", tmp_path / "data"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # the trainer's temp files
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # the handler's
    # a "server" that accepts the trainer's connection and answers nothing: the accept is the moment the
    # trainer has its spec and is connecting; closing it makes the run fail
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(SAFETY_TIMEOUT)
    url = f"postgresql://trainer:{SECRET}@127.0.0.1:{server.getsockname()[1]}/db?connect_timeout=60"
    settings = load_settings(environ={}, database_url=url, data_dir=str(data), runtime="torch")
    handler = RetrainHandler(settings, ModelCache())
    job = Job(1, "retrain", 0, {"force": True}, 1, datetime.now(timezone.utc))
    outcomes: list = []
    run = threading.Thread(target=lambda: outcomes.extend(handler.compute([RetrainWork(job, V1, 0, True)])))
    run.start()
    try:
        conn, _ = server.accept()
        trainers = [p for p in psutil.Process().children(recursive=True)
                    if "pgsynapse.learning.train" in " ".join(p.cmdline())]
        assert trainers
        for p in trainers:
            assert SECRET not in " ".join(p.cmdline()) and SECRET not in json.dumps(p.environ())
        assert _files_holding(SECRET, tmp, tmp_path) == []
    finally:
        server.close()
        if "conn" in locals():
            conn.close()
        run.join(SAFETY_TIMEOUT)
    assert not run.is_alive()
    [outcome] = outcomes
    assert outcome.error and outcome.error.startswith("OperationalError: ") and SECRET not in outcome.error
    # nothing of ours is left in the temp dir (importing torch in the trainer makes its own cache dir there)
    assert [p for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []
    assert _files_holding(SECRET, tmp_path) == []


def test_retrain_started_names_the_version_training_starts_from_and_the_active_one(tmp_path):
    """The active version is a query encoder trained on version 1's passages: a retrain starts again from version
    1's weights (fine-tunes never stack), and its log event says so, with the active version under its own key."""
    closed = socket.create_server(("127.0.0.1", 0))  # a port nothing listens on: the trainer fails at once
    port = closed.getsockname()[1]
    closed.close()
    settings = load_settings(environ={}, database_url=f"postgresql://trainer:pw@127.0.0.1:{port}/db",
                             data_dir=str(tmp_path / "data"), runtime="torch")
    handler = RetrainHandler(settings, ModelCache())
    job = Job(1, "retrain", 0, {"force": True}, 1, datetime.now(timezone.utc))
    active = {**V1, "id": 2, "name": "all-MiniLM-L6-v2+ft1", "passage_version_id": 1}
    with capture_logs() as logs:
        [outcome] = handler.compute([RetrainWork(job, active, 0, True, passage=V1)])
    # the trainer's own line, as `pgsynapse retrain` prints it after "retrain failed: " (it printed "retrain failed:
    # TrainingFailed: training failed: OperationalError: ...")
    assert outcome.error.startswith("OperationalError: connection failed: ") and "raining" not in outcome.error, \
        outcome.error
    started = [e for e in logs if e["event"] == "retrain_started"]
    assert [(e["base_version"], e.get("active_version")) for e in started] == [(1, 2)], started


def test_the_trainer_connects_with_the_settings_keepalives(db_url, tmp_path, monkeypatch):
    """The trainer process was given the bare URL: its connection had no TCP keepalives (a cut network held it for
    the kernel's hours), unlike the worker's; the URL it is given carries the settings' now."""
    settings = load_settings(environ={}, database_url=db_url, data_dir=str(tmp_path / "data"), runtime="torch",
                             keepalives_idle_seconds=7)
    given: list[dict] = []

    def trainer(module: str, spec: dict, out_dir, **kw) -> dict:  # the spec the trainer process would read
        given.append(spec)
        raise RuntimeError("stopped by the test before training")

    monkeypatch.setattr("pgsynapse.handlers.retrain.run_trainer", trainer)
    job = Job(1, "retrain", 0, {"force": True}, 1, datetime.now(timezone.utc))
    [outcome] = RetrainHandler(settings, ModelCache()).compute([RetrainWork(job, V1, 0, True)])
    assert "stopped by the test" in outcome.error
    opened = connections_opened(monkeypatch)
    load_data(TrainSpec(**given[0]))  # the trainer's first step, with that spec
    assert [(p, params.get("keepalives"), params.get("keepalives_idle")) for p, params in opened] == [(None, "1", "7")]


def test_a_trainer_killed_by_the_system_is_said_to_be_out_of_memory(tmp_path):
    """A trainer the kernel's out-of-memory killer ended (SIGKILL, not the run's own memory budget) was reported as
    "training process exited with -9: " and nothing after: the job row said nothing a person could act on."""
    server = socket.create_server(("127.0.0.1", 0))  # accepts the trainer's connection: it is running then
    server.settimeout(SAFETY_TIMEOUT)
    settings = load_settings(environ={}, database_url=f"postgresql://trainer:pw@127.0.0.1:{server.getsockname()[1]}"
                             "/db?connect_timeout=60", data_dir=str(tmp_path / "data"), runtime="torch")
    job = Job(1, "retrain", 0, {"force": True}, 1, datetime.now(timezone.utc))
    outcomes: list = []
    run = threading.Thread(target=lambda: outcomes.extend(
        RetrainHandler(settings, ModelCache()).compute([RetrainWork(job, V1, 0, True)])))
    with capture_logs() as logs:
        run.start()
        try:
            conn, _ = server.accept()
            [trainer] = [p for p in psutil.Process().children(recursive=True)
                         if "pgsynapse.learning.train" in " ".join(p.cmdline())]
            trainer.kill()  # as the OOM killer does
            run.join(SAFETY_TIMEOUT)
            conn.close()
        finally:
            server.close()
    [outcome] = outcomes
    assert outcome.error.startswith("the training process was killed (SIGKILL) at ") and \
        "most likely by the system's out-of-memory killer" in outcome.error and \
        "set that budget (retrain_memory_mb; sql_retrain_memory_mb for the SQL trainer) below what the host has " \
        "free" in outcome.error, outcome.error
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["training_process_failed"], logs
    # run again as it is, it would be killed again (max_attempts runs of up to twice the budget each)
    assert outcome.retry is False
