"""Numbered, forward-only migrations, tracked in ``pgsynapse_migrations``, each applied in its own transaction.

A migration file may include a trigger file with a line ``-- pgsynapse:include NAME.sql``; trigger
files are versioned (``documents_v1.sql``) and never edited once released.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from pgsynapse.db import connect, describe_db_error, take_xact_lock
from pgsynapse.errors import DatabaseError, DatabaseSetupError
from pgsynapse.logs import get_logger
from pgsynapse.queries import q

log = get_logger(__name__)

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_INCLUDE = re.compile(r"^--\s*pgsynapse:include\s+(\S+\.sql)\s*$", re.MULTILINE)
# serialises concurrent `migrate` runs (two workers starting at once)
_LOCK_KEY = 0x70677379  # "pgsy"
FILE = "migrate.sql"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def _expand(sql: str) -> str:
    def include(m: re.Match[str]) -> str:
        return resources.files("pgsynapse.triggers").joinpath(m.group(1)).read_text()

    return _INCLUDE.sub(include, sql)


def available() -> list[Migration]:
    found = []
    for entry in resources.files("pgsynapse.migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), entry.name, _expand(entry.read_text())))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise DatabaseError(f"duplicate migration numbers: {versions}")
    return found


def _tracked(conn: psycopg.Connection) -> bool:
    exists = conn.execute(q("migrations_tracked", FILE)).fetchone()
    return bool(exists and exists["tracked"])


def applied(conn: psycopg.Connection) -> list[int]:
    if not _tracked(conn):
        return []
    return [r["version"] for r in conn.execute(q("applied_migrations", FILE))]


def newer_migrations(have: set[int]) -> list[int]:
    """The migrations a database has that this release does not know: a newer pgsynapse migrated it."""
    return sorted(have - {m.version for m in available()})


def schema_state(conn: psycopg.Connection) -> dict[str, Any]:
    """Where the database's schema stands against this release (``pgsynapse status``, a command's check before it
    runs): the newest migration applied (None: none), this release's newest, the ones still to apply (``pgsynapse
    migrate``) and the ones a newer release applied (this release does not know what they changed)."""
    have = set(applied(conn))
    known = available()
    return {"applied": max(have, default=None), "latest": known[-1].version,
            "pending": [m.name for m in known if m.version not in have], "newer": newer_migrations(have)}


def warn_if_newer(newer: list[int]) -> None:
    if newer:
        log.warning("database_schema_newer", unknown_migrations=newer,
                    note="a newer pgsynapse migrated this database: this release does not know what they changed; "
                    "upgrade it (docs/operations.md, upgrades and migrations)")


def migrate(url: str) -> list[str]:
    """Apply every pending migration; returns the names applied (empty when up to date).

    The lock that serialises concurrent runs is a transaction lock, taken in each of this run's transactions (and
    what a migration's transaction applies checked again under it): a transaction pooler (PgBouncer) keeps a
    transaction on one server connection, where a session lock taken on one and released on another stayed held."""
    done: list[str] = []
    said: list[bool] = []
    with connect(url, autocommit=True) as conn:
        with conn.transaction():
            _lock(conn, said)
            _check_pgvector(conn)
            if not _tracked(conn):
                # only when missing: a role that owns nothing (pgsynapse_worker, pgsynapse_app) may not CREATE in
                # schema public, and an up-to-date database needs nothing from it
                conn.execute(q("create_migrations_table", FILE))
            have = set(applied(conn))
        warn_if_newer(newer_migrations(have))
        for mig in available():
            if mig.version in have:
                continue
            try:
                with conn.transaction():
                    _lock(conn, said)
                    if mig.version in applied(conn):
                        continue  # another run applied it meanwhile
                    conn.execute(mig.sql.encode())
                    conn.execute(q("record_migration", FILE), {"version": mig.version, "name": mig.name})
            except psycopg.Error as exc:
                err = DatabaseSetupError if isinstance(exc, psycopg.errors.InsufficientPrivilege) else DatabaseError
                raise err(f"migration {mig.name} failed: {describe_db_error(exc)}") from exc
            log.info("migration_applied", version=mig.version, name=mig.name)
            done.append(mig.name)
    return done


def _lock(conn: psycopg.Connection, said: list[bool]) -> None:
    """Take the migration lock in the transaction open on ``conn``; the first wait of a run says who holds it."""
    if conn.execute(q("migrate_try_lock", FILE), {"key": _LOCK_KEY}).fetchone()["locked"]:
        return
    if not said:
        holder = conn.execute(q("migrate_lock_holder", FILE), {"key": _LOCK_KEY}).fetchone() or {}
        log.info("migrate_waiting", holder_pid=holder.get("pid"), holder_application=holder.get("application_name"),
                 holder_state=holder.get("state"), holder_state_seconds=holder.get("state_seconds"),
                 note="another `pgsynapse migrate` (or a worker starting) is applying migrations to this database: "
                 "waiting for it to finish. A holder idle for long applies nothing: a session left holding it (an "
                 "older pgsynapse's migrate through a transaction pooler with no PGSYNAPSE_LISTEN_URL unlocked on "
                 "another server session); end it with SELECT pg_terminate_backend(holder_pid)")
        said.append(True)
    take_xact_lock(conn, q("migrate_lock", FILE), {"key": _LOCK_KEY})


def _check_pgvector(conn: psycopg.Connection) -> None:
    row = conn.execute(q("pgvector_versions", FILE)).fetchone()
    if row and not row["installed"] and not row["available"]:
        raise DatabaseSetupError(
            "the pgvector extension is not available on this PostgreSQL server: install it "
            "(e.g. the postgresql-NN-pgvector package or the pgvector/pgvector image) and retry"
        )
