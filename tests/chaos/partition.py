"""A network path between a worker and the database that a test can cut: a second network namespace with a veth
pair, and a TCP forwarder in the test process from the host-side veth address to the real server.

A process started with :attr:`Partition.exec_prefix` lives in the namespace and reaches the server only at
:meth:`Partition.url` (the host-side veth address). :meth:`cut` takes the host-side veth down: packets between the
two addresses are dropped silently (no RST, no FIN, the server's backends stay up behind the forwarder), as in a
real partition; :meth:`heal` brings it back. Traffic stays on the two addresses of the pair (a /30 of
10.213.0.0/16); nothing else is routed into the namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo


# a server reply that leaves a session idle inside a transaction that has written: the CommandComplete of an INSERT
# or UPDATE followed by ReadyForQuery with status 'T' (PostgreSQL protocol 3)
_WROTE_IN_TXN = re.compile(rb"C\x00\x00\x00.(?:INSERT 0 \d+|UPDATE \d+)\x00Z\x00\x00\x00\x05T", re.DOTALL)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _free_subnet() -> int:
    used = _ip("-o", "-4", "addr").stdout + _ip("-o", "-4", "route").stdout
    for _ in range(50):
        x = secrets.randbelow(64) * 4  # 10.213.<x>.0/30 ... the third octet picks the pair
        if f"10.213.{x}." not in used:
            return x
    raise RuntimeError("no free 10.213.x.0/30 for the veth pair")


class ServerStream:
    """The server's side of one connection, split into protocol messages (PostgreSQL protocol 3: a type byte and
    a length), to find where the server is left waiting on the client in the middle of a statement: COPY FROM
    STDIN (CopyInResponse) or a pipeline (a statement complete, the next one's Parse/Bind answered before any
    ReadyForQuery). There the server waits for the client with no ``idle_in_transaction_session_timeout`` (that
    is armed only at ReadyForQuery), and no ``statement_timeout`` interrupts a backend blocked reading from its
    client: cut off there, the worker's backend keeps its row locks until the server's TCP keepalive gives up."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._started = False
        self._after_complete = False  # a CommandComplete since the last ReadyForQuery

    def feed(self, data: bytes) -> list[str]:
        self._buf += data
        if not self._started:
            # libpq's SSLRequest (and GSSENCRequest) are answered with one byte, 'N' (the path has sslmode=disable
            # anyway); the first message proper is Authentication ('R'), an ErrorResponse or NegotiateProtocolVersion
            while self._buf[:1] == b"N":
                del self._buf[:1]
            self._started = bool(self._buf)
        found = []
        while len(self._buf) >= 5:
            size = int.from_bytes(self._buf[1:5], "big")
            if len(self._buf) < 1 + size:
                break
            kind = chr(self._buf[0])
            del self._buf[:1 + size]
            if kind == "G":
                found.append("COPY FROM STDIN")
            elif kind in "12" and self._after_complete:  # once per statement that waited
                found.append("pipeline")
                self._after_complete = False
            if kind == "C":
                self._after_complete = True
            elif kind == "Z":
                self._after_complete = False
        return found


class Forwarder:
    """TCP on (host, port) -> the server (a unix socket or host:port), in a thread with its own event loop."""

    def __init__(self, listen_host: str, upstream: dict[str, str]) -> None:
        self.listen_host = listen_host
        self.upstream = upstream
        self.port = 0
        self.connections = 0
        self.upstream_errors: list[str] = []
        # (connection number, what) for each point where the server was left waiting on the client mid-statement
        self.mid_statement_waits: list[tuple[int, str]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pg-forwarder")
        self._writers: set[asyncio.StreamWriter] = set()
        self._on_write_in_txn: Callable[[], None] | None = None

    def url(self, db_url: str) -> str:
        """``db_url`` (same database, user, password) through this forwarder; without TLS, so that it can read the
        server's side of the protocol (:class:`ServerStream`)."""
        params = conninfo_to_dict(db_url)
        params.pop("hostaddr", None)
        params.update(host=self.listen_host, port=str(self.port), sslmode="disable")
        return make_conninfo(**params)

    def arm(self, action: Callable[[], None]) -> None:
        """Run ``action`` (once) before relaying the next server reply that leaves a session inside a transaction
        that has written rows: a cut then lands while the server holds that transaction's locks."""
        self._on_write_in_txn = action

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.upstream.get("host") or "/tmp", self.upstream.get("port") or "5432"
        if host.startswith("/"):
            return await asyncio.open_unix_connection(os.path.join(host, f".s.PGSQL.{port}"))
        return await asyncio.open_connection(host, int(port))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, from_server: bool,
                    number: int) -> None:
        stream = ServerStream() if from_server else None
        try:
            while data := await reader.read(65536):
                if stream is not None:
                    self.mid_statement_waits += [(number, what) for what in stream.feed(data)]
                action = self._on_write_in_txn
                if from_server and action is not None and _WROTE_IN_TXN.search(data):
                    self._on_write_in_txn = None
                    action()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            up_reader, up_writer = await self._open_upstream()
        except OSError as exc:  # the client sees its connection closed, as from a server that went away
            self.upstream_errors.append(repr(exc))
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer, False, number), self._pipe(up_reader, writer, True, number))
        finally:
            self._writers -= {writer, up_writer}

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, self.listen_host, 0))
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._ready.set()
        self._loop.run_forever()
        server.close()
        writers = list(self._writers)
        for w in writers:
            w.close()
        # until every connection's socket has closed (bounded: one whose peer is cut off may never finish flushing)
        with contextlib.suppress(TimeoutError):
            self._loop.run_until_complete(asyncio.wait_for(
                asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True), 5.0))
        self._loop.close()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the TCP forwarder did not start")

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


