"""The ``retrain`` job: fine-tune a candidate from feedback in a separate process, evaluate it against the
active model on a grouped hold-out of feedback and on the canary set, register it, and gate it
(learning/gate.py): a winner is backfilled, a loser rejected."""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgsynapse.artifacts import drop_weights, new_run_dir
from pgsynapse.config import Settings
from pgsynapse.db import child_url
from pgsynapse.errors import RegistryError
from pgsynapse.handlers.base import Handler, Job, Outcome, WriteReport
from pgsynapse.learning import NOTHING_TO_LEARN
from pgsynapse.learning.gate import verdict
from pgsynapse.learning.train import TrainSpec
from pgsynapse.learning.trainer_process import Stop, TrainingAbandoned, TrainingFailed, run_trainer
from pgsynapse.logs import get_logger
from pgsynapse.export import source_model_path
from pgsynapse.models import ModelCache, resolve_model_path
from pgsynapse.queries import q
from pgsynapse.ranking.rescore import teacher_id, teacher_row
from pgsynapse.table_locks import alock_table

log = get_logger(__name__)


@dataclass
class RetrainWork:
    job: Job
    active: dict[str, Any]
    untrained: int  # examples no version was trained on yet (retrain_min_feedback counts them)
    force: bool
    passage: dict[str, Any] | None = None  # the active version's passage version, when it is a query encoder
    teacher: dict[str, Any] | None = None  # the version whose vectors label the examples (retrain_teacher)
    teacher_error: str | None = None  # why the configured teacher cannot label them
    examples: int = 0  # every example that stands: what the run trains on (fine-tunes never stack)


async def find_teacher(conn: psycopg.AsyncConnection, setting: str) -> tuple[dict[str, Any] | None, str | None]:
    """The model version that labels the training examples (``retrain_teacher``): the active ranker's version
    (``ranker``: none when the active ranker is not a model version, or there is none), ``version:N``, or none;
    with the reason when that version cannot (gone, retired or rejected, still backfilling)."""
    if setting == "none":
        return None, None
    if setting == "ranker":
        row = await (await conn.execute(q("active_version_ranker", "rankers.sql"))).fetchone()
        if row is None:
            return None, None
        version = teacher_id(row)
    else:
        version = teacher_id({"id": "retrain_teacher", "path": setting})
    try:
        return await teacher_row(conn, version), None
    except RegistryError as exc:
        return None, f"retrain_teacher {setting}: {exc}"


