"""The client's address behind proxies, through a running gateway on real sockets.

PROXY headers are written by hand here (every version and family, broken ones,
slow ones); tests/test_haproxy_e2e.py puts a real HAProxy in front instead.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import trio
import trustme
from structlog.testing import capture_logs

import wsgate
from wsgate.metrics import GatewayMetrics

from .helpers import (
    BackendRequest,
    RawBackend,
    accept_response,
    make_config,
    read_response,
    wait_until,
)
from .test_handshake_e2e import write_cert
from .test_proxyproto import tcp4, tcp6, v2

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade(headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [
        "GET /echo HTTP/1.1",
        "Host: gateway.test",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers or []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def accepting(request: BackendRequest, stream: trio.SocketStream, _early: bytes) -> None:
    await stream.send_all(accept_response(request))
    await stream.receive_some(1)  # until the gateway closes


async def start(
    nursery: trio.Nursery, backend: RawBackend, *, api: dict[str, Any] | None = None, **gw: Any
) -> tuple[wsgate.Gateway, GatewayMetrics]:
    config = make_config(
        [{"name": "echo", "path": "echo", "service_url": backend.url, **(api or {})}], **gw
    )
    metrics = GatewayMetrics()
    gateway: wsgate.Gateway = await nursery.start(wsgate.Gateway(config, observers=[metrics]).run)
    metrics.attach(gateway)
    return gateway, metrics


async def exchange(port: int, data: bytes, *, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """Send ``data`` from ``source``; the response status (0: closed unanswered) and its bytes."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(data)
        received = bytearray()
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
                if b"\r\n\r\n" in received:
                    break
        except trio.BrokenResourceError:
            pass
    if not received:
        return 0, b""
    return int(received.split(b" ", 2)[1]), bytes(received)


def handshakes(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in logs if r["event"] == "handshake"]


# -- PROXY protocol ---------------------------------------------------------------------


