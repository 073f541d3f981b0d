"""``pgsynapse ranker train``: train a ranker in its own process (ranking/train.py), judge it by the gate
(learning/gate.py's verdict on its held-out and canary scores) and register it in ``pgsynapse.ranker_models``:
a candidate with ``ranker_traffic_percent`` of the sessions when it passed, ``rejected`` when it did not (a
``force``d one is a candidate at 0 %, for a person to look at)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pgsynapse.artifacts import local_artifact, new_run_dir
from pgsynapse.config import Settings
from pgsynapse.db import child_url, connect
from pgsynapse.errors import ConfigError, DatabaseError, InputError, ModelError
from pgsynapse.export import source_model_path
from pgsynapse.learning import NOTHING_TO_LEARN
from pgsynapse.learning.gate import verdict
from pgsynapse.learning.trainer_process import TrainingFailed, run_trainer
from pgsynapse.logs import get_logger
from pgsynapse.queries import q
from pgsynapse.ranking.registry import REGISTRY
from pgsynapse.ranking.rescore import check_teacher, version_of
from pgsynapse.ranking.scorer import check_ranker_dir

log = get_logger(__name__)

VERSION_FIELDS = ("id", "name", "runtime", "artifact_path", "dim")


@dataclass
class RankerSpec:
    url: str
    version: dict[str, Any]  # the serving embedding version's row: its stored vectors give the candidates
    model_path: str | None  # the settings' model_path (a version row without an artifact is that model)
    base_path: str  # the transformer weights the ranker starts from (the version's torch directory)
    out_dir: str
    active_ranker: dict[str, Any] | None = None  # the gate's baseline (None: the vector order; a teacher's: its version)
    data_dir: str | None = None  # where the rows' recorded paths are looked for when they are not on this host
    candidates: int = 20
    negatives: int = 7
    negatives_skip: int = 0  # the first other-page chunks left out of the negatives (may answer the question too)
    max_length: int = 256
    layers: int = 0  # transformer layers kept of the base's (0: all)
    epochs: int = 1
    lr: float = 3e-5
    head_lr: float = 1e-3  # the fresh one-logit head's
    cosine_scale: float = 20.0  # the first stage's cosine in the score (a residual ranker); 0: a plain cross-encoder
    batch_size: int = 4  # questions per step (each with its positive and negatives)
    synthetic_pairs: int = 600
    heldout_fraction: float = 0.2
    group_threshold: float = 0.85
    canary_size: int = 300
    budget_seconds: float = 1800.0
    export: bool = True
    seed: int = 0
    threads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def ranker_spec(settings: Settings, conn: psycopg.Connection, url: str, out_dir: Path, **overrides: Any) -> RankerSpec:
    """The trainer's spec: the active embedding version's vectors and weights, the active ranker as the baseline."""
    version = conn.execute(q("active_version")).fetchone()
    if version is None:
        raise DatabaseError("no active model version: run `pgsynapse migrate` and embed documents first")
    active = REGISTRY.active_model(conn)
    baseline = {k: active[k] for k in ("id", "name", "path", "runtime")} if active else None
    if baseline and baseline["runtime"] == "version":  # a teacher (ranking/rescore.py): its vectors give its order
        check_teacher(conn, baseline["path"])  # retired, rejected or backfilling: refused before the training
        teacher = conn.execute(q("version_by_id", "learning.sql"), {"version": version_of(baseline["path"])}).fetchone()
        baseline["version"] = {k: teacher[k] for k in VERSION_FIELDS}
    elif baseline:  # a cross-encoder: its files checked here, before a trainer starts and fails on them
        try:
            check_ranker_dir(local_artifact(baseline["path"], settings.data_dir), baseline["runtime"],
                             f"active ranker {baseline['id']}")
        except ModelError as exc:
            raise ModelError(f"{exc}: the gate compares a new ranker with the active one: restore its files, or "
                             "`pgsynapse ranker rollback` first") from None
    s = settings
    fields: dict[str, Any] = dict(
        url=child_url(url, settings), version={k: version[k] for k in VERSION_FIELDS}, model_path=s.model_path,
        base_path=str(source_model_path(version, s.model_path, s.data_dir)), out_dir=str(out_dir),
        data_dir=str(s.data_dir),
        active_ranker=baseline,
        candidates=s.rank_candidates, negatives=s.ranker_negatives, max_length=s.ranker_max_length,
        layers=s.ranker_layers, negatives_skip=s.ranker_negatives_skip,
        epochs=s.ranker_epochs, lr=s.ranker_lr, head_lr=s.ranker_head_lr, cosine_scale=s.ranker_cosine_scale,
        synthetic_pairs=s.ranker_synthetic_pairs,
        heldout_fraction=s.retrain_heldout_fraction, budget_seconds=s.ranker_budget_seconds,
        threads=s.torch_threads)
    fields.update(overrides)
    return RankerSpec(**fields)


def check_layers(spec: RankerSpec) -> None:
    """Raise :class:`ConfigError` when ``ranker_layers`` asks for more layers than the base model has, before a
    trainer starts and fails on it (a base whose config cannot be read: the trainer says what is wrong with it)."""
    if not spec.layers:
        return
    try:
        n = json.loads((Path(spec.base_path) / "config.json").read_text()).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(n, int) and spec.layers > n:
        raise ConfigError(f"ranker_layers = {spec.layers}: the ranker starts from {spec.base_path}, which has {n} "
                          f"transformer layers: set it to 1 to {n}, or 0 (all of them)")


def train_ranker(settings: Settings, *, url: str | None = None, force: bool = False, out_dir: Path | None = None,
                 **overrides: Any) -> dict[str, Any]:
    """Train, gate and register a ranker on the database at ``url`` (default: the settings'); returns its registry
    row plus ``gate`` (the verdict) and ``traffic_asked`` (the share it asked for: it got at most what the other
    candidates left)."""
    url = url or settings.database_url or ""
    with connect(url, autocommit=True, settings=settings) as conn:
        if not conn.execute(q("feedback_progress", "learning.sql")).fetchone()["examples"]:
            # forced or not: trained on corpus pairs alone, its gate has no hold-out and could only reject it
            raise InputError(f"{NOTHING_TO_LEARN}; nothing was trained")
        root = Path(settings.data_dir) / "models"
        spec = ranker_spec(settings, conn, url, out_dir or root, **overrides)
    check_layers(spec)
    # the run's own folder, made once it is sure to start: a run refused leaves nothing
    out = out_dir or new_run_dir(root, "ranker")
    spec.out_dir = str(out)
    log.info("ranker_training_started", base=spec.base_path, version=spec.version["id"], out=str(out),
             candidates=spec.candidates, baseline=spec.active_ranker["id"] if spec.active_ranker else "vector order")
    try:
        metrics = run_trainer("pgsynapse.ranking.train", asdict(spec), out, memory_mb=settings.retrain_memory_mb,
                              kill_after_seconds=2 * spec.budget_seconds + 600, default_event="ranker_progress",
                              budget_setting="ranker_budget_seconds")
    except TrainingFailed:
        if out_dir is None:
            with contextlib.suppress(OSError):
                out.rmdir()  # a run that failed before it wrote anything leaves no empty folder
        raise
    scores = metrics.pop("gate_scores")
    # the retrain's gate (docs/learning.md): its tolerance, confidence and resamples, the ranker's margin
    gate = verdict(scores["heldout"], scores["canary"], margin=settings.ranker_margin,
                   tolerance=settings.retrain_canary_tolerance, confidence=settings.retrain_gate_confidence,
                   samples=settings.retrain_bootstrap_samples, margin_setting="ranker_margin")
    metrics["gate"] = gate
    status, traffic = ("candidate", settings.ranker_traffic_percent) if gate["passed"] else (
        ("candidate", 0.0) if force else ("rejected", 0.0))
    with connect(url, autocommit=True, settings=settings) as conn:
        # the share is what the other candidates leave when it registers (under the registry's lock), not when it
        # started: a `ranker traffic` given while it trained cuts its share, never its registration
        row = REGISTRY.add_model(conn, out.name, str(out), metrics["runtime"], metrics=metrics, status=status,
                                 base_id=spec.active_ranker["id"] if spec.active_ranker else None,
                                 traffic=traffic, share_what_is_left=True)
    log.info("ranker_registered", ranker=row["id"], status=status, passed=gate["passed"], forced=force,
             runtime=metrics["runtime"], agreement=metrics.get("agreement"), delta=gate["delta"],
             traffic_percent=float(row["traffic_percent"]), traffic_asked=traffic,
             active=metrics["active"], candidate=metrics["candidate"], reasons=gate["reasons"])
    return {**row, "gate": gate, "traffic_asked": traffic}
