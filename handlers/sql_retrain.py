"""The ``sql_retrain`` job: fine-tune the SQL model on corrected questions in a separate process
(``python -m pgsynapse.textsql.train``), gate it by execution accuracy on held-out corrections against the active
model (:mod:`pgsynapse.textsql.gate`), and register it in ``pgsynapse.sql_models``.

- Skipped unless ``sql_retrain_min_corrections`` corrections are new (``trained_in_model`` NULL; payload
  ``{"now": true}``, as ``pgsynapse sql-model retrain`` queues it, or ``{"force": true}`` runs it anyway). Every
  correction the run read is marked with the registered model, whatever its verdict, so a rejected run is not
  repeated on the same corrections.
- The candidate is fine-tuned from the root of the active model's lineage (the model it, or its own base, was
  fine-tuned from; the settings' model when no row is active) on every correction so far: fine-tunes never stack.
- Registered as its GGUF export on ``llama-cpp`` when the base is a GGUF model (the trainer writes and gates it:
  :func:`pgsynapse.textsql.train.export_candidate`; the metrics keep the directory too), else as a
  ``transformers`` model directory: ``candidate`` with ``sql_retrain_traffic_percent`` of the
  sessions when it passes (less if other candidates hold the rest), ``rejected`` when it fails, ``candidate`` at
  0 % when it fails but the job was forced.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgsynapse.artifacts import drop_weights, local_artifact, new_run_dir
from pgsynapse.config import Settings
from pgsynapse.db import child_url
from pgsynapse.handlers.base import Handler, Job, Outcome, WriteReport, describe
from pgsynapse.learning.routing import share_left
from pgsynapse.learning.trainer_process import Stop, TrainingAbandoned, TrainingFailed, run_trainer
from pgsynapse.logs import get_logger
from pgsynapse.models import ModelCache
from pgsynapse.queries import q
from pgsynapse.table_locks import alock_table
from pgsynapse.textsql.gate import sql_verdict
from pgsynapse.textsql.registry import REGISTRY, base_hint, entry, out_of_service
from pgsynapse.textsql.train import SqlTrainSpec

log = get_logger(__name__)

FILE = "textsql_models.sql"
# what the trainer process needs of the worker's settings, besides the spec's own fields
TRAINER_SETTINGS = ("data_dir", "torch_threads", "openai_base_url", "openai_api_key", "history_turns", "max_question_chars")


@dataclass
class SqlRetrainWork:
    job: Job
    active: dict[str, Any] | None  # the active sql_models row (None: the settings' model serves)
    base: dict[str, Any] | None  # the row fine-tuned from: the root of the active's lineage (None: settings' model)
    new: int  # corrections since the last SQL retrain
    force: bool  # registered even if it fails its gate (and run whatever the threshold)
    now: bool = False  # asked for by a command: run whatever the threshold


class SqlRetrainHandler(Handler[SqlRetrainWork]):
    kind = "sql_retrain"
    concurrency = 1  # one training at a time, whatever is queued
    watchdog_exempt = True  # a batch is a training run: bounded by its own deadline, not by the watchdog
    crash_isolation = False  # the trainer is its own process (see RetrainHandler)

    def __init__(self, settings: Settings, models: ModelCache | None = None) -> None:
        self.settings = settings
        # training stops itself at its budget; evaluation and saving get as long again, then it is killed;
        # leases are renewed until then, plus a minute to record the outcome
        self.kill_after_seconds = 2 * settings.sql_retrain_budget_seconds + 300
        self.deadline_seconds = self.kill_after_seconds + 60
        self.stop = Stop()

    def abandon(self) -> None:
        self.stop.now()  # a SIGTERM does not wait for the training run: its job is released for the next worker

    async def load(self, conn: psycopg.AsyncConnection, jobs: list[Job]) -> tuple[list[SqlRetrainWork], list[Outcome]]:
        active = await _one(conn, REGISTRY.sql("active_model"))
        base = active
        for _ in range(100):  # the lineage's root (bounded: a cycle cannot be made by the registry, but still)
            if base is None or base["base_id"] is None:
                break
            base = await _one(conn, REGISTRY.sql("model_by_id"), {"id": base["base_id"]})
        new = (await _one(conn, q("new_sql_corrections", FILE)))["n"]  # type: ignore[index]
        return [SqlRetrainWork(j, active, base, new, bool(j.payload.get("force")), bool(j.payload.get("now")))
                for j in jobs], []

    def compute(self, work: list[SqlRetrainWork]) -> list[Outcome]:
        out = []
        for w in work:
            if not (w.force or w.now) and w.new < self.settings.sql_retrain_min_corrections:
                out.append(Outcome(w.job, skip_reason=f"only {w.new} new corrections "
                                                      f"(sql_retrain_min_corrections = {self.settings.sql_retrain_min_corrections})"))
                continue
            try:
                out.append(Outcome(w.job, result=self._train(w)))
            except TrainingAbandoned as exc:
                out.append(Outcome(w.job, error=str(exc), abandoned=True))
            except TrainingFailed as exc:  # "sql_retrain failed: " + its reason, on the CLI
                out.append(Outcome(w.job, error=exc.reason, retry=exc.retry))
            except Exception as exc:  # noqa: BLE001 - the job's error, retried per max_attempts
                out.append(Outcome(w.job, error=describe(exc)))
        return out

    def spec(self, w: SqlRetrainWork, out_dir: Path) -> SqlTrainSpec:
        """The trainer's spec for one job (the database URL in it: a pipe only)."""
        s = self.settings
        base_runtime, base_path = (w.base["runtime"], w.base["path"]) if w.base else (s.sql_runtime, s.sql_model_path)
        if base_runtime == "openai":
            raise TrainingFailed(f"the SQL model to fine-tune ({base_path}) is an openai endpoint's model: only a local "
                                 "model (a transformers directory, a .gguf file or a preset) can be fine-tuned",
                                 retry=False)
        active_runtime, active_path = (w.active["runtime"], w.active["path"]) if w.active else (
            s.sql_runtime, s.sql_model_path)
        if w.base:  # a registered model's directory or GGUF file: this host's copy when the data dir moved
            base_path = str(local_artifact(base_path, s.data_dir))
        dumped = s.model_dump(mode="json")
        return SqlTrainSpec(
            url=child_url(s.database_url or "", s), out_dir=str(out_dir), base_path=base_path, active_runtime=active_runtime,
            active_path=active_path, lora=s.sql_retrain_lora, epochs=s.sql_retrain_epochs, lr=s.sql_retrain_lr,
            heldout_fraction=s.sql_retrain_heldout_fraction, budget_seconds=s.sql_retrain_budget_seconds,
            threads=s.torch_threads,
            settings={k: v for k, v in dumped.items() if k.startswith("sql_") or k in TRAINER_SETTINGS},
            base_subject=entry(w.base) if w.base else None,
            active_subject=entry(w.active) if w.active else None,
            base_hint=base_hint(w.base, w.active) if w.base and w.active else None,
            active_hint=out_of_service(w.active) if w.active else None)

    def out_dir(self, w: SqlRetrainWork) -> Path:
        """The run's own new folder ``DATA_DIR/models/sql-candidate-TIMESTAMP-JOB``, made here: never one there
        already (another database's sharing the data dir, with a job of the same id in the same second)."""
        return new_run_dir(Path(self.settings.data_dir) / "models", "sql-candidate", f"-{w.job.id}")

    def _train(self, w: SqlRetrainWork) -> dict[str, Any]:
        s = self.settings
        out_dir = self.out_dir(w)
        try:
            spec = self.spec(w, out_dir)
            log.info("sql_retrain_started", job=w.job.id, base=spec.base_path, active=spec.active_path,
                     new_corrections=w.new, forced=w.force, lora=spec.lora, out=str(out_dir))
            metrics = run_trainer("pgsynapse.textsql.train", asdict(spec), out_dir,
                                  memory_mb=s.sql_retrain_memory_mb, kill_after_seconds=self.kill_after_seconds,
                                  default_event="sql_retrain_progress", stop=self.stop,
                                  budget_setting="sql_retrain_budget_seconds", job=w.job.id)
        except TrainingAbandoned:
            shutil.rmtree(out_dir, ignore_errors=True)  # a partial candidate: nothing of it is kept
            log.info("sql_retrain_abandoned", job=w.job.id, removed=str(out_dir),
                     note="the worker is stopping: the job goes back to the queue at once, its attempt not charged")
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # a run that failed before it wrote anything leaves no empty folder
            raise
        return self.judge(w, metrics, out_dir)

    def judge(self, w: SqlRetrainWork, metrics: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """The gate's verdict on the trainer's metrics, and what :meth:`write` registers."""
        outcomes = metrics.pop("gate_outcomes")
        verdict = sql_verdict(outcomes["candidate"], outcomes["active"], margin=self.settings.sql_retrain_margin)
        metrics.pop("per_pair", None)  # stays in the model directory's metrics.json
        metrics["gate"] = verdict
        log.info("sql_retrain_finished", job=w.job.id, passed=verdict["passed"], candidate=verdict["candidate"],
                 active=verdict["active"], heldout=verdict["heldout"], train_pairs=metrics.get("train_pairs"),
                 dropped=metrics.get("dropped"), seconds=metrics.get("seconds", {}).get("total"),
                 reasons=verdict["reasons"])
        served = metrics.get("candidate_model") or {"runtime": "transformers", "path": str(out_dir)}
        return {"metrics": metrics, "path": served["path"], "runtime": served["runtime"], "base": w.base,
                "force": w.force}

    async def write(self, conn: psycopg.AsyncConnection, outcomes: list[Outcome]) -> WriteReport:
        report = WriteReport()
        s = self.settings
        for o in outcomes:
            res = o.result
            verdict = res["metrics"]["gate"]
            base = res["base"]
            await alock_table(conn, REGISTRY.sql("lock_models"), f"pgsynapse.{REGISTRY.table}")  # waits said
            if verdict["passed"]:
                others = (await _one(conn, REGISTRY.sql("candidate_traffic"), {"id": None}))["total"]  # type: ignore[index]
                status, traffic = "candidate", share_left(s.sql_retrain_traffic_percent, others)
            else:
                status, traffic = ("candidate" if res["force"] else "rejected"), 0.0
            root = base["name"] if base else Path(s.sql_model_path).name
            row = await _one(conn, REGISTRY.sql("add_model"), {
                "name": f"{root.split('+')[0]}+sqlft{time.strftime('%Y%m%d%H%M%S')}",
                "base_id": base["id"] if base else None, "path": res["path"], "runtime": res["runtime"],
                # the job that registered it: `sql-model retrain --wait` finds its own job's model by it
                "metrics": Jsonb({**res["metrics"], "job": o.job.id}), "status": status, "traffic": traffic})
            await conn.execute(q("mark_sql_corrections_trained", FILE), {
                "model": row["id"], "max_id": res["metrics"]["max_correction_id"]})  # type: ignore[index]
            log.info("sql_model_registered", job=o.job.id, model=row["id"], status=status,  # type: ignore[index]
                     runtime=res["runtime"], path=res["path"],
                     traffic_percent=traffic, passed=verdict["passed"], forced=res["force"],
                     candidate=verdict["candidate"], active=verdict["active"], delta=verdict["delta"],
                     heldout=verdict["heldout"], reasons=verdict["reasons"])
            if status == "rejected":  # it never serves: its record stays, its weights go
                log.info("rejected_weights_deleted", sql_model=row["id"], path=res["path"],  # type: ignore[index]
                         freed_mb=round(drop_weights(res["path"], s.data_dir) / 2**20, 1))
            report.written.append(o.job.id)
        return report


async def _one(conn: psycopg.AsyncConnection, sql: str, params: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The first row of a query as a dict (the worker's connections make dicts)."""
    cur = await conn.execute(sql, params or {})
    row = await cur.fetchone()
    if row is None or isinstance(row, dict):
        return row
    return dict(zip([d.name for d in cur.description or []], row))
