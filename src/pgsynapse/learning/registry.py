"""The model registry's state changes: promote, rollback, reject, retire, traffic. Each is one transaction, so
every question is routed to a version that exists and is fully embedded; nothing is dropped. Each writes its row
in ``pgsynapse.model_events`` in the same transaction (``actor``: ``cli`` for a person, a worker's id for the
worker's A/B decisions in :mod:`pgsynapse.learning.autopromote`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgsynapse.errors import RegistryError
from pgsynapse.logs import get_logger
from pgsynapse.models import default_model_path, probe_model
from pgsynapse.queries import q
from pgsynapse.ranking.rescore import version_of
from pgsynapse.table_locks import lock_table

log = get_logger(__name__)

__all__ = ["RegistryError", "add_model", "promote", "reject", "record_event", "retire", "rollback", "set_traffic"]


def _version(conn: psycopg.Connection, version: int) -> dict[str, Any]:
    row = conn.execute(q("version_by_id", "learning.sql"), {"version": version}).fetchone()
    if row is None:
        raise RegistryError(f"no model version {version}")
    return row


def record_event(conn: psycopg.Connection, version: int, event: str, *, reason: str = "",
                 figures: dict[str, Any] | None = None, actor: str = "cli") -> None:
    """One row of the registry's history (``pgsynapse.model_events``), in the caller's transaction."""
    conn.execute(q("insert_model_event", "learning.sql"), {"version": version, "event": event, "reason": reason,
                                                           "figures": Jsonb(figures or {}), "actor": actor})


def promote(conn: psycopg.Connection, version: int, *, event: str = "promoted", reason: str = "manual",
            figures: dict[str, Any] | None = None, actor: str = "cli") -> dict[str, Any]:
    """Make ``version`` active (100% of traffic); the old active stays embedded as a candidate at 0% for rollback.
    A version exported at registration is already on its serving runtime: nothing is switched (issue 23)."""
    with conn.transaction():
        lock_table(conn, q("lock_model_versions", "learning.sql"), "pgsynapse.model_versions")
        v = _version(conn, version)
        if v["status"] == "active":
            raise RegistryError(f"model version {version} is already active")
        if v["status"] != "candidate":
            raise RegistryError(f"model version {version} is {v['status']}: only a candidate can be promoted")
        if v["backfilled_at"] is None:
            raise RegistryError(f"model version {version} is still backfilling: wait until every chunk is embedded")
        if v["runtime_pending"]:
            raise RegistryError(f"model version {version} is waiting for its export to the serving runtime (a running "
                                "worker does it before the version gets traffic): promote it once that is done")
        old = [r["id"] for r in conn.execute(q("demote_active", "learning.sql"), {"version": version})]
        conn.execute(q("activate", "learning.sql"), {"version": version})
        record_event(conn, version, event, reason=reason, actor=actor,
                     figures={"previous": old[0] if old else None, "runtime": v["runtime"], **(figures or {})})
        conn.execute(q("notify_models", "learning.sql"), {"change": "active", "version": version})
    log.info("model_promoted", version=version, previous=old, runtime=v["runtime"], recorded_as=event)
    return {"active": version, "previous": old[0] if old else None, "runtime": v["runtime"]}


def rollback(conn: psycopg.Connection) -> dict[str, Any]:
    """Re-activate the version that was active before the current one."""
    row = conn.execute(q("previous_active", "learning.sql")).fetchone()
    if row is None:
        raise RegistryError("nothing to roll back to: no previously active version is still embedded")
    with conn.transaction():
        result = promote(conn, row["id"], reason="manual rollback")
        if result["previous"] is not None:
            record_event(conn, result["previous"], "rolled_back", reason="manual", figures={"active": row["id"]})
    log.info("model_rolled_back", active=row["id"], previous=result["previous"])
    return result


def reject(conn: psycopg.Connection, version: int, *, event: str = "rejected", reason: str = "",
           figures: dict[str, Any] | None = None, actor: str = "cli") -> None:
    """Take a candidate out of its A/B test for good: status ``rejected``, traffic 0 (its vectors stay until
    ``retire``). The worker's auto-rollback."""
    with conn.transaction():
        if conn.execute(q("reject_candidate", "learning.sql"), {"version": version}).fetchone() is None:
            raise RegistryError(f"model version {version} is {_version(conn, version)['status']}: only a candidate "
                                "can be rejected")
        record_event(conn, version, event, reason=reason, figures=figures, actor=actor)
        conn.execute(q("notify_models", "learning.sql"), {"change": "rejected", "version": version})
    log.info("model_rejected", version=version, recorded_as=event)


def set_traffic(conn: psycopg.Connection, version: int, percent: float) -> None:
    if not 0 <= percent <= 100:
        raise RegistryError(f"traffic must be between 0 and 100, got {percent}")
    with conn.transaction():
        v = _version(conn, version)
        if v["status"] != "candidate":
            raise RegistryError(f"model version {version} is {v['status']}: only a candidate gets a traffic share")
        others = conn.execute(q("other_candidates_traffic", "learning.sql"), {"version": version}).fetchall()
        held = sum(o["traffic_percent"] for o in others)
        if held + percent > 100:  # the routing would give it less than said, without a word
            holders = ", ".join(f"v{o['id']} has {o['traffic_percent']:g}%" for o in others)
            raise RegistryError(
                f"model version {version} at {percent:g}% would take the candidates' traffic to {held + percent:g}%: "
                f"at most {100 - held:g}% is left ({holders})")
        conn.execute(q("set_traffic", "learning.sql"), {"version": version, "traffic": percent})
        record_event(conn, version, "traffic_set", reason="manual",
                     figures={"traffic_percent": percent, "previous": float(v["traffic_percent"])})
    log.info("model_traffic_set", version=version, traffic_percent=percent)


