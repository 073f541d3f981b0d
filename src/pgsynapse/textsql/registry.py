"""The SQL model registry (``pgsynapse.sql_models``): list, add, promote, rollback, traffic, retire.

Sync functions on a psycopg connection (the CLI's ``pgsynapse sql-model ...`` commands, the benchmark, tests);
each change is one transaction under a table lock, so there is at most one active model and the candidates'
traffic never adds up to more than 100 %. Rows come back as dicts (whatever the connection's row factory).

Statuses (the same as ``model_versions``):

- ``candidate``: may get a traffic share (``set_traffic``) and be promoted;
- ``active``: serves every session not routed to a candidate (100 %); at most one. With no active row the worker
  uses the settings' model (``sql_model_path`` / ``sql_runtime``);
- ``retired``: out of service (replaced by a promotion, rolled back from, or retired by hand);
- ``rejected``: failed its gate (registered for the record); never serves unless added anew.

**Rollback** returns to the model the active one replaced when it was promoted (``replaced_id``, stamped by
:func:`promote`), and retires the active one. The model active again keeps its own ``replaced_id``, so rollbacks
walk back through the promotions one at a time (an undo, not a toggle: promote the rolled-back model again to
redo). When the active model replaced none (it was promoted while the settings' model served), rollback retires
it and the settings' model serves again. A rollback never returns to a rejected model.

Routing: :func:`routable_sql_models` gives the rows :func:`pgsynapse.learning.routing.choose_version` works on;
:func:`choose_sql_model` routes a session over them, the settings' model standing in for a missing active row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgsynapse.errors import RegistryError
from pgsynapse.learning.routing import choose_version
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)

FILE = "textsql_models.sql"
RUNTIMES = ("transformers", "llama-cpp", "openai")
STATUSES = ("candidate", "rejected", "active", "retired")


def _q(name: str) -> str:
    return q(name, FILE)


def _fetch(conn: psycopg.Connection, name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rows of a named query as dicts, whatever the connection's row factory."""
    cur = conn.execute(_q(name), params or {})
    cols = [d.name for d in cur.description or []]
    return [dict(r) if isinstance(r, dict) else dict(zip(cols, r)) for r in cur.fetchall()]


def get_model(conn: psycopg.Connection, model_id: int) -> dict[str, Any]:
    """The row of ``model_id``; :class:`RegistryError` when there is none."""
    rows = _fetch(conn, "sql_model_by_id", {"id": model_id})
    if not rows:
        raise RegistryError(f"no SQL model {model_id}")
    return rows[0]


def list_models(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every SQL model, in id order."""
    return _fetch(conn, "sql_models")


def active_sql_model(conn: psycopg.Connection) -> dict[str, Any] | None:
    """The active SQL model's row, or None (the settings' model serves)."""
    rows = _fetch(conn, "active_sql_model")
    return rows[0] if rows else None


def routable_sql_models(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """The active model and the candidates with traffic, in id order: the rows
    :func:`pgsynapse.learning.routing.choose_version` routes on."""
    return _fetch(conn, "routable_sql_models")


def choose_sql_model(rows: Sequence[dict[str, Any]], session: str) -> dict[str, Any] | None:
    """The row ``session`` is routed to (sticky: a stable hash of the session), or None for the settings' model,
    which takes the active model's place when no row is active."""
    if any(r["status"] == "active" for r in rows):
        return choose_version(rows, session)
    chosen = choose_version([*rows, {"id": None, "status": "active", "traffic_percent": 100}], session)
    return None if chosen["id"] is None else chosen


def _check_traffic(conn: psycopg.Connection, model_id: int | None, percent: float) -> None:
    if not 0 <= percent <= 100:
        raise RegistryError(f"traffic must be between 0 and 100 %, got {percent}")
    others = _fetch(conn, "candidate_traffic", {"id": model_id})[0]["total"]
    if others + percent > 100:
        raise RegistryError(f"the candidates' traffic would add up to {others + percent:g} % (the others have "
                            f"{others:g} %): at most 100 %")


