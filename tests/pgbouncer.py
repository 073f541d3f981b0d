"""A real PgBouncer (Debian's ``pgbouncer`` package) in transaction pooling mode in front of the test server.

``PgBouncer(server_url).start()`` writes a config to a temp dir, starts the binary on a free localhost port and
waits until it accepts connections; :meth:`PgBouncer.url` turns a direct URL of the test server into the same
database through the pooler. Clients log in with ``auth_type = trust`` (the user must still be in the userlist);
the pooler logs in to the server with the server URL's own user and password.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.helpers import die_with_parent

BINARY = shutil.which("pgbouncer") or next(
    (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None)
# pgbouncer refuses to run as root: it runs as the user the embedded test server runs as (else nobody)
RUN_AS = ("pgserver", "nobody")


def _first_user(names: tuple[str, ...]) -> pwd.struct_passwd:
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(f"pgbouncer will not run as root and none of the users {names} exists")


def _as_user(pw: pwd.struct_passwd, then: Callable[[], None]) -> Callable[[], None]:
    """A ``preexec_fn`` that drops root for ``pw``'s user, then runs ``then``. pgbouncer could drop it itself
    (``user =``), but a change of user clears the parent-death signal (die_with_parent): dropped here, before the
    signal is armed, the pooler still dies with the test process."""

    def drop() -> None:
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        then()

    return drop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgBouncer:
    def __init__(self, server_url: str, *, pool_size: int = 2) -> None:
        self.server = conninfo_to_dict(server_url)
        self.pool_size = pool_size
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pgsynapse-pgbouncer-", dir="/tmp"))
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    def url(self, direct_url: str) -> str:
        """``direct_url``'s database and user, through the pooler."""
        params = conninfo_to_dict(direct_url)
        params.pop("password", None)
        params.update(host="127.0.0.1", port=str(self.port))
        return make_conninfo(**params)

    def start(self) -> PgBouncer:
        assert BINARY, "no pgbouncer binary"
        user = self.server.get("user") or "postgres"
        target = {k: self.server[k] for k in ("host", "port", "user", "password") if self.server.get(k)}
        target_line = " ".join(f"{k}={v}" for k, v in target.items())
        (self.dir / "userlist.txt").write_text(f'"{user}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(f"""[databases]
* = {target_line}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/userlist.txt
admin_users = {user}
pool_mode = transaction
default_pool_size = {self.pool_size}
min_pool_size = 0
max_client_conn = 200
server_reset_query =
pidfile = {self.dir}/pgbouncer.pid
""")
        preexec = die_with_parent()
        if os.geteuid() == 0:
            pw = _first_user(RUN_AS)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            for f in self.dir.iterdir():
                os.chown(f, pw.pw_uid, pw.pw_gid)
            preexec = _as_user(pw, preexec)
        self.proc = subprocess.Popen([BINARY, str(self.dir / "pgbouncer.ini")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # its own log says when it listens: "listening on ...", then "process up"
            self.log.append(line)
            if "process up" in line:
                break
        else:
            raise RuntimeError("pgbouncer did not start: " + "".join(self.log[-20:]))
        # keep reading its log (one line per connection): a full pipe would stall the pooler
        threading.Thread(target=self.log.extend, args=(self.proc.stderr,), daemon=True).start()
        return self

    def stats(self, dbname: str) -> dict[str, int]:
        """The pooler's own counters for ``dbname`` (``SHOW STATS`` on its admin console)."""
        user = self.server.get("user") or "postgres"
        admin = make_conninfo(host="127.0.0.1", port=str(self.port), user=user, dbname="pgbouncer")
        # the admin console speaks only the simple query protocol: a client-side cursor, no parameters
        with psycopg.connect(admin, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
            cur = conn.execute("SHOW STATS")
            names = [d.name for d in cur.description or []]
            for row in cur.fetchall():
                r = dict(zip(names, row))
                if r["database"] == dbname:
                    return r
        return {}

    def waiting_clients(self, dbname: str) -> int:
        """How many clients of ``dbname`` wait for a server connection (``SHOW POOLS``: cl_waiting)."""
        return sum(int(r["cl_waiting"]) for r in self._admin("SHOW POOLS") if r["database"] == dbname)

    def _admin(self, command: str) -> list[dict[str, object]]:
        user = self.server.get("user") or "postgres"
        admin = make_conninfo(host="127.0.0.1", port=str(self.port), user=user, dbname="pgbouncer")
        with psycopg.connect(admin, autocommit=True, cursor_factory=psycopg.ClientCursor) as conn:
            cur = conn.execute(command)
            names = [d.name for d in cur.description or []]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
