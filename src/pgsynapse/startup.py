"""The metrics port while the worker starts: bound first, and answered from a thread until the service takes it over.

A start may take minutes (a migration waiting for another's lock, model loads, the first start's runtime export). A
probe meanwhile gets an answer, not a refused or hung connection: ``/healthz`` 503 ``{"status": "starting", "phase":
...}`` (up, not yet serving: a readiness or start-up probe waits, a liveness probe may count the answer as alive) and
``/metrics`` ``pgsynapse_starting 1``. :meth:`StartingHttp.stop` hands the socket to the service (daemon.py), which
answers from its event loop from READY=1 on; a connection made in between waits in the listen backlog.
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST

from pgsynapse.config import Settings
from pgsynapse.errors import ConfigError
from pgsynapse.logs import get_logger

log = get_logger(__name__)

# the steps of a start, in order, as /healthz names them
PHASES = ("model_check", "database", "migrations", "worker_start")
STARTING_HELP = ("# HELP pgsynapse_starting 1 while the worker starts (migrations, model loads, a first start's "
                 "runtime export: /healthz names the step), 0 once it serves\n# TYPE pgsynapse_starting gauge\n")
ACCEPT_POLL_S = 0.1  # how soon stop() is noticed between two connections
REQUEST_WAIT_S = 2.0  # for one request's head: a silent client does not hold the next probe back for longer


def bind_metrics(settings: Settings) -> list[socket.socket]:
    """The listening metrics sockets, one per address of metrics_host (none when metrics_port is 0): bound before
    anything else starts, so a taken port fails fast (exit 78). An address this host has not (``localhost``'s ::1
    with IPv6 disabled) is skipped with a warning; it fails only when no address of metrics_host can be bound."""
    if not settings.metrics_port:
        return []
    try:
        infos = socket.getaddrinfo(settings.metrics_host, settings.metrics_port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise _cannot_listen(settings, exc.strerror or str(exc)) from None
    socks: list[socket.socket] = []
    not_here: list[tuple[str, str]] = []  # (address, why) of those this host cannot bind
    # an IPv6 socket takes IPv4 too ("::" alone: every address, as Python's and Go's servers take it) unless an IPv4
    # address of the name has its own socket ("::" beside "0.0.0.0", "::1" beside "127.0.0.1", as anyio binds)
    v6only = any(i[0] == socket.AF_INET for i in infos)
    try:
        for family, _, _, _, address in dict.fromkeys((i[0], 0, 0, "", i[4]) for i in infos):
            sock = None
            try:  # a family this host lacks fails the socket, an address it has not the bind
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
                sock.bind(address)
            except OSError as exc:
                if sock is not None:
                    sock.close()
                if exc.errno not in NOT_ON_THIS_HOST:
                    raise
                not_here.append(_skipped(address, exc))
                continue
            socks.append(sock)
            sock.listen(128)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise _cannot_listen(settings, exc.strerror or str(exc)) from None
    if not socks:
        raise _cannot_listen(settings, "no address of it can be bound on this host ("
                             f"{'; '.join(f'{a}: {why}' for a, why in not_here)}); set it to an address of this "
                             "host (127.0.0.1, or 0.0.0.0 for all)")
    for address, why in not_here:
        log.warning("metrics_address_skipped", host=settings.metrics_host, address=address,
                    port=settings.metrics_port, error=why, note="an address of metrics_host this host cannot bind: "
                    "the metrics are served on its other addresses")
    return socks


# what binding an address that is not this host's says (EADDRNOTAVAIL), or one of a family it lacks (IPv6 disabled)
NOT_ON_THIS_HOST = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def _skipped(address: tuple, exc: OSError) -> tuple[str, str]:
    return address[0], exc.strerror or str(exc)


def _cannot_listen(settings: Settings, why: str) -> ConfigError:
    return ConfigError(
        f"invalid setting metrics_host / metrics_port [PGSYNAPSE_METRICS_HOST, PGSYNAPSE_METRICS_PORT]: cannot "
        f"listen on {settings.metrics_host}:{settings.metrics_port}: {why}"
    )


class StartingHttp:
    """Answers the metrics sockets from a thread while the worker starts; ``phase`` is the step it is in. A no-op
    without sockets. A context manager that owns them (closed at its exit); :meth:`stop` (idempotent) ends the
    answers only, when the service takes the sockets over."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        self.phase = PHASES[0]
        self.since = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StartingHttp:
        if self.socks:
            self._thread = threading.Thread(target=self._serve, name="starting-http", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for sock in self.socks:
            sock.close()  # already closed when the service served it: a no-op then

    def stop(self) -> None:
        """No answer from the thread after this returns: the sockets are the caller's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def health(self) -> dict[str, object]:
        return {"status": "starting", "phase": self.phase, "starting_seconds": round(time.monotonic() - self.since, 1)}

    def answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` of one request while starting."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/healthz":
            return 503, "application/json", (json.dumps(self.health()) + "\n").encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, (STARTING_HELP + "pgsynapse_starting 1.0\n").encode()
        return 404, "text/plain", b"not found: try /metrics or /healthz\n"

    def _serve(self) -> None:
        with selectors.DefaultSelector() as ready:
            for sock in self.socks:
                ready.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in ready.select(ACCEPT_POLL_S):
                    try:
                        conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    except OSError:
                        continue  # a client gone before it was accepted
                    with conn:
                        try:
                            self._reply(conn)
                        except OSError:
                            continue  # a client gone or silent: the next one is answered

    def _reply(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_WAIT_S)
        request = b""
        while b"\r\n\r\n" not in request and len(request) < 65536:
            chunk = conn.recv(65536)
            if not chunk:
                return
            request += chunk
        parts = request.split(b"\r\n", 1)[0].decode("latin-1").split()
        method, path = (parts + ["", ""])[:2]
        code, ctype, payload = self.answer(method, path.split("?", 1)[0])
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[code]
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
                f"Connection: close\r\n\r\n")
        conn.sendall(head.encode() + (b"" if method == "HEAD" else payload))