def add_model(conn: psycopg.Connection, name: str, path: str, runtime: str, base_id: int | None = None,
              metrics: dict[str, Any] | None = None, status: str = "candidate", traffic: float = 0) -> dict[str, Any]:
    """Register a SQL model and return its row. ``status`` ``active`` adds it as a candidate and promotes it
    (the active model before it is retired); a traffic share is for candidates only."""
    if runtime not in RUNTIMES:
        raise RegistryError(f"unknown SQL model runtime {runtime!r} (one of {', '.join(RUNTIMES)})")
    if status not in STATUSES or status == "retired":
        raise RegistryError(f"a SQL model is added as candidate, rejected or active, not {status!r}")
    if traffic and status != "candidate":
        raise RegistryError(f"only a candidate gets a traffic share, not a {status} model")
    if not name or not path:
        raise RegistryError("a SQL model needs a name and a path")
    with conn.transaction():
        conn.execute(_q("lock_sql_models"))
        if base_id is not None:
            get_model(conn, base_id)
        _check_traffic(conn, None, traffic if status == "candidate" else 0)
        row = _fetch(conn, "add_sql_model", {
            "name": name, "base_id": base_id, "path": path, "runtime": runtime, "metrics": Jsonb(metrics or {}),
            "status": "candidate" if status == "active" else status, "traffic": traffic})[0]
        if status == "active":
            _activate(conn, row["id"])
            row = get_model(conn, row["id"])
    log.info("sql_model_added", model=row["id"], name=name, runtime=runtime, status=row["status"],
             traffic_percent=float(row["traffic_percent"]))
    return row


def _activate(conn: psycopg.Connection, model_id: int) -> int | None:
    """In the caller's transaction and lock: ``model_id`` active at 100 % (replacing the active one, which is
    retired); returns the replaced one's id."""
    old = [r["id"] for r in _fetch(conn, "retire_active_sql_model", {"id": model_id})]
    replaced = old[0] if old else None
    conn.execute(_q("promote_sql_model"), {"id": model_id, "replaced": replaced})
    return replaced


def promote(conn: psycopg.Connection, model_id: int) -> dict[str, Any]:
    """Make a candidate the active model (100 %); the active one becomes retired (rollback returns to it); the
    other candidates keep their traffic. Returns ``{"active": id, "previous": id or None}``."""
    with conn.transaction():
        conn.execute(_q("lock_sql_models"))
        m = get_model(conn, model_id)
        if m["status"] == "active":
            raise RegistryError(f"SQL model {model_id} is already active")
        if m["status"] != "candidate":
            raise RegistryError(f"SQL model {model_id} is {m['status']}: only a candidate can be promoted")
        previous = _activate(conn, model_id)
    log.info("sql_model_promoted", model=model_id, previous=previous)
    return {"active": model_id, "previous": previous}


def rollback(conn: psycopg.Connection) -> dict[str, Any]:
    """Return to the model the active one replaced (see the module's docstring). Returns ``{"active": id, or None
    when the settings' model serves again, "previous": the id rolled back from}``."""
    with conn.transaction():
        conn.execute(_q("lock_sql_models"))
        current = active_sql_model(conn)
        if current is None:
            raise RegistryError("nothing to roll back: no SQL model is active (the settings' model serves)")
        target = current["replaced_id"]
        if target is not None:
            t = get_model(conn, target)
            if t["status"] == "rejected":
                raise RegistryError(f"SQL model {current['id']} replaced model {target}, which is rejected: promote "
                                    "a candidate instead")
        conn.execute(_q("retire_sql_model"), {"id": current["id"]})
        if target is not None:
            conn.execute(_q("reactivate_sql_model"), {"id": target})
    out = {"active": target, "previous": current["id"]}
    log.info("sql_model_rolled_back", **out)
    return out


def set_traffic(conn: psycopg.Connection, model_id: int, percent: float) -> None:
    """Give a candidate ``percent`` of the sessions (sticky by session); the candidates' total stays <= 100 %."""
    with conn.transaction():
        conn.execute(_q("lock_sql_models"))
        m = get_model(conn, model_id)
        if m["status"] != "candidate":
            raise RegistryError(f"SQL model {model_id} is {m['status']}: only a candidate gets a traffic share")
        _check_traffic(conn, model_id, percent)
        conn.execute(_q("set_sql_model_traffic"), {"id": model_id, "traffic": percent})
    log.info("sql_model_traffic_set", model=model_id, traffic_percent=percent, previous=float(m["traffic_percent"]))


def retire(conn: psycopg.Connection, model_id: int) -> None:
    """Take a candidate or rejected model out of service for good (traffic 0). Not the active one: promote or
    roll back first. Retiring a retired model changes nothing."""
    with conn.transaction():
        conn.execute(_q("lock_sql_models"))
        m = get_model(conn, model_id)
        if m["status"] == "active":
            raise RegistryError(f"SQL model {model_id} is active: promote another model or roll back first")
        if m["status"] == "retired":
            return
        conn.execute(_q("retire_sql_model"), {"id": model_id})
    log.info("sql_model_retired", model=model_id, previous_status=m["status"])
