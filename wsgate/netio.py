"""The thin I/O shell: the only module that reads and writes client and backend bytes.

Two endpoint kinds share one small interface so the relay has a single pump:

* :class:`RawSocket` drives a non-blocking stdlib socket with Trio's
  ``wait_readable``/``wait_writable``. Trio's own socket methods try the
  syscall, fail with EAGAIN, park, re-arm and retry on *every* call; here we
  wait first only when the previous read came up short, and send directly,
  waiting only on a partial send. That is most of the relay's speed.
* :class:`TLSSocket` is the same for TLS legs: ``ssl.MemoryBIO`` on the raw
  socket (``trio.SSLStream`` cannot be driven at the socket level).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
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

    def __init__(self, sock: socket.socket) -> None:
        """Wrap ``sock``."""
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._fd = sock.fileno()  # waits take the int: no fileno() call per wait
        # recv_into's reads follow a recv_nowait or a request just sent: wait first.
        self._wait_first = True
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
            buf = SHARED_BUFFER[: 16 * 1024]
            # Read before waiting: a peer that closed as it answered our close has
            # its EOF queued already; then neither a park nor a deadline is needed
            # (nor with no linger at all: a deadline of 0 would only park to cancel).
            if not _drained(self.recv_nowait(buf), buf, enough) and linger > 0:
                with trio.move_on_after(linger):
                    while True:
                        await trio.lowlevel.wait_readable(self._fd)
                        if _drained(self.recv_nowait(buf), buf, enough):
                            break
        except OSError:
            pass
        finally:
            self.sock.close()

    def abort(self) -> None:
        """Close at once with a TCP reset."""
        _reset(self.sock)


def _drained(n: int, buf: memoryview, enough: Callable[[memoryview], bool] | None) -> bool:
    """Whether a closing peer is done, after a read of ``n`` bytes into ``buf`` (-1: none)."""
    return n == 0 or (n > 0 and enough is not None and enough(buf[:n]))


class TLSSocket:
    """TLS on a non-blocking stdlib socket, through :class:`ssl.MemoryBIO`.

    The same fast path as :class:`RawSocket` for wss legs: the pump waits on the
    socket itself, reads ciphertext straight into the incoming BIO and decrypts
    synchronously, with no task switch or lock per chunk, where
    ``trio.SSLStream`` costs several times a plain echo's CPU. Every TLS byte
    produced (by ``write``, a handshake step, or an answer to the peer's
    post-handshake messages) goes through one ordered backlog, so bytes written
    from the two pumps (one reads this socket, the other writes it) never
    interleave.
    """

    __slots__ = ("_backlog", "_eof", "_fd", "_in", "_more", "_out", "_tls", "dirty", "sock")

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        initial: bytes = b"",
    ) -> None:
        """Wrap ``sock``; call :meth:`do_handshake` before anything else.

        ``initial``: ciphertext already read from ``sock`` (behind a PROXY header).
        """
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._fd = sock.fileno()
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        if initial:
            self._in.write(initial)
        self._tls = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self._backlog = bytearray()  # ciphertext the socket has not taken yet, in order
        self._eof = False  # close_notify or the end of the TCP stream seen
        # The last read filled its buffer: whole records may wait in the BIO with
        # nothing left on the socket to say so (a request read, say, into 8 KiB).
        self._more = False
        #: True while ciphertext waits for the socket: the peer may hold half a record.
        self.dirty = False

    async def do_handshake(self) -> None:
        """Run the TLS handshake; raises :class:`ssl.SSLError` when it fails.

        On failure the alert saying why is sent and the socket closed, without
        the reset an :meth:`abort` would send, which could destroy the alert.
        The caller bounds the handshake with a cancel scope.
        """
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                # Read before parking: the ClientHello is usually queued by the
                # time the connection is accepted (a park costs ~85,000 instructions).
                if not self._fill():
                    await trio.lowlevel.wait_readable(self._fd)
                    self._fill()
            except ssl.SSLError:
                with contextlib.suppress(trio.BrokenResourceError):
                    self.push_nowait()
                self.sock.close()
                raise
            else:
                await self._flush()
                return

    def recv_nowait(self, buf: memoryview) -> int:
        """Decrypt what is queued into ``buf``: the count, 0 at end, -1 if nothing is.

        -1 only when no complete record is buffered, so waiting on the socket
        is then right.
        """
        got = self._decrypt(buf) if self._in.pending or self._tls.pending() else 0
        if got == 0 and not self._eof:
            if not self._fill():
                return -1
            got = self._decrypt(buf)
        if got:
            return got
        return 0 if self._eof else -1

    def wait_readable(self) -> Awaitable[None]:
        """Wait until :meth:`recv_nowait` may have something (see its -1 rule)."""
        if self._more:
            return trio.lowlevel.checkpoint()  # noqa: ASYNC105 (awaited by the caller)
        return trio.lowlevel.wait_readable(self._fd)  # noqa: ASYNC105 (awaited by the caller)

    async def recv_into(self, buf: memoryview) -> int:
        """Read into ``buf``, waiting as needed; the count, 0 at end of stream."""
        while (n := self.recv_nowait(buf)) < 0:
            await trio.lowlevel.wait_readable(self._fd)
        return n

    def send_nowait(self, data: memoryview) -> int:
        """Nothing: :meth:`send_all` returns without waiting when the socket takes it all."""
        return 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send every byte; waits only while the socket is full."""
        if not self.write_nowait(data):
            await self._flush()

    def write_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Encrypt ``data`` and send what the socket takes now; True if nothing waits.

        Otherwise the rest waits, in order, for :meth:`push_nowait` (the
        reactor's send; the pump's is :meth:`send_all`).
        """
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc
        return self.push_nowait()

    def push_nowait(self) -> bool:
        """Send what the socket takes of the ciphertext waiting; True when none is left."""
        if self._out.pending:
            if self._backlog:
                self._backlog += self._out.read()
            else:  # the usual case: no copy unless the socket is full
                data = self._out.read()
                try:
                    sent = self.sock.send(data)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise trio.BrokenResourceError(f"TLS transport: {exc}") from exc
                if sent == len(data):
                    return True
                self._backlog += memoryview(data)[sent:]
                return False
        if self._backlog:
            self._push()
        return not self._backlog

    @property
    def buffered(self) -> bool:
        """Whole records may wait in the TLS object: read before waiting on the socket."""
        return self._more

    def half_close(self) -> None:
        """Nothing to do: TLS has no half-close; :meth:`close` sends close_notify."""

    async def close(
        self, linger: float, enough: Callable[[memoryview], bool] | None = None
    ) -> None:
        """Close gracefully: close_notify, FIN, read the peer's last bytes, close.

        close_notify goes out even with ``linger=0`` (without it some clients
        miss the end of a connection for seconds); the caller's deadline bounds
        that send. Then, as :meth:`RawSocket.close` does, read and drop what the
        peer still sends for at most ``linger`` seconds, until its EOF or until
        ``enough(data)`` says the bytes seen complete the close handshake.
        """
        try:
            try:
                self._tls.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: ours is queued; the peer's is not needed
            await self._flush()
            self.sock.shutdown(socket.SHUT_WR)
            buf = SHARED_BUFFER[: 16 * 1024]
            # As RawSocket.close: read before waiting, and enter a deadline only to wait.
            if not _drained(self.recv_nowait(buf), buf, enough) and linger > 0:
                with trio.move_on_after(linger):
                    while True:
                        await self.wait_readable()
                        if _drained(self.recv_nowait(buf), buf, enough):
                            break
        except (OSError, trio.BrokenResourceError):
            pass
        finally:
            self.sock.close()

    def abort(self) -> None:
        """Close at once with a TCP reset, without close_notify."""
        _reset(self.sock)

    # -- the ciphertext side -------------------------------------------------------
    def _fill(self) -> bool:
        """Move what the socket has queued into the incoming BIO; False if nothing was."""
        try:
            n = self.sock.recv_into(_CIPHERTEXT)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise trio.BrokenResourceError(f"TLS transport: {exc}") from exc
        if n:
            self._in.write(_CIPHERTEXT[:n])
        else:
            self._in.write_eof()
        return True

    def _decrypt(self, buf: memoryview) -> int:
        """Decrypt the complete records buffered, as much as ``buf`` holds."""
        got = 0
        self._more = False
        try:
            while got < len(buf):
                # With a buffer, read() returns the count (typeshed says bytes).
                n: int = self._tls.read(len(buf) - got, buf[got:])  # type: ignore[assignment]
                if n == 0:  # the peer's close_notify
                    self._eof = True
                    break
                got += n
                if not self._in.pending and not self._tls.pending():
                    break
            else:
                self._more = True  # buf is full: more may be buffered
        except ssl.SSLWantReadError:
            pass  # the rest of a record is still on its way
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self._eof = True  # close_notify, or the TCP stream ended without one
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc
        if self._out.pending:  # an answer to a post-handshake message (a key update)
            # If the socket is full, the rest waits in the backlog for this leg's
            # next write. That is soon enough: RFC 8446 4.6.3 asks for our
            # KeyUpdate before our next application data, which the backlog's
            # order guarantees, and the peer does not wait for it.
            self.push_nowait()
        return got

    def _push(self) -> None:
        """Send what the socket takes of the backlog now."""
        try:
            sent = self.sock.send(self._backlog)
        except BlockingIOError:
            return
        except OSError as exc:
            raise trio.BrokenResourceError(f"TLS transport: {exc}") from exc
        del self._backlog[:sent]

    async def _flush(self) -> None:
        """Send all the ciphertext waiting; waits while the socket is full."""
        if self.push_nowait():
            return
        self.dirty = True
        while True:
            await trio.lowlevel.wait_writable(self._fd)
            if self.push_nowait():
                break
        self.dirty = False


#: Ciphertext read from a TLS socket: copied into its BIO before any await.
_CIPHERTEXT = memoryview(bytearray(64 * 1024))

Endpoint = RawSocket | TLSSocket


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` at once with a TCP reset."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


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
