"""The metrics sockets (startup.bind_metrics): one per address metrics_host resolves to, each reachable."""

from __future__ import annotations

import socket

import pytest
from structlog.testing import capture_logs

from pgsynapse.config import load_settings
from pgsynapse.errors import ConfigError
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


# an address of metrics_host this host cannot bind: not one of its own (EADDRNOTAVAIL), or IPv6 where it is disabled
# (EAFNOSUPPORT), as "localhost" resolving to ::1 on a host with IPv6 turned off
NOT_HERE = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 0, 0, 0))


def _resolving(monkeypatch, *extra):
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        return [(f, t, p, c, (a[0], port, *a[2:])) for f, t, p, c, a in extra] + real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_an_address_of_metrics_host_this_host_cannot_bind_is_skipped_with_a_warning(monkeypatch):
    """localhost resolving to ::1 on a host with IPv6 disabled stopped the start with exit 78 ("cannot listen on
    localhost:9187: Cannot assign requested address") though 127.0.0.1 could serve: the others are bound."""
    port = free_port()
    _resolving(monkeypatch, NOT_HERE)
    environ = {"PGSYNAPSE_METRICS_HOST": "127.0.0.1", "PGSYNAPSE_METRICS_PORT": str(port)}
    with capture_logs() as logs:
        socks = bind_metrics(load_settings(environ=environ))
    monkeypatch.undo()  # the connections of _reachable resolve as they should
    try:
        assert [s.getsockname()[0] for s in socks] == ["127.0.0.1"]
        assert _reachable(port)["127.0.0.1"]
    finally:
        for sock in socks:
            sock.close()
    [skipped] = [e for e in logs if e["event"] == "metrics_address_skipped"]
    assert skipped["log_level"] == "warning" and skipped["address"] == "2001:db8::1", skipped


def test_metrics_host_with_no_address_this_host_can_bind_fails_and_says_each_reason(monkeypatch):
    port = free_port()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [NOT_HERE[:4] + (("2001:db8::1", port, 0, 0),)])
    environ = {"PGSYNAPSE_METRICS_HOST": "example.invalid", "PGSYNAPSE_METRICS_PORT": str(port)}
    with capture_logs() as logs, pytest.raises(ConfigError, match=rf"cannot listen on example.invalid:{port}: no "
                                               r"address of it can be bound on this host \(2001:db8::1: .+\)"):
        bind_metrics(load_settings(environ=environ))
    assert not [e for e in logs if e["event"] == "metrics_address_skipped"], logs  # not "served on its others"


def test_a_taken_metrics_port_still_fails_at_once():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        environ = {"PGSYNAPSE_METRICS_HOST": "127.0.0.1", "PGSYNAPSE_METRICS_PORT": str(port)}
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}: Address already in use"):
            bind_metrics(load_settings(environ=environ))
