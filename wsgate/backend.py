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
import trio
from wsproto.utilities import generate_nonce

from .addresses import BackendURL
from .errors import BackendProtocolError, BackendRejected
from .handshake import (
    BackendAccept,
    Headers,
    ResponseHead,
    ResponseParser,
    Upgrade,
    backend_request,
    check_backend_101,
)
from .netio import SHARED_BUFFER, Endpoint, RawSocket, TLSSocket, detach, set_keepalive

#: At most this much of a refusing backend's body is relayed to the client.
MAX_REJECTION_BODY = 64 * 1024
#: Seconds a backend that refused the upgrade has to close its end after our FIN.
#: Most have closed by then (``socket.end(...)`` sends the FIN with the answer);
#: the bound is for one that leaves the socket open.
REJECTION_LINGER = 1.0


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
    key = generate_nonce().decode()
    # Built (and checked) before dialling: a request that cannot be sent costs no connection.
    request = backend_request(target, backend.host_header, key, headers)
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
        accept, trailing = await _upgrade(endpoint, request, key, upgrade)
    except _Answered as answered:
        # A complete answer (or an orderly close): the backend did nothing
        # wrong, so it gets our FIN, not a reset. A reset makes the peer's next
        # read fail with ECONNRESET, which kills a Node backend that refused
        # with socket.end() and has no 'error' listener on the socket.
        # Shielded and bounded on its own: the caller's deadline running out
        # now would turn the backend's answer into a 504.
        with trio.move_on_after(REJECTION_LINGER) as scope:
            scope.shield = True
            await endpoint.close(REJECTION_LINGER)
        raise answered.error from None
    except BaseException:
        # Invalid HTTP, a bad 101, an answer cut short by its time or size
        # limit, a timeout or cancellation: the exchange was cut short, and a
        # reset is the honest end of it.
        endpoint.abort()
        raise
    return BackendConnection(endpoint, accept, trailing)


class _Answered(Exception):
    """The backend ended the exchange in order: a whole non-101 answer, or a FIN.

    Raised inside :func:`open_backend` only, which closes the connection
    gracefully and raises ``error``.
    """

    def __init__(self, error: BackendRejected | BackendProtocolError) -> None:
        super().__init__(str(error))
        self.error = error


async def dial_tcp(host: str, port: int) -> socket.socket:
    """TCP to the backend, as a plain non-blocking socket for the relay.

    An IP literal is dialled directly: no happy-eyeballs nursery, and none of
    Trio's socket layer, whose address checks cost a handshake more than the
    connect itself.
    """
    family = _ip_family(host)
    if family is None:
        return detach(await trio.open_tcp_stream(host, port))
    sock = socket.socket(family)
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


@functools.lru_cache(maxsize=1024)
def _ip_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for an IP literal, None for a name (parsed once per backend)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


async def _upgrade(
    endpoint: Endpoint, request: bytes, key: str, upgrade: Upgrade
) -> tuple[BackendAccept, bytes]:
    await endpoint.send_all(request)
    parser = ResponseParser()
    buf = SHARED_BUFFER[: 16 * 1024]
    head = None
    while head is None:
        n = await endpoint.recv_into(buf)
        try:
            head = parser.feed(bytes(buf[:n]))
        except BackendProtocolError as exc:
            if n == 0:  # closed before a whole answer: in order, though a 502
                raise _Answered(exc) from None
            raise
    if head.status == 101:
        return check_backend_101(head.headers, key=key, upgrade=upgrade), head.trailing
    rejection, complete = await _rejection(parser, head, endpoint, buf)
    raise _Answered(rejection) if complete else rejection


async def _rejection(
    parser: ResponseParser, head: ResponseHead, endpoint: Endpoint, buf: memoryview
) -> tuple[BackendRejected, bool]:
    """The refusal to relay, and whether its body was read to the end.

    The body gets a second and ``MAX_REJECTION_BODY`` bytes; one cut short by
    either limit, or broken mid-way, is relayed as far as it came.
    """
    with trio.move_on_after(1.0):
        while not head.complete and len(head.body) <= MAX_REJECTION_BODY:
            n = await endpoint.recv_into(buf)
            try:
                head = parser.feed(bytes(buf[:n])) or head
            except BackendProtocolError:
                break
            if n == 0:
                break
    rejection = BackendRejected(
        head.status,
        f"backend refused the handshake with {head.status}",
        body=head.body[:MAX_REJECTION_BODY],
        headers=head.headers,
    )
    return rejection, head.complete and len(head.body) <= MAX_REJECTION_BODY
