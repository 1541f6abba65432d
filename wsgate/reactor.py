"""The "reactor" relay engine: one epoll pump per process instead of two tasks per pair.

Each pair is still owned by its connection task, inside its own nursery: the
task registers the pair here and waits; cancelling it (the pair's end, a
drain, the gateway's cancellation) unregisters the pair, so both sockets are
closed by their owner as with the "tasks" engine. Only the byte pump moves.

The pump is a single Trio task that waits for the readiness of a private,
level-triggered epoll holding every relayed socket, and then serves a whole
batch of ready sockets without going back through Trio's scheduler for each:
``recv_into`` the process's shared buffer, let the pair's frame scanner vouch for the
bytes, ``send`` them on. When a send is short, the rest waits for the
destination's writability and the source is not read meanwhile (backpressure:
at most one chunk is ever held per direction).

A TLS leg (:class:`~wsgate.netio.TLSSocket`) is pumped here too: it is read
and written through its ``ssl.MemoryBIO`` without waiting, and its waiting
ciphertext counts as the bytes held for that socket. Pairs with a
message-rate limiter keep the "tasks" engine.
"""

from __future__ import annotations

import select
from typing import TYPE_CHECKING

import structlog
import trio

from .netio import SHARED_BUFFER, RawSocket, TLSSocket

if TYPE_CHECKING:
    from .pairstate import PairSide, PairState

#: What a read that found the connection reset counts as (-1 is a TLS read's "not yet").
_RESET = -2
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR
#: Ready sockets served per wake-up; the rest wait one trip through the scheduler.
_BATCH = 256
#: ``_Leg.pending`` of a TLS leg whose ciphertext waits inside its TLSSocket.
_IN_TLS_BACKLOG = memoryview(b"tls")
#: What a failed read or send raises: the socket's peer is gone.
_BROKEN = (OSError, trio.BrokenResourceError)


class _Leg:
    """A registered socket: which pair, which side reads from it, which side it feeds."""

    __slots__ = ("fd", "mask", "out", "pair", "peer", "pending", "scanned", "side", "sock", "tls")

    def __init__(self, pair: PairState, side: PairSide, peer: PairSide) -> None:
        endpoint = side.endpoint
        self.pair = pair
        self.side = side
        self.peer = peer
        self.sock = endpoint.sock
        self.tls = endpoint if isinstance(endpoint, TLSSocket) else None
        self.fd = self.sock.fileno()
        self.mask = 0  # what epoll watches for this fd (0: not registered)
        self.out: _Leg = self  # the peer's leg, where our bytes go (set by Reactor.add)
        self.pending: memoryview | None = None  # bytes still to send *to* this socket
        self.scanned = 0  # forwarded-byte count the pair hears of once pending is out


