"""The model registry's state changes: promote, rollback, retire, traffic. Each is one transaction, so
every question is routed to a version that exists and is fully embedded; nothing is dropped."""

from __future__ import annotations

from typing import Any

import psycopg

from pgsynapse.errors import PgsynapseError
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)


class RegistryError(PgsynapseError):
    """A registry change that is not allowed in the current state; the message says why."""


def _version(conn: psycopg.Connection, version: int) -> dict[str, Any]:
    row = conn.execute(q("version_by_id", "learning.sql"), {"version": version}).fetchone()
    if row is None:
        raise RegistryError(f"no model version {version}")
    return row


def promote(conn: psycopg.Connection, version: int) -> dict[str, Any]:
    """Make ``version`` active (100% of traffic); the old active stays embedded as a candidate at 0% for rollback."""
    with conn.transaction():
        conn.execute("LOCK TABLE pgsynapse.model_versions IN SHARE ROW EXCLUSIVE MODE")
        v = _version(conn, version)
        if v["status"] == "active":
            raise RegistryError(f"model version {version} is already active")
        if v["status"] != "candidate":
            raise RegistryError(f"model version {version} is {v['status']}: only a candidate can be promoted")
        if v["backfilled_at"] is None:
            raise RegistryError(f"model version {version} is still backfilling: wait until every chunk is embedded")
        old = [r["id"] for r in conn.execute(q("demote_active", "learning.sql"), {"version": version})]
        conn.execute(q("activate", "learning.sql"), {"version": version})
        conn.execute("SELECT pg_notify('pgsynapse_models', json_build_object('active', %s::int)::text)", (version,))
    log.info("model_promoted", version=version, previous=old)
    return {"active": version, "previous": old[0] if old else None}


def rollback(conn: psycopg.Connection) -> dict[str, Any]:
    """Re-activate the version that was active before the current one."""
    row = conn.execute(q("previous_active", "learning.sql")).fetchone()
    if row is None:
        raise RegistryError("nothing to roll back to: no previously active version is still embedded")
    result = promote(conn, row["id"])
    log.info("model_rolled_back", active=row["id"], previous=result["previous"])
    return result


def set_traffic(conn: psycopg.Connection, version: int, percent: float) -> None:
    if not 0 <= percent <= 100:
        raise RegistryError(f"traffic must be between 0 and 100, got {percent}")
    with conn.transaction():
        v = _version(conn, version)
        if v["status"] != "candidate":
            raise RegistryError(f"model version {version} is {v['status']}: only a candidate gets a traffic share")
        conn.execute(q("set_traffic", "learning.sql"), {"version": version, "traffic": percent})
    log.info("model_traffic_set", version=version, traffic_percent=percent)


def retire(conn: psycopg.Connection, version: int) -> int:
    """Retire a non-active version and delete its embeddings and index (data retention)."""
    with conn.transaction():
        v = _version(conn, version)
        if v["status"] == "active":
            raise RegistryError(f"model version {version} is active: promote another version first")
        if v["status"] == "retired":
            return 0
        conn.execute(q("retire", "learning.sql"), {"version": version})
        deleted = conn.execute(q("delete_version_embeddings", "learning.sql"), {"version": version}).rowcount
        conn.execute(f"DROP INDEX IF EXISTS pgsynapse.embeddings_hnsw_v{int(version)}")
    log.info("model_retired", version=version, embeddings_deleted=deleted)
    return deleted
