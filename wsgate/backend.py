"""Opening the backend leg: TCP (and TLS), then the client side of the upgrade."""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import ssl
from pathlib import Path

import attrs
import h11
import trio
from wsproto.utilities import generate_nonce

from .config import BackendURL
from .errors import BackendProtocolError, BackendRejected
from .handshake import (
    MAX_REQUEST_HEAD,
    BackendAccept,
    Headers,
    Upgrade,
    check_backend_101,
    describe_http_error,
)
from .netio import SHARED_BUFFER, Endpoint, RawSocket, TLSSocket, detach, set_keepalive

#: At most this much of a refusing backend's body is relayed to the client.
MAX_REJECTION_BODY = 64 * 1024


@attrs.frozen
class BackendConnection:
    """An upgraded backend connection, ready to relay."""

    endpoint: Endpoint
    accept: BackendAccept
    trailing: bytes  # frames the backend sent right behind its 101


@functools.cache
def client_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """A verifying TLS context (hostname checked) trusting ``ca_file`` or the system store."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def open_backend(
    backend: BackendURL,
    target: str,
    headers: Headers,
    upgrade: Upgrade,
    *,
    ca_file: Path | None,
    keepalive: tuple[int, int, int] | None = None,
) -> BackendConnection:
    """Connect to ``backend`` and complete its opening handshake.

    ``keepalive``: (idle, interval, probes) for :func:`~wsgate.netio.set_keepalive`.
    Raises :class:`~wsgate.errors.BackendRejected` or
    :class:`~wsgate.errors.BackendProtocolError` for the backend's answer, and
    the foreign I/O errors of connecting as they are: the caller enters
    :func:`~wsgate.errors.map_backend_errors` and, inside it,
    ``trio.fail_after(backend_connect_timeout)``, so that one boundary maps
    both.
    """
    conn = await dial_tcp(backend.host, backend.port)
    endpoint: Endpoint
    if backend.secure:
        endpoint = TLSSocket(
            conn, client_ssl_context(ca_file), server_side=False, server_hostname=backend.host
        )
    else:
        endpoint = RawSocket(conn)
    try:
        if keepalive is not None:
            set_keepalive(conn, *keepalive)
        if isinstance(endpoint, TLSSocket):
            await endpoint.do_handshake()
        accept, trailing = await _upgrade(endpoint, backend, target, headers, upgrade)
    except BaseException:
        endpoint.abort()
        raise
    return BackendConnection(endpoint, accept, trailing)


async def dial_tcp(host: str, port: int) -> socket.socket:
    """TCP to the backend, as a plain non-blocking socket for the relay.

    An IP literal is dialled directly: no happy-eyeballs nursery, and none of
    Trio's socket layer, whose address checks cost a handshake more than the
    connect itself.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return detach(await trio.open_tcp_stream(host, port))
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET)
    try:
        sock.setblocking(False)
        error = sock.connect_ex((host, port))
        if error == errno.EINPROGRESS:
            try:
                # A backend on this host (loopback, a sidecar) has accepted by now:
                # asking costs a syscall, parking until writable costs far more.
                sock.getpeername()
                error = 0
            except OSError:
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return sock


async def _upgrade(
    endpoint: Endpoint, backend: BackendURL, target: str, headers: Headers, upgrade: Upgrade
) -> tuple[BackendAccept, bytes]:
    key = generate_nonce().decode()
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_REQUEST_HEAD)
    own = [
        ("Host", backend.host_header),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13"),
    ]
    request = h11.Request(
        method="GET",
        target=target,
        # The client's values were decoded as latin-1 (bytes 0x80-0xFF are legal in
        # a field value): encode them back byte for byte. Given str, h11 encodes as
        # ASCII and fails the handshake with a 500.
        headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in [*own, *headers]],
    )
    data = conn.send(request)
    assert data is not None
    await endpoint.send_all(data)
    buf = SHARED_BUFFER[: 16 * 1024]
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BackendProtocolError(
                f"backend answered with invalid HTTP: {describe_http_error(exc)}"
            ) from None
        if event is h11.NEED_DATA:
            n = await endpoint.recv_into(buf)
            conn.receive_data(bytes(buf[:n]))
        elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            response_headers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers
            ]
            accept = check_backend_101(response_headers, key=key, upgrade=upgrade)
            return accept, conn.trailing_data[0]
        elif isinstance(event, h11.Response):
            raise await _rejection(conn, endpoint, event, buf)
        elif isinstance(event, h11.ConnectionClosed):
            raise BackendProtocolError("backend closed the connection during the handshake")
        # Other 1xx responses are skipped, as RFC 9110 15.2 allows.


async def _rejection(
    conn: h11.Connection, endpoint: Endpoint, response: h11.Response, buf: memoryview
) -> BackendRejected:
    body = bytearray()
    with trio.move_on_after(1.0):
        while len(body) < MAX_REJECTION_BODY:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                n = await endpoint.recv_into(buf)
                conn.receive_data(bytes(buf[:n]))
            elif isinstance(event, h11.Data):
                body += event.data
            else:
                break
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers]
    return BackendRejected(
        response.status_code,
        f"backend refused the handshake with {response.status_code}",
        body=bytes(body[:MAX_REJECTION_BODY]),
        headers=headers,
    )
