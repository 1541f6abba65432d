"""A real HAProxy (the Debian package, ``make haproxy``) in front of wsgate.

Two HAProxy frontends: TCP mode with ``send-proxy-v2`` to a ``proxy_protocol``
gateway, and HTTP mode with ``option forwardfor`` to a gateway that trusts it.
Clients connect from distinct 127.0.0.x source addresses, so the gateway can
only tell them apart through what HAProxy says: ``ip-filter`` and a per-IP
rate limit apply to them, the handshake log names them, and the backend's
``X-Forwarded-For`` starts with them.

HAProxy 2.6 refuses ``bind 127.0.0.1:0``: the test binds each listening socket
itself (port 0) and hands it over as ``bind fd@N``.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

import wsgate

from .helpers import BackendRequest, RawBackend, accept_response, make_config, wait_until
from .test_client_address_e2e import exchange, upgrade

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

pytestmark = pytest.mark.skipif(
    not os.access(HAPROXY, os.X_OK), reason="haproxy is not installed (make haproxy)"
)

POLICIES = [
    {"policy": "ip-filter", "action": "forbid", "addresses": ["127.0.0.3"]},
    {
        "policy": "rate-limit-by-key",
        "calls": 1,
        "renewal_period": 60,
        "counter_key": "ip",
    },
]


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


async def _accepting(request: BackendRequest, stream: trio.SocketStream, _early: bytes) -> None:
    await stream.send_all(accept_response(request))
    await stream.receive_some(1)


async def _gateway(nursery: trio.Nursery, backend: RawBackend, **gw: Any) -> wsgate.Gateway:
    config = make_config(
        [{"name": "echo", "path": "echo", "service_url": backend.url, "policies": POLICIES}],
        trusted_proxies=["127.0.0.1"],
        **gw,
    )
    gateway: wsgate.Gateway = await nursery.start(wsgate.Gateway(config).run)
    return gateway


class Haproxy:
    """Ports of the two frontends, and the gateways and backend behind them."""

    tcp_port: int
    http_port: int
    proxied: wsgate.Gateway  # behind send-proxy-v2
    forwarded: wsgate.Gateway  # behind option forwardfor
    backend: RawBackend


@pytest.fixture
async def haproxy(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Haproxy]:
    setup = Haproxy()
    setup.backend = await nursery.start(RawBackend(_accepting).serve)
    setup.proxied = await _gateway(nursery, setup.backend, proxy_protocol=True)
    setup.forwarded = await _gateway(nursery, setup.backend)
    tcp, http = _listening_socket(), _listening_socket()
    setup.tcp_port, setup.http_port = tcp.getsockname()[1], http.getsockname()[1]
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"""
global
    maxconn 200

defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout tunnel 30s

frontend tcp_in
    mode tcp
    bind fd@{tcp.fileno()}
    default_backend proxied

backend proxied
    mode tcp
    server gw 127.0.0.1:{setup.proxied.addresses[0][1]} send-proxy-v2

frontend http_in
    mode http
    option forwardfor
    bind fd@{http.fileno()}
    default_backend forwarded

backend forwarded
    mode http
    server gw 127.0.0.1:{setup.forwarded.addresses[0][1]}
"""
    )
    process = await trio.lowlevel.open_process(
        [HAPROXY, "-db", "-f", str(config)], pass_fds=(tcp.fileno(), http.fileno())
    )
    tcp.close()
    http.close()
    try:
        yield setup
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


def _callers(logs: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(r["caller_ip_address"], r["response_code"]) for r in logs if r["event"] == "handshake"]


@pytest.mark.parametrize("frontend", ["tcp", "http"])
async def test_policies_and_logs_see_the_client_behind_haproxy(
    haproxy: Haproxy, frontend: str
) -> None:
    port = haproxy.tcp_port if frontend == "tcp" else haproxy.http_port
    with capture_logs() as logs:
        allowed = await exchange(port, upgrade(), source="127.0.0.2")
        again = await exchange(port, upgrade(), source="127.0.0.2")  # the per-IP limit
        forbidden = await exchange(port, upgrade(), source="127.0.0.3")  # ip-filter
        other = await exchange(port, upgrade(), source="127.0.0.4")  # its own counter
    assert [allowed[0], again[0], forbidden[0], other[0]] == [101, 429, 403, 101]
    assert _callers(logs) == [
        ("127.0.0.2", 101),
        ("127.0.0.2", 429),
        ("127.0.0.3", 403),
        ("127.0.0.4", 101),
    ]
    # The backend's X-Forwarded-For starts with the client; HAProxy's own hop
    # follows when it spoke HTTP (it is the peer that sent the request).
    expected = ["127.0.0.2", "127.0.0.4"]
    if frontend == "http":
        expected = [f"{ip}, 127.0.0.1" for ip in expected]
    assert [r.header("x-forwarded-for") for r in haproxy.backend.requests] == expected


async def test_a_client_spoofing_x_forwarded_for_through_haproxy_gains_nothing(
    haproxy: Haproxy,
) -> None:
    spoof = upgrade([("X-Forwarded-For", "127.0.0.9")])
    with capture_logs() as logs:
        status, _ = await exchange(haproxy.http_port, spoof, source="127.0.0.3")
    assert status == 403  # still 127.0.0.3, whom ip-filter forbids
    assert _callers(logs) == [("127.0.0.3", 403)]


async def test_a_direct_client_of_the_proxy_protocol_listener_is_refused(
    haproxy: Haproxy,
) -> None:
    port = haproxy.proxied.addresses[0][1]
    assert await exchange(port, upgrade(), source="127.0.0.2") == (0, b"")
    await wait_until(lambda: bool(haproxy.proxied.stats().proxy_protocol_refused))
    assert haproxy.proxied.stats().proxy_protocol_refused == {"untrusted": 1}
    # Even from the trusted address, HTTP without the header is never parsed.
    assert await exchange(port, upgrade(), source="127.0.0.1") == (0, b"")
    await wait_until(lambda: sum(haproxy.proxied.stats().proxy_protocol_refused.values()) == 2)
    assert haproxy.proxied.stats().proxy_protocol_refused == {"untrusted": 1, "not_proxy": 1}
    assert haproxy.backend.requests == []
