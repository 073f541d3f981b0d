"""What a trainer process says when an exception ends it (learning/trainer_process.py): the common failures in
plain words with what to do, for the job row and the CLI; anything else as its type and first line."""

from __future__ import annotations

import errno

import torch

from pgsynapse.learning.trainer_process import describe_failure, retry_may_help


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
