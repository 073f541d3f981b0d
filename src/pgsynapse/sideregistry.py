"""A side registry: models that are routed, promoted and rolled back like the text model versions but have no
vectors, no dimension and no backfill: the SQL models (``pgsynapse.sql_models``, textsql/registry.py) and the
second-stage rankers (``pgsynapse.ranker_models``, ranking/registry.py). One class, one SQL file
(``side_models.sql``, the table formatted in); each registry is an instance with its table, its noun for errors and
its runtimes.

Sync methods on a psycopg connection (the CLI, the benchmarks, tests); each change is one transaction under a table
lock, so there is at most one active model and the candidates' traffic never adds up to more than 100 %. Rows come
back as dicts (whatever the connection's row factory).

Statuses (the same as ``model_versions``):

- ``candidate``: may get a traffic share (:meth:`SideRegistry.set_traffic`) and be promoted;
- ``active``: serves every session not routed to a candidate (100 %); at most one. With no active row the worker
  does without (the settings' SQL model serves; no ranker: the vector order stands);
- ``retired``: out of service (replaced by a promotion, rolled back from, or retired by hand);
- ``rejected``: failed its gate (registered for the record); never serves unless added anew.

**Rollback** returns to the model the active one replaced when it was promoted (``replaced_id``, stamped by
:meth:`SideRegistry.promote`), and retires the active one. The model active again keeps its own ``replaced_id``, so
rollbacks walk back through the promotions one at a time (an undo, not a toggle). When the active model replaced
none, rollback retires it and the worker does without again. A rollback never returns to a rejected model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgsynapse.errors import RegistryError
from pgsynapse.learning.routing import choose_version, share_left
from pgsynapse.logs import get_logger
from pgsynapse.queries import q
from pgsynapse.table_locks import lock_table

log = get_logger(__name__)

FILE = "side_models.sql"
STATUSES = ("candidate", "rejected", "active", "retired")


class SideRegistry:
    """The registry in table ``pgsynapse.<table>``; ``noun`` names its models in errors ("SQL model", "ranker")."""

    def __init__(self, table: str, noun: str, runtimes: Sequence[str], *, without: str) -> None:
        self.table = table
        self.noun = noun
        self.runtimes = tuple(runtimes)
        self.without = without  # what serves when no model is active, for people ("the settings' model")

    def sql(self, name: str) -> str:
        """The text of a named query of side_models.sql on this registry's table (for async callers too)."""
        return q(name, FILE).replace("{table}", self.table)

    def _fetch(self, conn: psycopg.Connection, name: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        cur = conn.execute(self.sql(name), params or {})
        cols = [d.name for d in cur.description or []]
        return [dict(r) if isinstance(r, dict) else dict(zip(cols, r)) for r in cur.fetchall()]

    def get_model(self, conn: psycopg.Connection, model_id: int) -> dict[str, Any]:
        """The row of ``model_id``; :class:`RegistryError` when there is none."""
        rows = self._fetch(conn, "model_by_id", {"id": model_id})
        if not rows:
            raise RegistryError(f"no {self.noun} {model_id}")
        return rows[0]

    def list_models(self, conn: psycopg.Connection) -> list[dict[str, Any]]:
        """Every model, in id order."""
        return self._fetch(conn, "models")

    def model_at_path(self, conn: psycopg.Connection, path: str) -> dict[str, Any] | None:
        """The model (not retired) registered with ``path`` (``id``, ``status``), if any."""
        rows = self._fetch(conn, "model_at_path", {"path": path})
        return rows[0] if rows else None

    def active_model(self, conn: psycopg.Connection) -> dict[str, Any] | None:
        """The active model's row, or None."""
        rows = self._fetch(conn, "active_model")
        return rows[0] if rows else None

    def routable_models(self, conn: psycopg.Connection) -> list[dict[str, Any]]:
        """The active model and the candidates with traffic, in id order: what :meth:`choose` routes on."""
        return self._fetch(conn, "routable_models")

    @staticmethod
    def choose(rows: Sequence[dict[str, Any]], session: str) -> dict[str, Any] | None:
        """The row ``session`` is routed to (sticky: a stable hash of the session), or None: no model (the
        settings' model, or no ranker), which takes the active model's place when no row is active."""
        if any(r["status"] == "active" for r in rows):
            return choose_version(rows, session)
        chosen = choose_version([*rows, {"id": None, "status": "active", "traffic_percent": 100}], session)
        return None if chosen["id"] is None else chosen

    def _check_traffic(self, conn: psycopg.Connection, model_id: int | None, percent: float) -> None:
        if not 0 <= percent <= 100:
            raise RegistryError(f"traffic must be between 0 and 100 %, got {percent}")
        others = self._fetch(conn, "candidate_traffic", {"id": model_id})[0]["total"]
        if others + percent > 100:
            raise RegistryError(f"the candidates' traffic would add up to {others + percent:g} % (the others have "
                                f"{others:g} %): at most 100 %")

    def add_model(self, conn: psycopg.Connection, name: str, path: str, runtime: str, base_id: int | None = None,
                  metrics: dict[str, Any] | None = None, status: str = "candidate",
                  traffic: float = 0, share_what_is_left: bool = False) -> dict[str, Any]:
        """Register a model and return its row. ``status`` ``active`` adds it as a candidate and promotes it (the
        active model before it is retired); a traffic share is for candidates only. ``share_what_is_left``: a
        candidate gets at most what the other candidates leave, read under the lock (a trained model registers so:
        a share given while it trained does not make its registration fail), instead of being refused."""
        if runtime not in self.runtimes:
            raise RegistryError(f"unknown {self.noun} runtime {runtime!r} (one of {', '.join(self.runtimes)})")
        if status not in STATUSES or status == "retired":
            raise RegistryError(f"a {self.noun} is added as candidate, rejected or active, not {status!r}")
        if traffic and status != "candidate":
            raise RegistryError(f"only a candidate gets a traffic share, not a {status} model")
        if not name or not path:
            raise RegistryError(f"a {self.noun} needs a name and a path")
        with conn.transaction():
            lock_table(conn, self.sql("lock_models"), f"pgsynapse.{self.table}")
            if base_id is not None:
                self.get_model(conn, base_id)
            if share_what_is_left and status == "candidate":
                traffic = share_left(traffic, self._fetch(conn, "candidate_traffic", {"id": None})[0]["total"])
            self._check_traffic(conn, None, traffic if status == "candidate" else 0)
            row = self._fetch(conn, "add_model", {
                "name": name, "base_id": base_id, "path": path, "runtime": runtime, "metrics": Jsonb(metrics or {}),
                "status": "candidate" if status == "active" else status, "traffic": traffic})[0]
            if status == "active":
                self._activate(conn, row["id"])
                row = self.get_model(conn, row["id"])
        log.info("registry_model_added", registry=self.table, model=row["id"], name=name, runtime=runtime,
                 status=row["status"], traffic_percent=float(row["traffic_percent"]))
        return row

    def _activate(self, conn: psycopg.Connection, model_id: int) -> int | None:
        """In the caller's transaction and lock: ``model_id`` active at 100 % (replacing the active one, which is
        retired); returns the replaced one's id."""
        old = [r["id"] for r in self._fetch(conn, "retire_active_model", {"id": model_id})]
        replaced = old[0] if old else None
        conn.execute(self.sql("promote_model"), {"id": model_id, "replaced": replaced})
        return replaced

    def promote(self, conn: psycopg.Connection, model_id: int) -> dict[str, Any]:
        """Make a candidate the active model (100 %); the active one becomes retired (rollback returns to it); the
        other candidates keep their traffic. Returns ``{"active": id, "previous": id or None}``."""
        with conn.transaction():
            lock_table(conn, self.sql("lock_models"), f"pgsynapse.{self.table}")
            m = self.get_model(conn, model_id)
            if m["status"] == "active":
                raise RegistryError(f"{self.noun} {model_id} is already active")
            if m["status"] != "candidate":
                raise RegistryError(f"{self.noun} {model_id} is {m['status']}: only a candidate can be promoted")
            previous = self._activate(conn, model_id)
        log.info("registry_model_promoted", registry=self.table, model=model_id, previous=previous)
        return {"active": model_id, "previous": previous}

    def rollback(self, conn: psycopg.Connection) -> dict[str, Any]:
        """Return to the model the active one replaced (see the module's docstring). Returns ``{"active": id, or
        None when there is none again, "previous": the id rolled back from}``."""
        with conn.transaction():
            lock_table(conn, self.sql("lock_models"), f"pgsynapse.{self.table}")
            current = self.active_model(conn)
            if current is None:
                raise RegistryError(f"nothing to roll back: no {self.noun} is active")
            target = current["replaced_id"]
            if target is not None:
                t = self.get_model(conn, target)
                if t["status"] == "rejected":
                    raise RegistryError(f"{self.noun} {current['id']} replaced {self.noun} {target}, which is "
                                        "rejected: promote a candidate instead")
            conn.execute(self.sql("retire_model"), {"id": current["id"]})
            if target is not None:
                conn.execute(self.sql("reactivate_model"), {"id": target})
        out = {"active": target, "previous": current["id"]}
        log.info("registry_model_rolled_back", registry=self.table, **out)
        return out

    def set_traffic(self, conn: psycopg.Connection, model_id: int, percent: float) -> None:
        """Give a candidate ``percent`` of the sessions (sticky by session); the candidates' total stays <= 100 %."""
        with conn.transaction():
            lock_table(conn, self.sql("lock_models"), f"pgsynapse.{self.table}")
            m = self.get_model(conn, model_id)
            if m["status"] != "candidate":
                raise RegistryError(f"{self.noun} {model_id} is {m['status']}: only a candidate gets a traffic share")
            self._check_traffic(conn, model_id, percent)
            conn.execute(self.sql("set_model_traffic"), {"id": model_id, "traffic": percent})
        log.info("registry_model_traffic_set", registry=self.table, model=model_id, traffic_percent=percent,
                 previous=float(m["traffic_percent"]))

    def command(self, conn: psycopg.Connection, action: str, model_id: int | None = None,
                percent: float | None = None) -> str:
        """The CLI's ``promote`` / ``rollback`` / ``traffic`` / ``retire`` on this registry; the line to print."""
        if action == "promote":
            r = self.promote(conn, model_id)  # type: ignore[arg-type]
            return f"{self.noun} {r['active']} is active (was {r['previous'] or self.without})"
        if action == "rollback":
            r = self.rollback(conn)
            return (f"{self.noun} {r['active']} is active again" if r["active"] is not None
                    else f"no {self.noun} is active: {self.without} serves again")
        if action == "traffic":
            self.set_traffic(conn, model_id, percent)  # type: ignore[arg-type]
            return f"{self.noun} {model_id} serves {percent:g}% of sessions"
        if action == "retire":
            self.retire(conn, model_id)  # type: ignore[arg-type]
            return f"{self.noun} {model_id} retired"
        raise ValueError(f"unknown registry action {action!r}")

    def retire(self, conn: psycopg.Connection, model_id: int) -> None:
        """Take a candidate or rejected model out of service for good (traffic 0). Not the active one: promote or
        roll back first. A retired model is refused (RegistryError): there is nothing to do."""
        with conn.transaction():
            lock_table(conn, self.sql("lock_models"), f"pgsynapse.{self.table}")
            m = self.get_model(conn, model_id)
            if m["status"] == "active":
                raise RegistryError(f"{self.noun} {model_id} is active: promote another model or roll back first")
            if m["status"] == "retired":
                raise RegistryError(f"{self.noun} {model_id} is already retired: nothing to do")
            conn.execute(self.sql("retire_model"), {"id": model_id})
        log.info("registry_model_retired", registry=self.table, model=model_id, previous_status=m["status"])
