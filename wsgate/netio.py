"""The thin I/O shell: the only module that reads and writes client and backend bytes.

Two endpoint kinds share one small interface so the relay has a single pump:

* :class:`RawSocket` drives a non-blocking stdlib socket with Trio's
  ``wait_readable``/``wait_writable``. Trio's own socket methods try the
  syscall, fail with EAGAIN, park, re-arm and retry on *every* call; here we
  wait first only when the previous read came up short, and send directly,
  waiting only on a partial send. That is most of the relay's speed.
* :class:`StreamEndpoint` wraps any Trio stream (used for TLS legs, since
  ``trio.SSLStream`` cannot be driven at the socket level).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable

import trio

#: The one read buffer of the process, shared by every reader: the relay's pumps
#: (tasks and reactor), handshake reads and close drains. The rule that makes
#: sharing safe: whoever reads into it consumes or copies those bytes before its
#: next await (the endpoints copy any unsent tail before waiting). 256 KiB: a
#: 64 KiB message and its header in one read; nobody zeroes a buffer per read.
SHARED_BUFFER = memoryview(bytearray(256 * 1024))

#: Errors that mean "the peer is gone" rather than "the gateway is broken".
PEER_GONE = (ConnectionError, TimeoutError, trio.BrokenResourceError, trio.ClosedResourceError)


class RawSocket:
    """A connected, non-blocking stdlib socket used directly for relaying."""

    __slots__ = ("_fd", "_half_closed", "_wait_first", "dirty", "sock")

    def __init__(self, sock: socket.socket, *, expect_data: bool = False) -> None:
        """Wrap ``sock``; ``expect_data``: bytes are likely queued already (read, then wait)."""
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._fd = sock.fileno()  # waits take the int: no fileno() call per wait
        self._wait_first = not expect_data
        self._half_closed = False
        #: True while a send was interrupted part-way: the peer may hold half a frame.
        self.dirty = False

    def recv_nowait(self, buf: memoryview) -> int:
        """Read what is queued into ``buf``: the count, 0 at end of stream, -1 if nothing is."""
        try:
            return self.sock.recv_into(buf)
        except BlockingIOError:
            return -1

    def wait_readable(self) -> Awaitable[None]:
        """Wait until :meth:`recv_nowait` has something to return.

        A plain function handing back Trio's own wait: a pump parked here holds
        no coroutine frame of ours, which is memory per idle pair.
        """
        return trio.lowlevel.wait_readable(self._fd)  # noqa: ASYNC105 (awaited by the caller)

    async def recv_into(self, buf: memoryview) -> int:
        """Read into ``buf``, waiting as needed; the count, 0 at end of stream.

        For the handshake's few reads. A read that came up short means the next
        one would most likely fail with EAGAIN, so it waits first instead.
        """
        if self._wait_first:
            await trio.lowlevel.wait_readable(self._fd)
        while (n := self.recv_nowait(buf)) < 0:
            await trio.lowlevel.wait_readable(self._fd)
        self._wait_first = n < len(buf)
        return n

    def send_nowait(self, data: memoryview) -> int:
        """Send what the socket takes now, without waiting; return the count.

        The relay's fast path: the rest (rarely any) goes through :meth:`send_all`.
        """
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send every byte; waits for writability only after a partial send.

        ``data`` may be a view of a buffer shared with other pumps, so the unsent
        tail is copied before the first wait.
        """
        view = memoryview(data)
        try:
            sent = self.sock.send(view)
        except BlockingIOError:
            sent = 0
        if sent == len(view):
            return
        rest = memoryview(bytes(view[sent:]))
        self.dirty = True
        while rest:
            await trio.lowlevel.wait_writable(self._fd)
            try:
                rest = rest[self.sock.send(rest) :]
            except BlockingIOError:
                pass
        self.dirty = False

    def half_close(self) -> None:
        """Send our FIN (nothing more will be written); reading goes on."""
        if not self._half_closed:
            self._half_closed = True
            self.sock.shutdown(socket.SHUT_WR)

    async def close(
        self, linger: float, enough: Callable[[memoryview], bool] | None = None
    ) -> None:
        """Close gracefully: half-close, read the peer's last bytes, close.

        Closing with unread bytes queued sends a RST that can destroy the close
        frame we just sent, so we read (and drop) what the peer still sends, for
        at most ``linger`` seconds, until its EOF or until ``enough(data)`` says
        the bytes seen complete the close handshake.
        """
        try:
            self.half_close()
            with trio.move_on_after(linger):
                buf = SHARED_BUFFER[: 16 * 1024]
                while True:
                    await trio.lowlevel.wait_readable(self.sock)
                    try:
                        n = self.sock.recv_into(buf)
                    except BlockingIOError:
                        continue
                    if n == 0 or (enough is not None and enough(buf[:n])):
                        break
        except OSError:
            pass
        finally:
            self.sock.close()

    def abort(self) -> None:
        """Close at once with a TCP reset."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()


class StreamEndpoint:
    """Any Trio stream (a TLS leg) behind the same interface as :class:`RawSocket`."""

    __slots__ = ("_eof", "_pending", "dirty", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.dirty = False
        # What wait_readable() received and recv_nowait() has not handed out yet.
        self._pending = memoryview(b"")
        self._eof = False

    def recv_nowait(self, buf: memoryview) -> int:
        """Hand out what :meth:`wait_readable` received: the count, 0 at end, -1 if none."""
        if not self._pending:
            return 0 if self._eof else -1
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    async def wait_readable(self) -> None:
        """Receive the next chunk (a stream cannot be read without waiting)."""
        if not self._pending and not self._eof:
            data = await self.stream.receive_some(len(SHARED_BUFFER))
            self._pending = memoryview(data)
            self._eof = not data

    async def recv_into(self, buf: memoryview) -> int:
        """Read into ``buf``, waiting as needed; the count, 0 at end of stream."""
        while (n := self.recv_nowait(buf)) < 0:
            await self.wait_readable()
        return n

    def send_nowait(self, data: memoryview) -> int:
        """Nothing: a TLS stream only sends through :meth:`send_all`."""
        return 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send every byte (copied first: ``data`` may view a shared buffer)."""
        self.dirty = True
        await self.stream.send_all(bytes(data))
        self.dirty = False

    def half_close(self) -> None:
        """Nothing to do: TLS has no half-close; :meth:`close` sends close_notify."""

    async def close(
        self, linger: float, enough: Callable[[memoryview], bool] | None = None
    ) -> None:
        """Close gracefully: send TLS close_notify, then close the transport.

        ``linger`` bounds waiting for the peer, and closing TLS never waits for
        the peer (Trio sends our close_notify and closes), so close_notify goes
        out even with ``linger=0``: without it some clients miss the end of a
        connection for seconds. The caller's deadline bounds the send.
        """
        try:
            await self.stream.aclose()
        except PEER_GONE:
            pass

    def abort(self) -> None:
        """Close at once without a TLS close_notify."""
        sock = _underlying_socket(self.stream)
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            sock.close()


Endpoint = RawSocket | StreamEndpoint


def _underlying_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def set_keepalive(
    sock: socket.socket | trio.socket.SocketType, idle: int, interval: int, probes: int
) -> None:
    """Have the kernel probe ``sock``'s peer after ``idle`` seconds of silence.

    ``probes`` unanswered probes, ``interval`` seconds apart, fail the
    connection with ETIMEDOUT, which the relay sees as the peer gone. Set on a
    listening socket, the options are inherited by the connections it accepts.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux names; other systems keep their defaults
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)


def detach(conn: trio.SocketStream | trio.socket.SocketType) -> socket.socket:
    """Take the stdlib socket out of a Trio socket or SocketStream (which is left closed)."""
    tsock = conn.socket if isinstance(conn, trio.SocketStream) else conn
    return socket.socket(tsock.family, tsock.type, tsock.proto, fileno=tsock.detach())