def retire(conn: psycopg.Connection, version: int) -> int:
    """Retire a non-active version and delete its embeddings and index (data retention)."""
    with conn.transaction():
        v = _version(conn, version)
        if v["status"] == "active":
            raise RegistryError(f"model version {version} is active: promote another version first")
        if v["status"] == "retired":  # said "retired, 0 embeddings deleted" again; refused as promote's "already"
            raise RegistryError(f"model version {version} is already retired: nothing to do")
        for r in conn.execute(q("version_rankers", "learning.sql")):
            if version_of(r["path"]) == version:  # its vectors would go from under the ranker
                raise RegistryError(f"model version {version} rescores the candidates as ranker {r['id']} "
                                    f"({r['status']}): retire that ranker first (pgsynapse ranker retire {r['id']})")
        # counted first: the UPDATE's trigger drops the version's partition (migration 0019), vectors and index
        deleted = conn.execute(q("count_version_embeddings", "learning.sql"), {"version": version}).fetchone()["n"]
        conn.execute(q("retire", "learning.sql"), {"version": version})
        record_event(conn, version, "retired", reason="manual",
                     figures={"previous_status": v["status"], "embeddings_deleted": deleted})
    log.info("model_retired", version=version, embeddings_deleted=deleted)
    return deleted


def version_at(conn: psycopg.Connection, path: str | Path, *, configured: str | None = None) -> dict[str, Any] | None:
    """The version (not retired) registered with the model at ``path`` (``id``, ``status``), if any: the path as
    :func:`~pgsynapse.models.probe_model` registers it, user and symlinks resolved; the version it was added as even
    once exported elsewhere, and a version serving the default model (``configured``, the ``model_path`` setting,
    else the packaged one) when ``path`` is that model."""
    path = Path(path).expanduser().resolve()
    default = (Path(configured).expanduser() if configured else default_model_path()).resolve()
    return conn.execute(q("version_by_path", "learning.sql"),
                        {"path": str(path), "default": path == default}).fetchone()


def add_model(conn: psycopg.Connection, path: str | Path, *, name: str | None = None, traffic: float = 0.0,
              serving_runtime: str = "onnx-int8", chunk_tokens: int = 256, threads: int = 0,
              metrics: dict[str, Any] | None = None, configured: str | None = None) -> dict[str, Any]:
    """Register the local model at ``path`` (sentence-transformers, or an exported ONNX directory) as a candidate
    version of whatever dimension it has, and queue its backfill: every chunk gets its vector, a throttled batch
    at a time, while new documents are embedded for it as for every serving version. It serves no search until the
    backfill is done, then gets ``traffic`` percent of sessions (0: until ``pgsynapse traffic``). A torch model
    waits for its export to ``serving_runtime`` before it gets traffic, as a retrained one does. The model of a
    version already registered is refused (``configured``: the ``model_path`` setting, the default model's).

    Returns the new row with ``warnings``: what the caller should tell the user."""
    if not 0 <= traffic <= 100:
        raise RegistryError(f"traffic must be between 0 and 100, got {traffic}")
    embedder = probe_model(path, threads=threads)  # ModelError: not a model, or not an embedding model
    spec = embedder.spec
    warnings = []
    if embedder.max_seq_length < chunk_tokens:
        warnings.append(f"the model reads {embedder.max_seq_length} tokens but chunks hold up to chunk_tokens="
                        f"{chunk_tokens}: the tail of a long chunk is not in its vector (chunks are shared by every "
                        "version: docs/architecture.md)")
    with conn.transaction():
        lock_table(conn, q("lock_model_versions", "learning.sql"), "pgsynapse.model_versions")
        same = version_at(conn, spec.path, configured=configured)
        if same is not None:
            raise RegistryError(f"{spec.path} is already model version {same['id']} ({same['status']}): retire it "
                                "first to add it again")
        pending = spec.runtime == "torch" and serving_runtime != "torch"
        row = conn.execute(q("add_version", "learning.sql"), {
            "name": name or spec.path.name, "path": str(spec.path), "runtime": spec.runtime, "dim": spec.dim,
            "pending": pending, "metrics": Jsonb({"added_from": str(spec.path),
                                                  "max_seq_length": embedder.max_seq_length, **(metrics or {})})}
        ).fetchone()
        version = row["id"]
        conn.execute(q("ensure_embedding_index", "learning.sql"), {"version": version})
        conn.execute(q("enqueue_backfill", "learning.sql"), {
            "version": version, "payload": Jsonb({"traffic_percent": traffic}), "delay": 0})
        record_event(conn, version, "added", reason="manual", figures={
            "path": str(spec.path), "dim": spec.dim, "runtime": spec.runtime, "traffic_percent": traffic})
    log.info("model_added", version=version, path=str(spec.path), dim=spec.dim, runtime=spec.runtime,
             max_seq_length=embedder.max_seq_length, runtime_pending=pending, traffic_percent=traffic)
    return {**row, "warnings": warnings}