class Reactor:
    """The epoll pump of one process; start :meth:`run` once, then :meth:`add` pairs."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._legs: dict[int, _Leg] = {}
        self._log = structlog.get_logger("wsgate.reactor")

    @staticmethod
    def accepts(pair: PairState) -> bool:
        """Whether ``pair`` can be pumped here (any socket endpoints, no meter)."""
        return (
            isinstance(pair.client.endpoint, RawSocket | TLSSocket)
            and isinstance(pair.backend.endpoint, RawSocket | TLSSocket)
            and pair.limiter is None
        )

    def add(self, pair: PairState, client_initial: bytes, backend_initial: bytes) -> None:
        """Start pumping ``pair``; bytes read during the handshake go first."""
        client = _Leg(pair, pair.client, pair.backend)
        backend = _Leg(pair, pair.backend, pair.client)
        client.out, backend.out = backend, client
        self._legs[client.fd] = client
        self._legs[backend.fd] = backend
        for leg, initial in ((client, client_initial), (backend, backend_initial)):
            if initial and not self._forward(leg, memoryview(initial)):
                return
        self._watch(client)
        self._watch(backend)
        # Records a handshake read left whole in a TLS object: no readiness will announce them.
        now = trio.current_time()
        for leg in (client, backend):
            if leg.tls is not None and leg.tls.buffered and leg.mask & _IN:
                self._read(leg, now)

    def remove(self, pair: PairState) -> None:
        """Stop pumping ``pair`` (idempotent); its owner then closes the sockets."""
        self._drop(pair)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The pump task; runs until cancelled."""
        epoll_fd = self._epoll.fileno()
        poll = self._epoll.poll
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll_fd)
                now = trio.current_time()
                for fd, events in poll(0, _BATCH):
                    leg = self._legs.get(fd)
                    if leg is None:
                        continue
                    try:
                        if events & _OUT:
                            self._flush(leg)
                        if events & (_IN | _GONE) and leg.mask & _IN:
                            self._read(leg, now)
                    except Exception:
                        # One pair's failure is that pair's alone.
                        self._log.exception("reactor_pair_failed")
                        self._drop(leg.pair)
                        leg.pair.fail()
                leg = None  # the last leg served must not keep its pair alive until the next batch
        finally:
            self._epoll.close()

    # -- per socket --------------------------------------------------------------------
    def _read(self, leg: _Leg, now: float) -> None:
        if leg.tls is None:
            try:
                n = leg.sock.recv_into(SHARED_BUFFER)
            except BlockingIOError:
                return
            except OSError:
                n = _RESET
        else:
            try:
                n = leg.tls.recv_nowait(SHARED_BUFFER)
            except _BROKEN:
                n = _RESET
            if n == -1:
                return  # part of a record: the rest will make the socket readable
        pair = leg.pair
        if n <= 0:
            self._drop(pair)
            if n == 0:
                pair.source_ended(leg.side)
            else:
                pair.source_broken(leg.side)
            return
        leg.side.bytes_in += n
        pair.last_activity = now
        if leg.side.scanner.close_received:
            return  # nothing after a close frame is forwarded
        self._forward(leg, SHARED_BUFFER[:n])

    def _forward(self, leg: _Leg, data: memoryview) -> bool:
        """Scan ``data`` read from ``leg`` and send it to the peer; False if the pair ended."""
        pair = leg.pair
        scanner = leg.side.scanner
        count = scanner.feed(data)
        if count:
            out = leg.out
            try:
                if out.tls is None:
                    sent = out.sock.send(data[:count])
                else:
                    sent = count if out.tls.write_nowait(data[:count]) else -1
            except BlockingIOError:
                sent = 0
            except _BROKEN:
                self._drop(pair)
                pair.send_failed(leg.peer)
                return False
            if sent < count:
                # Hold the rest (copied: the buffer is shared) and stop reading
                # this side until it is out; the pair hears of it only then.
                out.pending = _IN_TLS_BACKLOG if sent < 0 else memoryview(bytes(data[sent:count]))
                out.scanned = count
                out.side.endpoint.dirty = True
                self._watch(leg)
                self._watch(out)
                return True
        # Only a protocol error or a close frame can change the pair's course.
        if scanner.stopped and not pair.scanned(leg.side, count):
            self._drop(pair)
            return False
        return True

    def _flush(self, out: _Leg) -> None:
        assert out.pending is not None
        try:
            if out.tls is None:
                out.pending = out.pending[out.sock.send(out.pending) :]
                done = not out.pending
            else:
                done = out.tls.push_nowait()
        except BlockingIOError:
            return
        except _BROKEN:
            self._drop(out.pair)
            out.pair.send_failed(out.side)
            return
        if not done:
            return
        out.pending = None
        out.side.endpoint.dirty = False
        source = out.out
        if not out.pair.scanned(source.side, out.scanned):
            self._drop(out.pair)
            return
        self._watch(out)
        self._watch(source)

    # -- registrations -----------------------------------------------------------------
    def _watch(self, leg: _Leg) -> None:
        """Register for what ``leg`` needs now: read unless its peer holds our bytes."""
        peer = leg.out
        mask = (0 if peer.pending else _IN) | (_OUT if leg.pending else 0)
        if mask == leg.mask:
            return
        # An fd watched for nothing would still report HUP/ERR forever: unregister it.
        if mask == 0:
            self._epoll.unregister(leg.fd)
        elif leg.mask == 0:
            self._epoll.register(leg.fd, mask)
        else:
            self._epoll.modify(leg.fd, mask)
        leg.mask = mask

    def _forget(self, leg: _Leg) -> None:
        # A cancelled gateway stops the pump (closing the epoll) while owners unwind.
        if leg.mask and not self._epoll.closed:
            self._epoll.unregister(leg.fd)
            leg.mask = 0
        self._legs.pop(leg.fd, None)
        # The two legs of a pair point at each other: break that cycle, so the
        # pair is freed as soon as its owner lets go, not at the next full
        # garbage collection. A TLS leg's buffers live in OpenSSL, where the
        # collector does not see them: 40 pairs churning grew RSS 50 MiB.
        del leg.out

    def _drop(self, pair: PairState) -> None:
        for side in (pair.client, pair.backend):
            leg = self._legs.get(_fd(side))
            if leg is not None and leg.pair is pair:
                self._forget(leg)


def _fd(side: PairSide) -> int:
    return side.endpoint.sock.fileno()
