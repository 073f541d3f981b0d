"""Library entry points behind the CLI: run the worker, migrate, status, search, demo."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from pgsynapse.config import Settings
from pgsynapse.db import Database
from pgsynapse.logs import get_logger
from pgsynapse.migrate import applied, available, migrate

log = get_logger(__name__)


def ensure_schema(db: Database, *, apply: bool = True) -> None:
    from pgsynapse.errors import DatabaseError

    if apply:
        migrate(db.url)
        return
    with db.connect() as conn:
        have = set(applied(conn))
    missing = [m.name for m in available() if m.version not in have]
    if missing:
        raise DatabaseError(f"database schema is not up to date (missing {', '.join(missing)}): run `pgsynapse migrate`")


def run_worker(
    settings: Settings, *, apply_migrations: bool = True, reload: Callable[[], Settings] | None = None
) -> None:
    """The service: migrations, then the worker with systemd notify/watchdog, SIGHUP ``reload`` and metrics."""
    from pgsynapse.daemon import serve
    from pgsynapse.listener.worker import Worker

    with Database(settings) as db:
        ensure_schema(db, apply=apply_migrations)
        worker = Worker(settings, db.url)
        anyio.run(lambda: serve(worker, reload=reload))
