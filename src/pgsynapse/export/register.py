"""Registering an accepted artifact, ``pgsynapse model export``, and the ``runtime`` setting: moving a version
from torch to the fast runtime once (at worker start, or for a candidate before its A/B traffic), and building
a switched version's artifact again on a host that lacks it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgsynapse.artifacts import local_artifact, models_root, remove_artifact_dir
from pgsynapse.config import DEFAULT_SAMPLE_CHUNKS
from pgsynapse.db import (EXPORT_COMMAND_APPLICATION_NAME, EXPORT_LOCK, NO_PREPARE, WORKER_APPLICATION_NAME, Database,
                          export_command_name, session_url, take_xact_lock)
from pgsynapse.errors import ModelError, RegistryError, SourceModelError
from pgsynapse.export.agreement import DEFAULT_THRESHOLD, ExportReport, export_and_check
from pgsynapse.export.quantize import SCHEMES, scheme_error
from pgsynapse.export.sample import check_sample_files
from pgsynapse.logs import get_logger
from pgsynapse.models import ONNX_FILES, ONNX_META, ModelSpec, default_model_path, resolve_model_path
from pgsynapse.queries import q

log = get_logger(__name__)


def register(conn: Any, report: ExportReport, source_row: dict[str, Any], *, switch: bool = False) -> int:
    """Record an accepted artifact.

    ``switch=False``: a new ``model_versions`` row (status ``candidate``, traffic 0, base = the source version)
    whose metrics hold the agreement figures, and its first ``backfill`` step; the worker then embeds new chunks
    with it too, side by side, and backfills the others.
    ``switch=True``: the source version itself moves to the new runtime (its vectors are interchangeable,
    agreement passed), so nothing is re-embedded; the previous runtime is kept in its metrics.
    """
    metrics = {"export": report.as_dict()}
    if switch:
        conn.execute(
            q("switch_runtime", "export.sql"),
            {"runtime": report.runtime, "path": report.artifact_path, "metrics": json.dumps(metrics), "id": source_row["id"]},
        )
        report.version_id = int(source_row["id"])
        return report.version_id
    with conn.transaction():
        row = conn.execute(
            q("register_export", "export.sql"),
            {"name": f"{source_row['name']} [{report.runtime}]", "base": source_row["id"], "path": report.artifact_path,
             "runtime": report.runtime, "dim": source_row["dim"], "metrics": json.dumps(metrics)},
        ).fetchone()
        version_id = int(row["id"] if isinstance(row, dict) else row[0])
        conn.execute(q("ensure_embedding_index", "learning.sql"), {"version": version_id})
        # its vectors of the chunks already stored, as `model add` backfills a version: without them it never
        # serves (traffic, promote and search --version wait for its backfill)
        conn.execute(q("enqueue_backfill", "learning.sql"), {
            "version": version_id, "payload": Jsonb({"traffic_percent": 0}), "delay": 0})
    report.version_id = version_id
    return version_id


# -- the command ------------------------------------------------------------------------------------
def run_export(
    settings: Any,
    runtime: str,
    *,
    version: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    corpus: Path | None = None,
    questions: list[Path] | None = None,
    n_chunks: int = DEFAULT_SAMPLE_CHUNKS,
    switch: bool = False,
    out_dir: Path | None = None,
    scheme: str | None = None,
    waiting: Callable[[], None] | None = None,
) -> ExportReport:
    """``pgsynapse model export``: build, check, and register (or refuse with the figures). ``switch``: under the
    export lock a worker takes to export a version at its start (:func:`export_lock`), which it waits for (calling
    ``waiting()`` first when another holds it): the version is read once it holds it, and never exported by both."""
    with Database(settings) as db, (export_lock(settings, db.url, waiting, EXPORT_COMMAND_APPLICATION_NAME) if switch
                                    else db.connect(autocommit=True)) as conn:
        row = conn.execute(q("export_source", "export.sql"), {"version": version}).fetchone()
        if switch and row is not None:  # `pgsynapse status` says which version it exports (db.runtime_export)
            conn.execute(q("export_name", "export.sql"), {"name": export_command_name(row["id"])})
        # a version it cannot take is a command refused (exit 1), as search --version's, promote's and traffic's
        if row is None:
            raise RegistryError("no active model version" if version is None else
                                f"no model version {version}: `pgsynapse model list` shows the versions")
        if row["status"] == "rejected":  # and a gate's reject has no weights left (handlers/retrain.py)
            raise RegistryError(f"model version {version} is rejected: export the active version or a candidate (a "
                                "new version from a rejected one would bypass the gate that rejected it)")
        if row["status"] == "retired":  # the worker deletes the weights of a retired model it made (housekeeping)
            raise RegistryError(f"model version {version} is retired: its vectors are deleted, and the weights of a "
                                "model pgsynapse made with them; export the active version or a candidate")
        source = ModelSpec(row["id"], row["name"], source_model_path(row, settings.model_path, settings.data_dir),
                           "torch", row["dim"])
        if out_dir is not None and out_dir.exists() and any(out_dir.iterdir()):
            raise ModelError(f"{out_dir} is not empty: export into a new directory (an artifact there may be served)")
        check_sample_files(corpus, questions)  # before the model loads (seconds) and the directory is made
        out = out_dir or new_artifact_dir(settings.data_dir, row["id"], runtime)
        try:
            report = export_and_check(source, out, runtime, threshold=threshold, corpus=corpus, questions=questions,
                                      n_chunks=n_chunks, threads=settings.onnx_threads or settings.torch_threads,
                                      scheme=scheme)
        except BaseException:  # a failed or interrupted export leaves no partial artifact behind
            shutil.rmtree(out, ignore_errors=True)
            raise
        if report.accepted:
            with conn.transaction():
                register(conn, report, row, switch=switch)
                if switch:  # recorded as a worker's own switch is: a host without the artifact builds it again
                    record = {"requested": runtime, "runtime": runtime, "tried": [_tried(runtime, report)],
                              "sample_chunks": n_chunks, "threshold": threshold,
                              "sha256": _sha256(out / ONNX_FILES[runtime]), "seconds": report.seconds}
                    conn.execute(q("record_export", "export.sql"), {"record": json.dumps(record), "version": row["id"]})
                    _settled(conn, row, record, "cli")
        else:
            shutil.rmtree(out, ignore_errors=True)
    return report


def new_artifact_dir(data_dir: str | Path, version_id: int, runtime: str) -> Path:
    """A new, empty ``DATA_DIR/models/vV-RUNTIME-TIMESTAMP`` for an export. Never an existing directory: exporting
    a version again must not delete the artifact workers serve, nor one of another database sharing the data dir."""
    base = Path(data_dir) / "models"
    base.mkdir(parents=True, exist_ok=True)
    stem = f"v{version_id}-{runtime}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1000):
        out = base / (f"{stem}-{n}" if n else stem)
        try:
            out.mkdir()
        except FileExistsError:
            continue
        return out
    raise ModelError(f"cannot create a new artifact directory under {base}")


# -- the `runtime` setting: the active version on the fast runtime, once (under EXPORT_LOCK) -----------------


class ExportAbandoned(ModelError):
    """The export was abandoned (its worker is stopping): it records nothing."""


class Abandon:
    """How a stopping worker abandons an export that runs in a thread of its own (it may take minutes): :meth:`now`,
    from any thread, removes the artifact directories the export made and makes it record nothing, so the version
    stays as it was (a candidate still waiting for its export: the next start does it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held by the export while it records its outcome: all of it, or nothing
        self.abandoned = False
        self._dirs: list[Path] = []

    def new_dir(self, data_dir: str | Path, version_id: int, runtime: str) -> Path:
        with self.lock:
            if self.abandoned:
                raise ExportAbandoned(f"the export of model version {version_id} was abandoned: its worker stopped")
            out = new_artifact_dir(data_dir, version_id, runtime)
            self._dirs.append(out)
            return out

    def kept(self) -> None:
        """The export's directory is registered: it is served now, never removed."""
        self._dirs = []

    def now(self) -> list[Path]:
        """Abandon the export; returns the directories removed (a partial artifact)."""
        with self.lock:
            self.abandoned = True
            dirs, self._dirs = self._dirs, []
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        return dirs


def source_model_path(row: dict[str, Any], configured: str | None, data_dir: str | Path | None = None) -> Path:
    """The sentence-transformers directory of a version: its own for torch, the one it was exported from
    for an ONNX runtime (training and re-export need the torch weights). A recorded path that is not on this host
    is looked for under ``data_dir``'s models folder (:func:`~pgsynapse.artifacts.local_artifact`)."""
    if row.get("runtime", "torch") == "torch":
        return resolve_model_path(row.get("artifact_path"), configured, data_dir=data_dir)
    meta_path = local_artifact(row["artifact_path"], data_dir) / ONNX_META
    try:
        source = local_artifact(json.loads(meta_path.read_text())["source"], data_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot find the source model of version {row['id']}: {meta_path} unreadable ({exc})") from exc
    if source.exists():
        return source
    packaged = default_model_path()
    if source.parts[-2:] == packaged.parts[-2:]:
        # the packaged default model, recorded where it was installed at export time: that virtualenv is gone (made
        # anew elsewhere, another Python version), the same package is installed here
        return packaged
    raise ModelError(f"the torch weights of model version {row['id']} are gone: {source} (recorded in {meta_path}); "
                     "retraining, distilling, training a ranker from it or exporting it again need them")


def optimise_active_version(settings: Any, url: str, export: bool = True) -> ExportReport | None:
    """Move the active version from torch to ``settings.runtime`` (``onnx-int8`` by default), once.

    Runs at worker start, and for a version promoted while a worker runs that was not exported at registration.
    See :func:`optimise_version`."""
    return optimise_version(settings, url, export=export)


def optimise_version(settings: Any, url: str, version: int | None = None, *, actor: str = "worker",
                     export: bool = True, abandon: Abandon | None = None, at_start: bool = False
                     ) -> ExportReport | None:
    """Move a version (the active one when ``version`` is None) from torch to ``settings.runtime``, once.

    The first worker exports the model, checks its agreement on the shipped docs (:func:`export_and_check`) and
    switches the version (its vectors stay: agreement passed). Other workers wait on an advisory lock meanwhile and
    find the switch done. ``onnx-int8`` refused for agreement falls back to ``onnx`` (fp32, the same vectors as
    torch). The outcome, refusal or error included, is kept in the version's metrics (``runtime_export``) and in
    ``model_events`` so it is tried once per version and runtime; an error leaves the version on torch and the
    worker goes on. A worker on a host without the switched version's artifact builds it again with the same name
    in its own ``DATA_DIR/models`` (:func:`rebuild_artifact`), whatever its own ``runtime``.

    Either way the version's ``runtime_pending`` is cleared: a candidate the retrain job registered gets its A/B
    traffic only now, on the runtime that will serve it once promoted (or on torch, with the reason recorded).

    ``export=False`` (the worker of a one-shot command): a missing artifact is still rebuilt (it is needed to
    serve), but a version on torch is left as it is, waiting for a worker that exports it. ``abandon``: how a
    stopping worker abandons the export (:class:`Abandon`); an abandoned export records nothing. ``at_start`` (the
    worker's start): a source model that does not load, or not at its version's dimension, is raised and recorded
    nowhere, as the start stops on it; recorded, the export was never tried again once the model path was fixed.
    """
    def waiting() -> None:  # minutes on a small host: a worker silent meanwhile looks hung; a one-shot command
        (log.info if export else log.warning)(  # logs warnings only
            "runtime_export_waiting", note="another worker (or `pgsynapse model export --switch`) is exporting a "
            "model version to its runtime (minutes on a small host): waiting for it to finish, then starting")

    with export_lock(settings, url, waiting, WORKER_APPLICATION_NAME) as conn:
        row = conn.execute(q("export_source", "export.sql"), {"version": version}).fetchone()
        if row is None or row["status"] not in ("active", "candidate"):
            return None
        tried = switch_record(row)
        if row["runtime"] != "torch":
            report = None
            here = local_artifact(row["artifact_path"], settings.data_dir)
            if tried.get("runtime") == row["runtime"] and not (here / ONNX_FILES[row["runtime"]]).exists():
                report = rebuild_artifact(settings, row)
            _settled(conn, row, None, actor)
            return report
        if not export:
            return None
        if settings.runtime == "torch" or tried.get("requested") == settings.runtime:
            _settled(conn, row, None, actor)
            return None
        log.info("runtime_export_started", version=row["id"], status=row["status"], runtime=settings.runtime,
                 note="once per model version: export, agreement check, switch")
        started = time.perf_counter()
        record: dict[str, Any] = {"requested": settings.runtime, "tried": []}
        report = None
        out: Path | None = None
        try:
            source = ModelSpec(row["id"], row["name"], source_model_path(row, settings.model_path, settings.data_dir),
                               "torch", row["dim"])
            for runtime in [settings.runtime, *(["onnx"] if settings.runtime == "onnx-int8" else [])]:
                out = (abandon.new_dir if abandon else new_artifact_dir)(settings.data_dir, row["id"], runtime)
                report = export_and_check(source, out, runtime, n_chunks=settings.export_sample_chunks,
                                          threads=settings.onnx_threads or settings.torch_threads)
                record["tried"].append(_tried(runtime, report))
                if report.accepted:
                    record["sample_chunks"] = settings.export_sample_chunks
                    record["sha256"] = _sha256(out / ONNX_FILES[runtime])
                    break
                shutil.rmtree(out, ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - any failure leaves torch serving; the reason is kept and logged
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)  # the failed attempt's partial artifact
            if at_start and isinstance(exc, SourceModelError):
                raise  # the start stops on it, recording nothing: the next start, its model fixed, exports
            record["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            report = None
            if not (abandon and abandon.abandoned):  # else its files went from under it: not a failure
                log.warning("runtime_export_failed", version=row["id"], runtime=settings.runtime, error=record["error"])
        record["seconds"] = round(time.perf_counter() - started, 1)
        with abandon.lock if abandon else contextlib.nullcontext(), conn.transaction():  # a savepoint
            if abandon and abandon.abandoned:  # its worker stopped meanwhile: the version stays waiting
                if out is not None:
                    shutil.rmtree(out, ignore_errors=True)
                return None
            if report is not None and report.accepted:
                register(conn, report, row, switch=True)
                record["runtime"] = report.runtime
                log.info("runtime_switched", version=row["id"], runtime=report.runtime,
                         scheme=report.options.get("scheme"), overlap_at_10=report.agreement.overlap_at_10,
                         seconds=record["seconds"])
            elif "error" not in record:
                log.warning("runtime_export_refused", version=row["id"], runtime=settings.runtime, tried=record["tried"])
            conn.execute(q("record_export", "export.sql"), {"record": json.dumps(record), "version": row["id"]})
            _settled(conn, row, record, actor)
            if abandon:
                abandon.kept()
        return report if report is not None and report.accepted else None


@contextlib.contextmanager
def export_lock(settings: Any, url: str, waiting: Callable[[], None] | None = None,
                application_name: str = WORKER_APPLICATION_NAME) -> Iterator[psycopg.Connection]:
    """A connection whose transaction holds EXPORT_LOCK until the block ends: the export of a version to a runtime
    by a worker at its start (:func:`optimise_version`) or by ``model export --switch``, one at a time, each reading
    the version once it holds the lock. ``waiting()`` first when another holds it (its export: minutes), which is
    waited for in slices of a second (:func:`~pgsynapse.db.take_xact_lock`). ``application_name`` names the holder:
    a worker's (WORKER_APPLICATION_NAME) or the command's (EXPORT_COMMAND_APPLICATION_NAME), which `pgsynapse status`,
    `search` and `ingest --follow` tell apart (:func:`~pgsynapse.db.runtime_export`).

    A transaction lock, held for the whole export in one transaction (it writes only at its end): a transaction
    pooler (no listen_url) keeps a transaction on one server connection, and the lock goes with the transaction;
    a session lock stayed held by the pooled server session once this client had gone, and the next start waited.
    Its statements go by the simple query protocol (ClientCursor): the extended protocol's unnamed portal of the
    last SELECT outlived it and kept its snapshot while the model was computed, so no VACUUM of the database could
    remove a row deleted meanwhile. The transaction takes no xid until its end, and keeps no snapshot in between."""
    with psycopg.connect(session_url(settings, url), autocommit=True, row_factory=dict_row,
                         cursor_factory=psycopg.ClientCursor, application_name=application_name, **NO_PREPARE
                         ) as conn, conn.transaction():
        conn.execute(q("export_idle_unbounded", "export.sql"))
        if not conn.execute(q("export_try_lock", "export.sql"), {"lock": EXPORT_LOCK}).fetchone()["locked"]:
            if waiting is not None:  # another holds it: its export (minutes)
                waiting()
            take_xact_lock(conn, q("export_lock", "export.sql"), {"lock": EXPORT_LOCK})
        yield conn


def _settled(conn: Any, row: dict[str, Any], record: dict[str, Any] | None, actor: str) -> None:
    """Clear the version's ``runtime_pending`` (it may get A/B traffic now) and, after an export attempt, write
    its outcome to ``model_events``; ``pgsynapse_models`` hears ``{"runtime": id}`` on commit."""
    if record is not None:
        event = ("runtime_switched" if "runtime" in record else
                 "runtime_export_failed" if "error" in record else "runtime_export_refused")
        reason = (f"exported to {record['runtime']}" if "runtime" in record else record.get("error")
                  or f"agreement below the threshold for every runtime tried; stays on {row['runtime']}")
        conn.execute(q("insert_model_event", "learning.sql"), {"version": row["id"], "event": event, "reason": reason,
                                                               "figures": Jsonb(record), "actor": actor})
    if row.get("runtime_pending") or record is not None:
        conn.execute(q("runtime_settled", "export.sql"), {"version": row["id"]})
        conn.execute(q("notify_models", "learning.sql"), {"change": "runtime", "version": row["id"]})
        log.info("model_runtime_settled", version=row["id"], status=row["status"],
                 runtime=(record or {}).get("runtime", row["runtime"]))


def _tried(runtime: str, report: ExportReport) -> dict[str, Any]:
    """One export attempt as a ``runtime_export`` record lists it (``tried``): the worker's, and `model export
    --switch`'s."""
    return {"runtime": runtime, "accepted": report.accepted, "overlap_at_10": report.agreement.overlap_at_10,
            "scheme": report.options.get("scheme")}


def switch_record(row: dict[str, Any]) -> dict[str, Any]:
    """The version's ``runtime_export`` record (empty when it has none). A version ``model export --switch`` moved
    before that command wrote one has only the export's report (``export``) of its artifact: the record is made
    from it, so a host without the artifact builds it again."""
    metrics = row.get("metrics") or {}
    record = metrics.get("runtime_export") or {}
    report = metrics.get("export") or {}
    if (record.get("runtime") == row["runtime"] or not report.get("accepted") or report.get("runtime") != row["runtime"]
            or report.get("artifact_path") != row["artifact_path"]):
        return record
    return {"requested": row["runtime"], "runtime": row["runtime"], "sample_chunks": report["agreement"]["n_chunks"],
            "threshold": report["threshold"], "tried": [{
                "runtime": row["runtime"], "accepted": True, "overlap_at_10": report["agreement"]["overlap_at_10"],
                "scheme": (report.get("options") or {}).get("scheme")}]}


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def rebuild_artifact(settings: Any, row: dict[str, Any]) -> ExportReport:
    """The artifact of a version switched at start-up is missing on this host (another host exported it, or the
    data dir moved): build it again from this host's copy of the source model, at the recorded path, or where that
    path lies in a models folder that is not on this host, at the same name in this host's ``DATA_DIR/models``
    (:func:`~pgsynapse.artifacts.local_artifact`; nothing is created outside it), with the recorded scheme and
    calibration sample, and check its agreement again. The same libraries give the same bytes (``sha256``
    logged); different ones give an artifact that still had to pass the gate. A refusal stops the worker
    with the figures rather than serve vectors that do not match the index."""
    record = switch_record(row)
    accepted = next(t for t in reversed(record["tried"]) if t["accepted"])
    out = local_artifact(row["artifact_path"], settings.data_dir, to_build=True)
    scheme = accepted.get("scheme")
    if scheme is not None and scheme not in SCHEMES:  # recorded by an older release: checked before any deletion
        raise ModelError(f"model version {row['id']}: its {row['runtime']} artifact {out} is missing on this host and "
                         f"cannot be rebuilt: {scheme_error(scheme)}; copy the artifact from the host that built it "
                         "(or share DATA_DIR/models between hosts)")
    # a rebuild cut short (the graph is written last by quantisation) is cleared first: only in DATA_DIR/models
    if (out.exists() or out.is_symlink()) and not remove_artifact_dir(out, settings.data_dir):
        raise ModelError(f"model version {row['id']}: its artifact path {out} exists without "
                         f"{ONNX_FILES[row['runtime']]} and is not inside {models_root(settings.data_dir)}; "
                         "refusing to delete it to rebuild there (fix model_versions.artifact_path)")
    log.info("runtime_artifact_rebuild_started", version=row["id"], runtime=row["runtime"], path=str(out),
             recorded=row["artifact_path"], reason="the version's artifact is missing on this host")
    # this host's copy of the torch model the version was switched from
    source_path = resolve_model_path(row["metrics"].get("previous_artifact_path"), settings.model_path,
                                     data_dir=settings.data_dir)
    source = ModelSpec(row["id"], row["name"], source_path, "torch", row["dim"])
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        raise ModelError(f"model version {row['id']}: its artifact {out} is missing here and cannot be rebuilt there "
                         f"({exc}); share DATA_DIR/models between hosts or run with PGSYNAPSE_RUNTIME=torch before "
                         "the first start") from exc
    report = export_and_check(source, out, row["runtime"], n_chunks=record.get("sample_chunks", DEFAULT_SAMPLE_CHUNKS),
                              threads=settings.onnx_threads or settings.torch_threads, scheme=accepted.get("scheme"),
                              threshold=record.get("threshold", DEFAULT_THRESHOLD))  # `model export --switch`'s
    if not report.accepted:
        remove_artifact_dir(out, settings.data_dir)
        raise ModelError(f"model version {row['id']}: the rebuilt {row['runtime']} artifact has top-10 agreement "
                         f"{report.agreement.overlap_at_10:.4f} with the source model here, below {report.threshold}; "
                         "its vectors would not match the index")
    digest = _sha256(out / ONNX_FILES[row["runtime"]])
    log.info("runtime_artifact_rebuilt", version=row["id"], runtime=row["runtime"], path=str(out),
             identical=digest == record.get("sha256"), overlap_at_10=report.agreement.overlap_at_10,
             seconds=report.seconds)
    return report
