"""A retrain's (and a SQL retrain's) output folder is its own: never one that is there already."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from pgsynapse.handlers.base import Job
from pgsynapse.handlers.retrain import RetrainHandler, RetrainWork
from pgsynapse.handlers.sql_retrain import SqlRetrainHandler, SqlRetrainWork
from tests.helpers import fast_settings

JOB = Job(id=7, kind="retrain", ref_id=0, payload={}, attempts=1, queued_at=datetime.now(timezone.utc))


@pytest.mark.parametrize(("handler", "work", "prefix"), [
    (RetrainHandler, RetrainWork(JOB, active={"id": 1}, untrained=0, force=False), "candidate"),
    (SqlRetrainHandler, SqlRetrainWork(JOB, active=None, base=None, new=0, force=False), "sql-candidate"),
])
def test_a_candidate_folder_that_is_there_already_is_not_trained_into(handler, work, prefix, tmp_path):
    """`candidate-<timestamp>-<job id>` was made with mkdir(exist_ok=True): two databases sharing one data dir, each
    with its job 7 in the same second, trained into one folder, and the second registered the first's weights (or
    a mix of both)."""
    h = handler(fast_settings("postgresql://nowhere/db", data_dir=tmp_path), None)
    models = tmp_path / "models"
    for _ in range(5):  # the folder of the second it runs in: again if the clock turned meanwhile
        stamp = time.strftime("%Y%m%d-%H%M%S")
        theirs = models / f"{prefix}-{stamp}-7"
        theirs.mkdir(parents=True, exist_ok=True)
        (theirs / "model.safetensors").write_bytes(b"the other database's candidate")
        ours = h.out_dir(work)
        if time.strftime("%Y%m%d-%H%M%S") == stamp:
            break
    assert ours != theirs and ours.name.startswith(f"{prefix}-{stamp}-7"), ours
    assert ours.is_dir() and not any(ours.iterdir())  # made here, empty: the run's own
    assert (theirs / "model.safetensors").read_bytes() == b"the other database's candidate"
    assert h.out_dir(work) not in (ours, theirs)  # and never the same twice
