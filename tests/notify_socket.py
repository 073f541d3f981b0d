"""A unix datagram socket standing in for systemd's notify socket, read by a thread so the sender never blocks."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from tests.helpers import SAFETY_TIMEOUT


class NotifySocket:
    def __init__(self, *, abstract: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pgs-notify-", dir="/tmp"))  # short: sun_path is 108 bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"pgsynapse-test-{self.dir.name}"
            self.sock.bind("\0" + name)
            self.path = "@" + name  # what $NOTIFY_SOCKET says for the abstract namespace
        else:
            self.path = str(self.dir / "notify.sock")
            self.sock.bind(self.path)
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.sock.recv(4096).decode()
            except OSError:
                return
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()

    def expect(self, line: str, start: int = 0, timeout: float = SAFETY_TIMEOUT) -> int:
        """Block until a message from index ``start`` on holds ``line`` (a safety timeout only); its index."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(start, len(self.messages)):
                    if line in self.messages[i].split("\n"):
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {line!r} within {timeout}s; got {self.messages[-5:]}")
                self._cond.wait(left)

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
