"""TLSSocket, the relay's TLS endpoint, on real connected sockets with real certificates.

The end-to-end wss tests (test_handshake_e2e, test_faults) drive it through
the gateway; these pin down the endpoint's own rules: records split across
reads, several records per read, a full socket, two pumps on one socket, and
each way a TLS connection can end.
"""

from __future__ import annotations

import os
import socket
import ssl

import pytest
import trio
import trio.testing
import trustme

from wsgate.netio import SHARED_BUFFER, TLSSocket


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def connected() -> tuple[socket.socket, socket.socket]:
    """Both ends of one TCP connection on 127.0.0.1: (server, client)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client_sock = socket.create_connection(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    return server_sock, client_sock


async def tls_pair(ca: trustme.CA) -> tuple[TLSSocket, TLSSocket]:
    """A server and a client TLSSocket over one TCP connection on 127.0.0.1, handshaken."""
    server_context, client_context = contexts(ca)
    server_sock, client_sock = connected()
    server = TLSSocket(server_sock, server_context, server_side=True)
    client = TLSSocket(client_sock, client_context, server_side=False, server_hostname="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return server, client


async def read_exactly(endpoint: TLSSocket, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        n = await endpoint.recv_into(SHARED_BUFFER)
        assert n > 0, f"end of stream after {len(got)} of {size} bytes"
        got += SHARED_BUFFER[:n]
    return bytes(got)


async def test_small_and_multi_record_messages_arrive_intact(ca: trustme.CA) -> None:
    server, client = await tls_pair(ca)
    big = os.urandom(1_000_000)  # about 62 TLS records: many per socket read
    await client.send_all(b"hello")
    assert await read_exactly(server, 5) == b"hello"
    await client.send_all(big)
    assert await read_exactly(server, len(big)) == big
    await server.send_all(big[:70_000])
    assert await read_exactly(client, 70_000) == big[:70_000]
    server.abort()
    client.abort()


async def test_recv_nowait_says_minus_one_only_when_no_record_is_complete(
    ca: trustme.CA,
) -> None:
    server, client = await tls_pair(ca)
    buf = memoryview(bytearray(1024))
    assert server.recv_nowait(buf) == -1  # nothing sent yet
    # One record, written to the socket in two pieces: half a record is not data.
    client._tls.write(b"x" * 500)
    record = client._out.read()
    client.sock.send(record[:100])
    await trio.sleep(0.05)
    assert server.recv_nowait(buf) == -1
    client.sock.send(record[100:])
    await server.wait_readable()
    assert server.recv_nowait(buf) == 500
    # Three records already buffered, and a buffer smaller than them: handed out
    # in buffer-sized reads.
    for chunk in (b"a" * 600, b"b" * 600, b"c" * 600):
        await client.send_all(chunk)
    await trio.sleep(0.05)
    got = b""
    while len(got) < 1800:
        n = server.recv_nowait(buf)
        assert n > 0
        got += buf[:n]
        if len(got) < 1800:
            # The socket is drained, but whole records are buffered: a pump
            # waiting now must not wait for bytes that will never come.
            with trio.fail_after(1):
                await server.wait_readable()
    assert got == b"a" * 600 + b"b" * 600 + b"c" * 600
    assert server.recv_nowait(buf) == -1
    server.abort()
    client.abort()


async def test_a_full_socket_makes_send_all_wait_and_lose_nothing(ca: trustme.CA) -> None:
    server, client = await tls_pair(ca)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    data = os.urandom(4_000_000)
    seen_dirty = False

    async def write() -> None:
        await client.send_all(data)

    async def watch() -> None:
        nonlocal seen_dirty
        while not seen_dirty:
            seen_dirty = client.dirty
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        with trio.fail_after(5):
            await watch()  # the reader has not read: the writer is parked mid-record
        assert await read_exactly(server, len(data)) == data
    assert not client.dirty
    server.abort()
    client.abort()


async def test_both_pumps_on_one_socket_interleave_nothing(ca: trustme.CA) -> None:
    # The relay reads a TLS socket in one task and writes it in another. Each
    # direction must come out whole and in order while the other runs.
    server, client = await tls_pair(ca)
    up = os.urandom(3_000_000)
    down = os.urandom(3_000_000)
    received: dict[str, bytes] = {}

    async def send(endpoint: TLSSocket, data: bytes) -> None:
        for i in range(0, len(data), 50_000):
            await endpoint.send_all(data[i : i + 50_000])

    async def receive(endpoint: TLSSocket, size: int, key: str) -> None:
        received[key] = await read_exactly(endpoint, size)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, client, up)
        nursery.start_soon(send, server, down)
        nursery.start_soon(receive, server, len(up), "up")
        nursery.start_soon(receive, client, len(down), "down")
    assert received == {"up": up, "down": down}
    server.abort()
    client.abort()


async def test_close_sends_close_notify_and_the_peer_reads_the_end(ca: trustme.CA) -> None:
    server, client = await tls_pair(ca)
    await server.send_all(b"last words")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.close, 1.0)
        assert await read_exactly(client, 10) == b"last words"
        assert await client.recv_into(SHARED_BUFFER) == 0  # close_notify, not a reset
        await client.close(0)
    assert server.sock.fileno() == -1
    assert client.sock.fileno() == -1


async def test_a_close_with_nothing_to_wait_for_does_not_park(ca: trustme.CA) -> None:
    # The gateway closes the client leg with no linger once the client's close
    # frame is in, and a leg whose peer is already done: neither needs a deadline
    # or a park (each costs about as much as a small message relayed).
    server, client = await tls_pair(ca)
    with trio.testing.assert_no_checkpoints():
        await server.close(0)
    assert server.sock.fileno() == -1
    assert await client.recv_into(SHARED_BUFFER) == 0  # close_notify came all the same
    client.abort()
    server, client = await tls_pair(ca)
    await client.close(0)
    await trio.sleep(0.05)  # let its close_notify and FIN arrive
    with trio.testing.assert_no_checkpoints():
        await server.close(5.0)  # the peer is done: no wait for the linger
    assert server.sock.fileno() == -1


async def test_a_tcp_end_without_close_notify_is_an_end_too(ca: trustme.CA) -> None:
    server, client = await tls_pair(ca)
    # A FIN with no close_notify (a crash, or a truncation attack). shutdown,
    # not close: closing with the server's session tickets unread would reset.
    client.sock.shutdown(socket.SHUT_WR)
    with trio.fail_after(5):
        assert await server.recv_into(SHARED_BUFFER) == 0
    server.abort()
    client.abort()


async def test_a_reset_is_a_broken_resource(ca: trustme.CA) -> None:
    server, client = await tls_pair(ca)
    client.abort()
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await server.recv_into(SHARED_BUFFER)
    server.abort()


async def test_a_corrupt_record_is_a_broken_resource(ca: trustme.CA) -> None:
    server, client = await tls_pair(ca)
    client._tls.write(b"genuine")
    record = bytearray(client._out.read())
    record[-1] ^= 0xFF  # the authentication tag no longer matches
    client.sock.send(record)
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError, match="TLS"):
        await server.recv_into(SHARED_BUFFER)
    server.abort()
    client.abort()


async def test_a_failed_handshake_raises_ssl_error_and_sends_the_alert(
    ca: trustme.CA,
) -> None:
    server_context, _ = contexts(ca)
    untrusting = ssl.create_default_context()  # does not trust ca
    server_sock, client_sock = connected()
    server = TLSSocket(server_sock, server_context, server_side=True)
    client = TLSSocket(client_sock, untrusting, server_side=False, server_hostname="127.0.0.1")
    client_error: list[ssl.SSLError] = []

    async def client_side() -> None:
        try:
            await client.do_handshake()
        except ssl.SSLCertVerificationError as exc:
            client_error.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_side)
            # The server learns why from the client's alert, not from a bare reset.
            with pytest.raises(ssl.SSLError, match=r"(?i)unknown ca|certificate"):
                await server.do_handshake()
    assert client_error and client_error[0].verify_code != 0
    # Each side closed its socket itself, after its alert, without a reset.
    assert client.sock.fileno() == -1
    assert server.sock.fileno() == -1