def gate(metrics: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The verdict of learning/gate.py on the trainer's per-question scores (``metrics["gate_scores"]``): the
    grouped hold-out gain's interval must be above ``retrain_margin`` and the canary gain must not regress
    beyond ``retrain_canary_tolerance``. Returns the verdict (``passed``, intervals, reasons)."""
    scores = metrics.get("gate_scores") or {}
    rule = {"margin": settings.retrain_margin, "tolerance": settings.retrain_canary_tolerance,
            "confidence": settings.retrain_gate_confidence, "samples": settings.retrain_bootstrap_samples}
    out = verdict(scores.get("heldout"), scores.get("canary"), **rule)
    if scores.get("refit_canary") is not None:
        # the registered model is the recipe refit on every example: its canary must hold too
        refit = verdict(scores.get("heldout"), scores["refit_canary"], **rule)
        out["refit_canary"] = refit.get("canary")
        out["reasons"] += [f"refit {r}" for r in refit["reasons"] if r.startswith("canary")]
        out["passed"] = out["passed"] and (refit["passed"] or out["forced"])
    out["k"] = settings.retrain_eval_k
    return out


def train_spec(s: Settings, **run: Any) -> TrainSpec:
    """The trainer's spec: the recipe from the settings, and ``run``'s own fields (URL, versions, paths)."""
    return TrainSpec(
        chunk_tokens=s.chunk_tokens, lr=s.retrain_lr, epochs=s.retrain_epochs, batch_size=s.retrain_batch_size,
        heldout_fraction=s.retrain_heldout_fraction, group_threshold=s.retrain_group_threshold,
        synthetic_pairs=s.retrain_synthetic_pairs, budget_seconds=s.retrain_budget_seconds, eval_k=s.retrain_eval_k,
        threads=s.torch_threads, anchor=s.retrain_anchor, interpolate=s.retrain_interpolate, soup=s.retrain_soup,
        seed=s.retrain_seed, refit=s.retrain_refit,
        canary_size=s.retrain_canary_size, negative_pool=s.retrain_negative_pool,
        freeze_layers=s.retrain_freeze_layers, teacher_weight=s.retrain_teacher_weight, **run)


def _teacher_spec(teacher: dict[str, Any] | None, s: Settings) -> dict[str, Any]:
    """The trainer's teacher fields: the version as it serves (its runtime and artifact)."""
    if teacher is None:
        return {}
    return {"teacher_version": teacher["id"], "teacher_runtime": teacher["runtime"], "teacher_dim": teacher["dim"],
            "teacher_path": str(resolve_model_path(teacher.get("artifact_path"), s.model_path, teacher["runtime"],
                                                   data_dir=s.data_dir))}


class RetrainHandler(Handler[RetrainWork]):
    kind = "retrain"
    concurrency = 1  # one training at a time, whatever is queued
    watchdog_exempt = True  # a batch is a training run: bounded by its own deadline below, not by the watchdog
    # the trainer is its own process: a worker crash meanwhile is not this job's doing, and a retrain claimed
    # alone would hold back every other kind for the whole run
    crash_isolation = False

    def __init__(self, settings: Settings, models: ModelCache) -> None:
        self.settings = settings
        self.models = models
        # leases renewed until the trainer's own kill deadline (see run_trainer), plus a minute to record the outcome
        self.deadline_seconds = 2 * settings.retrain_budget_seconds + 360
        self.stop = Stop()

    def abandon(self) -> None:
        self.stop.now()  # a SIGTERM does not wait for the training run: its job is released for the next worker

    async def load(self, conn: psycopg.AsyncConnection, jobs: list[Job]) -> tuple[list[RetrainWork], list[Outcome]]:
        active = await (await conn.execute(q("active_version"))).fetchone()
        passage = None
        if active is not None and active["passage_version_id"]:
            passage = await (await conn.execute(q("version_by_id", "learning.sql"),
                                                {"version": active["passage_version_id"]})).fetchone()
        counts = await (await conn.execute(q("feedback_progress", "learning.sql"))).fetchone()
        if not counts["examples"]:
            # forced or not: trained on corpus pairs alone, a candidate could only be rejected by the gate, after
            # freezing the canary set from the corpus as it is now
            return [], [Outcome(j, skip_reason=NOTHING_TO_LEARN) for j in jobs]
        teacher, why = await find_teacher(conn, self.settings.retrain_teacher)
        work = [RetrainWork(j, active, counts["untrained"], bool(j.payload.get("force")), passage, teacher, why,
                            counts["examples"]) for j in jobs]
        return work, []

    def compute(self, work: list[RetrainWork]) -> list[Outcome]:
        out = []
        for w in work:
            if not w.force and w.untrained < self.settings.retrain_min_feedback:
                out.append(Outcome(w.job, skip_reason=f"only {w.untrained} new examples"))
                continue
            if w.teacher_error and self.settings.retrain_teacher != "ranker":
                out.append(Outcome(w.job, error=w.teacher_error))  # the version asked for: say why, do not guess
                continue
            if w.teacher_error:
                log.warning("retrain_teacher_skipped", job=w.job.id, reason=w.teacher_error)
            try:
                result = self._train(w)
                result["metrics"]["gate"] = gate(result["metrics"], self.settings)
                out.append(Outcome(w.job, result=result))
            except TrainingAbandoned as exc:
                out.append(Outcome(w.job, error=str(exc), abandoned=True))
            except TrainingFailed as exc:  # not retried when running it again as it is cannot help (out of memory)
                out.append(Outcome(w.job, error=exc.reason, retry=exc.retry))  # "retrain failed: " + it, on the CLI
            except Exception as exc:  # noqa: BLE001 - the job's error, retried per max_attempts
                out.append(Outcome(w.job, error=f"{type(exc).__name__}: {exc}"))
        return out

    def out_dir(self, w: RetrainWork) -> Path:
        """The run's own new folder ``DATA_DIR/models/candidate-TIMESTAMP-JOB``, made here: never one there already
        (another database's sharing the data dir, with a job of the same id in the same second)."""
        return new_run_dir(Path(self.settings.data_dir) / "models", "candidate", f"-{w.job.id}")

    def _train(self, w: RetrainWork) -> dict[str, Any]:
        s = self.settings
        # a candidate is a query encoder over the passage version's chunk vectors, trained from that version's
        # weights on all feedback so far (not from the active encoder: fine-tunes never stack)
        passage = w.passage or w.active
        out_dir = self.out_dir(w)
        try:
            spec = train_spec(
                s, url=child_url(s.database_url or "", s), base_version=passage["id"], out_dir=str(out_dir),
                # torch weights, also of an exported version
                base_path=str(source_model_path(passage, s.model_path, s.data_dir)),
                active_path=str(source_model_path(w.active, s.model_path, s.data_dir)), active_version=w.active["id"],
                **_teacher_spec(w.teacher, s),
            )
            log.info("retrain_started", job=w.job.id, base_version=spec.base_version, active_version=w.active["id"],
                     examples=w.examples, new_examples=w.untrained, out=str(out_dir), teacher=spec.teacher_version)
            # the spec carries the database URL, password included: run_trainer hands it over through a pipe.
            # Training stops itself at its budget; evaluation and saving get as long again, then it is killed.
            metrics = run_trainer("pgsynapse.learning.train", asdict(spec), out_dir, memory_mb=s.retrain_memory_mb,
                                  kill_after_seconds=self.deadline_seconds - 60, default_event="retrain_progress",
                                  stop=self.stop, budget_setting="retrain_budget_seconds", job=w.job.id)
        except TrainingAbandoned:
            shutil.rmtree(out_dir, ignore_errors=True)  # a partial candidate: nothing of it is kept
            log.info("retrain_abandoned", job=w.job.id, removed=str(out_dir),
                     note="the worker is stopping: the job goes back to the queue at once, its attempt not charged")
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # a run that failed before it wrote anything leaves no empty folder
            raise
        return {"metrics": metrics, "path": spec.out_dir, "base": w.active, "passage": spec.base_version}

    async def write(self, conn: psycopg.AsyncConnection, outcomes: list[Outcome]) -> WriteReport:
        report = WriteReport()
        s = self.settings
        for o in outcomes:
            res = o.result
            metrics = res["metrics"]
            used = metrics.pop("used_example_ids", [])
            metrics.pop("gate_scores", None)  # per-question scores stay in the artifact's metrics.json
            verdict_ = metrics["gate"]
            moved = await self._active_moved(conn, o.job, res["base"]["id"], verdict_)
            if moved:
                used = []  # not judged against the version it would serve beside: its examples are still new
            passed = verdict_["passed"]
            status = "candidate" if passed else "rejected"
            name = f"{res['base']['name'].split('+')[0]}+ft{time.strftime('%Y%m%d%H%M%S')}"
            row = await (await conn.execute(q("register_version", "learning.sql"), {
                "name": name, "base": res["base"]["id"], "passage": res["passage"], "path": res["path"],
                "dim": res["base"]["dim"],
                "metrics": Jsonb(metrics), "status": status})).fetchone()
            version = row["id"]
            await conn.execute(q("mark_examples_trained", "learning.sql"), {"version": version, "ids": used})
            await conn.execute(q("insert_retrain_event", "learning.sql"), {
                "version": version, "event": "registered" if passed else "rejected", "job": o.job.id,
                "reason": "; ".join(verdict_["reasons"]), "figures": Jsonb({
                    "job": o.job.id, "passed": passed, "forced": verdict_["forced"], "delta": verdict_["delta"],
                    **({"gated_against": res["base"]["id"], "active": moved} if moved else {})})})
            if passed:
                await conn.execute(q("ensure_embedding_index", "learning.sql"), {"version": version})
                await conn.execute(q("enqueue_backfill", "learning.sql"), {
                    "version": version, "payload": Jsonb({"traffic_percent": s.rollout_traffic_percent}), "delay": 0})
            log.info("retrain_gate", version=version, passed=passed, forced=verdict_["forced"],
                     heldout=verdict_.get("heldout", {}).get("score"), canary=verdict_.get("canary", {}).get("score"),
                     confidence=verdict_["confidence"], reasons=verdict_["reasons"])
            log.info("retrain_registered", version=version, status=status, gate_delta=verdict_["delta"],
                     candidate=metrics.get("candidate"), active=metrics.get("active"))
            if not passed:  # it never serves or trains again: its record stays, its weights go
                log.info("rejected_weights_deleted", version=version, path=res["path"],
                         freed_mb=round(drop_weights(res["path"], s.data_dir) / 2**20, 1))
            report.written.append(o.job.id)
        return report

    async def _active_moved(self, conn: psycopg.AsyncConnection, job: Job, gated_against: int,
                            verdict_: dict[str, Any]) -> int | None:
        """The version active now when it is not ``gated_against``, the one the candidate's gate compared it with
        (another was promoted during the retrain): the verdict is then a rejection, saying why first. Holds the
        registry's lock until the caller's transaction ends, so no promotion slips in before the registration."""
        await alock_table(conn, q("lock_model_versions", "learning.sql"), "pgsynapse.model_versions")  # waits said
        row = await (await conn.execute(q("active_version"))).fetchone()
        active = row["id"] if row else None
        if active == gated_against:
            return None
        verdict_["passed"] = False
        verdict_["reasons"].insert(0, f"the active version changed during the retrain (version {gated_against} when "
                                      f"it started, version {active} now): its gate compared the candidate with "
                                      f"version {gated_against}, not with version {active}: retrain again")
        log.warning("retrain_active_changed", job=job.id, gated_against=gated_against, active=active,
                    note="the candidate is rejected; its examples stay new for the next retrain")
        return active