@dataclass
class Partition:
    """See the module docstring. Use :func:`partition` (it skips where namespaces cannot be made)."""

    server_url: str
    name: str = field(default_factory=lambda: f"pgs-part-{secrets.token_hex(3)}")
    host_addr: str = ""
    inside_addr: str = ""
    forwarder: Forwarder | None = None
    cut_done: threading.Event = field(default_factory=threading.Event)
    cut_time: float = 0.0  # time.time() of the last cut

    @property
    def host_veth(self) -> str:
        return f"pgsp{self.name[-6:]}h"  # at most 15 characters (IFNAMSIZ)

    @property
    def inside_veth(self) -> str:
        return f"pgsp{self.name[-6:]}n"

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def url(self, db_url: str) -> str:
        """``db_url`` (same database, user, password) reached through the cuttable path."""
        assert self.forwarder is not None
        return self.forwarder.url(db_url)

    def _must(self, *args: str) -> None:
        r = _ip(*args)
        if r.returncode:
            raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")

    def setup(self) -> None:
        x = _free_subnet()
        self.host_addr, self.inside_addr = f"10.213.{x}.1", f"10.213.{x}.2"
        self._must("link", "add", self.host_veth, "type", "veth", "peer", "name", self.inside_veth, "netns", self.name)
        self._must("addr", "add", f"{self.host_addr}/30", "dev", self.host_veth)
        self._must("link", "set", self.host_veth, "up")
        self._must("-n", self.name, "addr", "add", f"{self.inside_addr}/30", "dev", self.inside_veth)
        self._must("-n", self.name, "link", "set", self.inside_veth, "up")
        self._must("-n", self.name, "link", "set", "lo", "up")
        self.forwarder = Forwarder(self.host_addr, conninfo_to_dict(self.server_url))
        self.forwarder.start()

    def check(self, db_url: str) -> None:
        """A client inside the namespace reaches the server through the path (psql, else psycopg)."""
        if shutil.which("psql"):
            cmd = [*self.exec_prefix, "psql", "-X", "-A", "-t", "-c", "SELECT 1", self.url(db_url)]
        else:
            cmd = [*self.exec_prefix, "python3", "-c", f"import psycopg; psycopg.connect({self.url(db_url)!r}).close()"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if r.returncode or (shutil.which("psql") and r.stdout.strip() != "1"):
            raise RuntimeError(f"the server is not reachable from namespace {self.name}: {r.stdout}{r.stderr}")

    def cut(self) -> None:
        self._must("link", "set", self.host_veth, "down")
        self.cut_time = time.time()
        self.cut_done.set()

    def cut_mid_transaction(self) -> None:
        """Cut right before the next reply that leaves a session through the path idle in a transaction that has
        written (its locks held by the server); :attr:`cut_done` is set once cut."""
        assert self.forwarder is not None
        self.forwarder.arm(self.cut)

    def heal(self) -> None:
        self._must("link", "set", self.host_veth, "up")
        self.cut_done.clear()

    def teardown(self) -> None:
        if self.forwarder is not None:
            self.forwarder.stop()
        # deleting the namespace deletes the inside veth and with it the pair; the host side is removed explicitly
        # too, in case the namespace went first
        _ip("link", "del", self.host_veth)
        _ip("netns", "del", self.name)


@contextlib.contextmanager
def partition(server_url: str) -> Iterator[Partition]:
    """A :class:`Partition` to ``server_url``'s server; skips (with the reason) where it cannot be built. The
    namespace, the veth pair and the forwarder are always removed; stop processes inside it before leaving."""
    if os.geteuid() != 0:
        pytest.skip("network partition: needs root (ip netns add / ip link add need CAP_NET_ADMIN, CAP_SYS_ADMIN)")
    if not shutil.which("ip"):
        pytest.skip("network partition: the `ip` command (iproute2) is not installed")
    part = Partition(server_url)
    made = _ip("netns", "add", part.name)
    if made.returncode:
        pytest.skip(f"network partition: `ip netns add` failed: {made.stderr.strip()}")
    try:
        part.setup()
        yield part
    finally:
        part.teardown()