async def test_proxy_headers_of_every_kind_name_the_client(nursery: trio.Nursery) -> None:
    backend = await nursery.start(RawBackend(accepting).serve)
    gw, _ = await start(nursery, backend, proxy_protocol=True, trusted_proxies=["127.0.0.1"])
    port = gw.addresses[0][1]
    cases = [
        (b"PROXY TCP4 192.0.2.10 10.0.0.1 40000 80\r\n", "192.0.2.10"),
        (b"PROXY TCP6 2001:db8::10 ::1 40000 80\r\n", "2001:db8::10"),
        (v2(addresses=tcp4("198.51.100.20", "10.0.0.1", 1, 80)), "198.51.100.20"),
        (v2(family=0x2, addresses=tcp6("2001:db8::20", "::1", 1, 80)), "2001:db8::20"),
        # TLVs are skipped; LOCAL and UNKNOWN name nobody: the balancer is the client.
        (v2(addresses=tcp4("192.0.2.30", "10.0.0.1", 1, 80), tlvs=b"\x05\x00\x02id"), "192.0.2.30"),
        (v2(command=0x0, family=0x0, protocol=0x0), "127.0.0.1"),
        (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
    ]
    with capture_logs() as logs:
        for header, _ in cases:
            status, _ = await exchange(port, header + upgrade())
            assert status == 101
    assert [r["caller_ip_address"] for r in handshakes(logs)] == [ip for _, ip in cases]
    # The backend's X-Forwarded-For ends with the client the header named.
    assert [r.header("x-forwarded-for") for r in backend.requests] == [ip for _, ip in cases]


async def test_header_and_request_split_across_reads(nursery: trio.Nursery) -> None:
    backend = await nursery.start(RawBackend(accepting).serve)
    gw, _ = await start(nursery, backend, proxy_protocol=True, trusted_proxies=["127.0.0.1"])
    data = b"PROXY TCP4 192.0.2.10 10.0.0.1 40000 80\r\n" + upgrade()
    async with await trio.open_tcp_stream("127.0.0.1", gw.addresses[0][1]) as stream:
        for cut in (5, 30, 50):  # mid-signature, mid-header, mid-request
            await stream.send_all(data[:cut])
            data = data[cut:]
            await trio.sleep(0.05)
        await stream.send_all(data)
        response, _ = await read_response(stream)
    assert response.status == 101
    assert backend.requests[0].header("x-forwarded-for") == "192.0.2.10"


async def test_a_direct_client_is_refused_unanswered_and_counted(nursery: trio.Nursery) -> None:
    backend = await nursery.start(RawBackend(accepting).serve)
    gw, metrics = await start(nursery, backend, proxy_protocol=True, trusted_proxies=["127.0.0.1"])
    port = gw.addresses[0][1]
    with capture_logs() as logs:
        for _ in range(3):
            assert await exchange(port, upgrade()) == (0, b"")  # never read as HTTP
        await wait_until(lambda: gw.stats().handshakes_in_progress == 0)
    assert backend.requests == []
    assert handshakes(logs) == []
    refused = [r for r in logs if r["event"] == "proxy_protocol_refused"]
    # Rate-limited: one line for the three, the next says how many it stood for.
    assert [(r["reason"], r["peer_ip_address"], r["suppressed"]) for r in refused] == [
        ("not_proxy", "127.0.0.1", 0)
    ]
    assert gw.stats().proxy_protocol_refused == {"not_proxy": 3}
    assert b'wsgate_proxy_protocol_refused_total{reason="not_proxy"} 3.0' in metrics.exposition()
    # The gateway serves on.
    status, _ = await exchange(port, b"PROXY UNKNOWN\r\n" + upgrade())
    assert status == 101


async def test_a_peer_outside_trusted_proxies_is_refused_before_a_byte_is_read(
    nursery: trio.Nursery,
) -> None:
    backend = await nursery.start(RawBackend(accepting).serve)
    gw, _ = await start(nursery, backend, proxy_protocol=True, trusted_proxies=["127.0.0.2"])
    port = gw.addresses[0][1]
    header = b"PROXY TCP4 192.0.2.10 10.0.0.1 40000 80\r\n"
    assert await exchange(port, header + upgrade(), source="127.0.0.1") == (0, b"")
    assert gw.stats().proxy_protocol_refused == {"untrusted": 1}
    status, _ = await exchange(port, header + upgrade(), source="127.0.0.2")
    assert status == 101


async def test_broken_and_slow_headers_are_refused(nursery: trio.Nursery) -> None:
    backend = await nursery.start(RawBackend(accepting).serve)
    gw, _ = await start(
        nursery,
        backend,
        proxy_protocol=True,
        trusted_proxies=["127.0.0.1"],
        handshake_timeout=0.3,
    )
    port = gw.addresses[0][1]
    assert await exchange(port, b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n" + upgrade()) == (0, b"")
    assert await exchange(port, v2(addresses=b"\x01\x02\x03\x04")) == (0, b"")
    # Half a header, then silence: handshake_timeout closes it, unanswered.
    started = trio.current_time()
    assert await exchange(port, b"PROXY TCP4 1.2.3.4") == (0, b"")
    assert trio.current_time() - started >= 0.3
    await wait_until(lambda: sum(gw.stats().proxy_protocol_refused.values()) == 3)
    assert gw.stats().proxy_protocol_refused == {"malformed": 2, "timeout": 1}


async def test_a_header_then_a_slow_request_shares_one_handshake_timeout(
    nursery: trio.Nursery,
) -> None:
    backend = await nursery.start(RawBackend(accepting).serve)
    gw, _ = await start(
        nursery, backend, proxy_protocol=True, trusted_proxies=["127.0.0.1"], handshake_timeout=0.3
    )
    status, _ = await exchange(
        gw.addresses[0][1], b"PROXY TCP4 192.0.2.10 10.0.0.1 1 80\r\nGET /echo HTTP/1.1\r\n"
    )
    assert status == 408  # the header was good: the request is HTTP's to refuse


async def test_a_bare_tcp_check_is_not_logged(nursery: trio.Nursery) -> None:
    backend = await nursery.start(RawBackend(accepting).serve)
    gw, _ = await start(nursery, backend, proxy_protocol=True, trusted_proxies=["127.0.0.1"])
    with capture_logs() as logs:
        sock = socket.create_connection(("127.0.0.1", gw.addresses[0][1]))
        sock.close()
        status, _ = await exchange(gw.addresses[0][1], b"PROXY UNKNOWN\r\n" + upgrade())
    assert status == 101
    assert [r["event"] for r in logs if "proxy" in r["event"]] == []
    assert gw.stats().proxy_protocol_refused == {}


async def test_proxy_header_before_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The header precedes the ClientHello; bytes read past it reach TLS."""
    backend = await nursery.start(RawBackend(accepting).serve)
    ca = trustme.CA()
    chain, key = write_cert(ca.issue_cert("127.0.0.1"), tmp_path)
    gw, _ = await start(
        nursery,
        backend,
        proxy_protocol=True,
        trusted_proxies=["127.0.0.1"],
        tls={"certificate": str(chain), "private_key": str(key)},
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    raw = await trio.open_tcp_stream("127.0.0.1", gw.addresses[0][1])
    tls = trio.SSLStream(raw, context, server_hostname="127.0.0.1")
    # The header and the ClientHello in one segment, as a balancer may send them.
    header = v2(addresses=tcp4("192.0.2.44", "10.0.0.1", 1, 443))
    await raw.send_all(header)
    async with tls:
        await tls.do_handshake()
        await tls.send_all(upgrade())
        response, _ = await read_response(tls)
    assert response.status == 101
    assert backend.requests[0].header("x-forwarded-for") == "192.0.2.44"
    assert backend.requests[0].header("x-forwarded-proto") == "wss"


# -- forwarding headers -----------------------------------------------------------------


async def test_x_forwarded_for_from_a_trusted_peer(nursery: trio.Nursery) -> None:
    backend = await nursery.start(RawBackend(accepting).serve)
    gw, _ = await start(nursery, backend, trusted_proxies=["127.0.0.1", "10.0.0.0/8"])
    port = gw.addresses[0][1]
    spoofed = [("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 10.1.1.1")]
    with capture_logs() as logs:
        assert (await exchange(port, upgrade([*spoofed, ("X-Forwarded-Proto", "https")])))[0] == 101
        # From a peer that is not trusted the header names nobody.
        assert (await exchange(port, upgrade(spoofed), source="127.0.0.5"))[0] == 101
    assert [r["caller_ip_address"] for r in handshakes(logs)] == ["198.51.100.7", "127.0.0.5"]
    trusted, untrusted = backend.requests
    # The chain grows by the peer, whatever was decided: nothing is dropped.
    assert trusted.header("x-forwarded-for") == "6.6.6.6, 198.51.100.7, 10.1.1.1, 127.0.0.1"
    assert trusted.header("x-forwarded-proto") == "wss"  # the balancer terminated TLS
    assert untrusted.header("x-forwarded-for") == "6.6.6.6, 198.51.100.7, 10.1.1.1, 127.0.0.5"
    assert untrusted.header("x-forwarded-proto") == "ws"


async def test_forwarded_header_when_configured(nursery: trio.Nursery) -> None:
    backend = await nursery.start(RawBackend(accepting).serve)
    gw, _ = await start(
        nursery, backend, trusted_proxies=["127.0.0.1"], forwarded_header="forwarded"
    )
    headers = [
        ("X-Forwarded-For", "6.6.6.6"),  # not the configured header: ignored
        ("Forwarded", 'for="[2001:db8::7]:4711";proto=https'),
    ]
    with capture_logs() as logs:
        assert (await exchange(gw.addresses[0][1], upgrade(headers)))[0] == 101
    assert handshakes(logs)[0]["caller_ip_address"] == "2001:db8::7"


async def test_ip_filter_and_pair_see_the_client(nursery: trio.Nursery) -> None:
    async def holding(request: BackendRequest, stream: trio.SocketStream, _early: bytes) -> None:
        await stream.send_all(accept_response(request))
        await trio.sleep_forever()

    backend = await nursery.start(RawBackend(holding).serve)
    gw, _ = await start(
        nursery,
        backend,
        trusted_proxies=["127.0.0.1"],
        api={
            "policies": [{"policy": "ip-filter", "action": "forbid", "addresses": ["6.6.6.0/24"]}]
        },
    )
    port = gw.addresses[0][1]
    status, _ = await exchange(port, upgrade([("X-Forwarded-For", "6.6.6.6")]))
    assert status == 403
    # Forbidden only as the client: a spoofed entry left of the real one is no alibi...
    status, _ = await exchange(port, upgrade([("X-Forwarded-For", "192.0.2.1, 6.6.6.6")]))
    assert status == 403
    # ... nor in front of an allowed client.
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(upgrade([("X-Forwarded-For", "6.6.6.6, 192.0.2.1")]))
        response, _ = await read_response(stream)
        assert response.status == 101
        await wait_until(lambda: len(gw.pairs) == 1)
        assert [pair.caller_ip for pair in gw.pairs.values()] == ["192.0.2.1"]
