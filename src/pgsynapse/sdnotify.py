"""The systemd notify protocol (``sd_notify(3)``) without extra dependencies.

A datagram of ``KEY=VALUE`` lines sent to the unix socket named by ``$NOTIFY_SOCKET``; a name starting with
``@`` is in the abstract namespace. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import threading

from pgsynapse.logs import get_logger

log = get_logger(__name__)


class Notifier:
    """Sends ``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``, ``STATUS=...`` to the service manager."""

    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str, wait: float = 0.0) -> bool:
        """Send one datagram; True when sent. Errors are logged once, never raised: systemd is optional.

        The caller is an event loop, so a full receive queue never blocks it for more than ``wait`` seconds
        (0: a ping that cannot be queued at once is dropped; the next one follows).
        """
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(wait)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except (BlockingIOError, TimeoutError):
            log.debug("sd_notify_dropped", message=lines[0] if lines else "", reason="receive queue full")
            return False
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify_failed", socket=self.address.replace("\0", "@"), error=str(exc))
                self._warned = True
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when no watchdog is asked for.

    ``$WATCHDOG_PID``, when set, must be this process (the variables may be inherited by a child).
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000


class StartPings:
    """While the service starts, tell the service manager it is alive: ``EXTEND_TIMEOUT_USEC`` every ``every``
    seconds (the watchdog's cadence, else 30 s), each good for three of them.

    A start may take many minutes and still progress (migrations, model loads, the first start's runtime export, or
    a wait for another worker's): ``TimeoutStartSec=`` then bounds a start that went silent (a process that hung
    or died), not a long one. A thread, so the synchronous steps before the event loop are covered too; stopped
    by :meth:`stop` just before ``READY=1`` (or at exit, on a start that failed). A no-op outside systemd.
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self.notifier = Notifier.from_env(environ)
        self.every = watchdog_interval(environ) or 30.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StartPings:
        if self.notifier.enabled:
            self._thread = threading.Thread(target=self._ping, name="sd-start-pings", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ping(self) -> None:
        usec = round(self.every * 3 * 1_000_000)
        while not self._stop.is_set():
            self.notifier.notify(f"EXTEND_TIMEOUT_USEC={usec}")
            self._stop.wait(self.every)

    def stop(self) -> None:
        """No extension after this returns (call it before ``READY=1``); idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.notifier.close()
