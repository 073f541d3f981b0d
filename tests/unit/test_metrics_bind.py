"""The metrics sockets (startup.bind_metrics): one per address metrics_host resolves to, each reachable."""

from __future__ import annotations

import socket

import pytest

from pgsynapse.config import load_settings
from pgsynapse.startup import bind_metrics
from tests.helpers import free_port


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _reachable(port: int) -> dict[str, bool]:
    """Whether a connection to 127.0.0.1 and to ::1 on ``port`` is accepted."""
    out = {}
    for address in ("127.0.0.1", "::1"):
        try:
            socket.create_connection((address, port), timeout=5).close()
            out[address] = True
        except OSError:
            out[address] = False
    return out


@pytest.mark.skipif(not _ipv6(), reason="no IPv6 on this host")
@pytest.mark.parametrize(("host", "reached"), [
    # "::" is every address, IPv4 ones included, as Python's and Go's servers take it: it bound IPv6 only
    # (IPV6_V6ONLY), so a Prometheus scraping 127.0.0.1 or the host's IPv4 address was refused
    ("::", {"127.0.0.1": True, "::1": True}),
    ("::1", {"127.0.0.1": False, "::1": True}),
    ("0.0.0.0", {"127.0.0.1": True, "::1": False}),
])
def test_each_metrics_host_is_reachable_where_it_says(host, reached):
    port = free_port()
    socks = bind_metrics(load_settings(environ={"PGSYNAPSE_METRICS_HOST": host, "PGSYNAPSE_METRICS_PORT": str(port)}))
    try:
        assert _reachable(port) == reached, host  # main: "::" refused 127.0.0.1
    finally:
        for sock in socks:
            sock.close()


def test_localhost_binds_every_address_it_resolves_to():
    port = free_port()
    resolved = {i[4][0] for i in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)}
    environ = {"PGSYNAPSE_METRICS_HOST": "localhost", "PGSYNAPSE_METRICS_PORT": str(port)}
    socks = bind_metrics(load_settings(environ=environ))
    try:
        assert {s.getsockname()[0] for s in socks} == resolved
        assert {a for a, ok in _reachable(port).items() if ok} == resolved & {"127.0.0.1", "::1"}
    finally:
        for sock in socks:
            sock.close()
