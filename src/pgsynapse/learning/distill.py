"""``pgsynapse model distill``: a smaller student trained to give a teacher version's vectors (issue 20).

The training runs in its own process (:mod:`pgsynapse.learning.distill_train`, watched for memory and time like the
retrain job's trainer); this module prepares its spec, judges the student with the retrain gate's statistics
(learning/gate.py) as a non-inferiority test against the teacher, and registers a student that passes as a
candidate exactly as ``pgsynapse model add`` does: exported to the serving runtime, backfilled, A/B tested.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

from pgsynapse.artifacts import new_run_dir
from pgsynapse.config import Settings
from pgsynapse.db import child_url
from pgsynapse.errors import InputError, ModelError, RegistryError
from pgsynapse.export import source_model_path
from pgsynapse.learning import NOTHING_TO_LEARN
from pgsynapse.learning.gate import verdict
from pgsynapse.learning.registry import add_model
from pgsynapse.learning.trainer_process import TrainingFailed, run_trainer
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)


# config.json's architectures that are not an embedding model's encoder (a plain one, or one with a masked-LM head,
# is), and what check_student's refusal calls them
NOT_EMBEDDING: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"ForSequenceClassification$"), "a cross-encoder or classifier"),
    (re.compile(r"ForCausalLM$|LMHeadModel$|ForConditionalGeneration$"), "a generative model"),
    (re.compile(r"ForTokenClassification$|ForQuestionAnswering$|ForMultipleChoice$"), "a task model"),
)


@dataclass
class DistillSpec:
    url: str
    teacher_version: int  # its stored chunk vectors are the corpus targets
    teacher_path: str  # its torch weights: they encode the questions
    student_path: str  # the model whose layers start the student
    out_dir: str
    layers: int = 3
    projection: str = "pca"  # to a teacher of another dimension: "pca" of its vectors, or a kept "dense" layer
    chunk_tokens: int = 256
    lr: float = 1e-4
    epochs: int = 3
    batch_size: int = 32
    max_chunks: int = 100_000  # a sample of a larger corpus
    max_questions: int = 20_000
    heldout_fraction: float = 0.05  # chunks kept out of training: the agreement figures
    budget_seconds: float = 1800.0
    eval_k: int = 5
    seed: int = 0
    threads: int = 0
    device: str = "cpu"  # torch's device for training and encoding: "cuda" where a GPU is


@dataclass
class Distilled:
    """What :func:`distill` did: ``row`` is the registered version, None when the gate refused the student (it
    stays in ``out_dir``, with its ``metrics.json``); ``gate`` holds the verdict and its reasons."""

    row: dict[str, Any] | None
    gate: dict[str, Any]
    metrics: dict[str, Any]
    out_dir: Path


def judge(metrics: dict[str, Any], settings: Settings, *, force: bool = False) -> dict[str, Any]:
    """The gate's verdict on a trained student (its ``gate_scores`` are taken out of ``metrics``): non-inferiority
    to the teacher by ``distill_margin`` on the feedback questions, no regression on the canary set."""
    scores = metrics.pop("gate_scores", {})
    decision = verdict(scores.get("heldout"), scores.get("canary"), margin=settings.distill_margin,
                       tolerance=settings.retrain_canary_tolerance, confidence=settings.retrain_gate_confidence,
                       samples=settings.retrain_bootstrap_samples, margin_setting="distill_margin")
    return {**decision, "forced": force and not decision["passed"]}


def check_student(path: str, layers: int, *, given: str | None = None) -> None:
    """Raise :class:`ModelError` saying what is wrong when the trainer could not build a student of ``layers``
    layers from the model at ``path`` (``given``: as the user wrote it with ``--student``), before it starts."""
    what = f"--student {given}" if given else f"the active version's model {path}"
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{what} does not exist: give a sentence-transformers model directory")
    modules = p / "modules.json"
    transformer = p  # where the transformer's config.json is: the first module's folder ("" or "0_Transformer")
    if modules.is_file():
        try:
            first = json.loads(modules.read_text())[0]
            transformer = p / first.get("path", "")
        except (ValueError, IndexError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{what}: its modules.json is not sentence-transformers' list of modules") from None
    config = transformer / "config.json"
    if not config.is_file():
        raise ModelError(f"{what} is not a sentence-transformers model directory (no config.json)")
    try:
        found = json.loads(config.read_text())
        n, architectures = found.get("num_hidden_layers"), found.get("architectures") or []
    except (ValueError, AttributeError):
        raise ModelError(f"{what}: {config} is not a JSON object") from None
    kinds = [f"{said} ({a})" for a in architectures if isinstance(a, str)
             for pattern, said in NOT_EMBEDDING if pattern.search(a)]
    if kinds or not isinstance(n, int):
        kind = kinds[0] if kinds else (f"a model without the transformer encoder layers a student is cut from "
                                       f"({config} gives no num_hidden_layers)")
        raise ModelError(f"{what} is {kind}, not a sentence-embedding model: the student must be a "
                         "sentence-transformers model (a BERT-like encoder, such as the active version's model or "
                         f"all-MiniLM-L6-v2): give its directory{'' if given else ' with --student'}")
    if not 1 <= layers <= n:
        raise ModelError(f"--student-layers {layers}: the student {path} has {n} transformer layers: keep 1 to {n}")


def distill(conn: psycopg.Connection, settings: Settings, url: str, *, teacher: int | None = None,
            student: str | None = None, layers: int = 3, name: str | None = None, epochs: int = 3,
            traffic: float = 0.0, force: bool = False, projection: str = "pca") -> Distilled:
    """Train a student of ``layers`` layers (from ``student``, else the active version's weights) to give the
    teacher version's vectors, in its own process under the retrain job's memory limit (it reads the database at
    ``url``); gate it against the teacher on the feedback questions (non-inferiority: ``distill_margin``) and the
    canary set; register a student that passes (or any, with ``force``) as a candidate like `model add`."""
    t = conn.execute(q("active_version") if teacher is None else q("version_by_id", "learning.sql"),
                     {} if teacher is None else {"version": teacher}).fetchone()
    if t is None or t["status"] not in ("active", "candidate"):
        raise RegistryError("no active model version" if teacher is None else
                            f"model version {teacher} is {t['status'] if t else 'unknown'}: a teacher must serve")
    if t["status"] == "candidate" and t["backfilled_at"] is None:
        raise RegistryError(f"model version {t['id']} is still backfilling: a teacher needs a vector for every chunk; "
                            "distil it once `pgsynapse model list` says done")
    active = conn.execute(q("active_version")).fetchone()
    base = str(Path(student).expanduser().resolve()) if student else str(
        source_model_path(active, settings.model_path, settings.data_dir))
    check_student(base, layers, given=student)
    if not conn.execute(q("version_has_vectors", "learning.sql"), {"version": t["id"]}).fetchone()["stored"]:
        raise InputError(f"model version {t['id']} has no stored chunk vectors to distil from: add documents "
                         "(pgsynapse ingest PATH) and let a worker embed them (pgsynapse run) first; nothing was trained")
    if not force and not conn.execute(q("feedback_progress", "learning.sql")).fetchone()["examples"]:
        # the gate's hold-out is the feedback's questions: with none it refuses every student, once trained
        raise InputError(f"no feedback to judge the student on: {NOTHING_TO_LEARN.split(': ', 1)[1]}: its gate could "
                         "only refuse it; nothing was trained (--force trains and registers it unjudged)")
    out_dir = new_run_dir(Path(settings.data_dir) / "models", f"distilled-v{t['id']}-{layers}l")
    spec = DistillSpec(url=child_url(url, settings), teacher_version=t["id"],
                       teacher_path=str(source_model_path(t, settings.model_path, settings.data_dir)), student_path=base,
                       out_dir=str(out_dir), layers=layers, projection=projection, chunk_tokens=settings.chunk_tokens, epochs=epochs,
                       budget_seconds=settings.distill_budget_seconds, eval_k=settings.retrain_eval_k,
                       threads=settings.torch_threads, device=settings.distill_device)
    try:
        metrics = run_trainer("pgsynapse.learning.distill_train", asdict(spec), out_dir,
                              memory_mb=settings.retrain_memory_mb,
                              kill_after_seconds=settings.distill_budget_seconds * 2 + 600,
                              default_event="distill_progress",
                              budget_setting="distill_budget_seconds")
    except TrainingFailed:
        with contextlib.suppress(OSError):
            out_dir.rmdir()  # a run that failed before it wrote anything leaves no empty folder
        raise
    metrics["gate"] = judge(metrics, settings, force=force)
    log.info("distill_gate", teacher=t["id"], layers=layers, passed=metrics["gate"]["passed"], forced=force,
             reasons=metrics["gate"]["reasons"], out=str(out_dir))
    if not metrics["gate"]["passed"] and not force:
        return Distilled(None, metrics["gate"], metrics, out_dir)
    row = add_model(conn, out_dir, name=name or f"{t['name']}-distilled-{layers}l", traffic=traffic,
                    serving_runtime=settings.runtime, chunk_tokens=settings.chunk_tokens,
                    threads=settings.torch_threads, metrics={"distilled": metrics})
    return Distilled(row, metrics["gate"], metrics, out_dir)
