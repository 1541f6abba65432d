"""The state of a relayed pair that both relay engines touch, and the steps they share.

The "tasks" engine (:class:`wsgate.relay.Pair`'s two pump tasks) and the
"reactor" (:mod:`wsgate.reactor`) read, scan and send a pair's bytes
differently, but must change its course the same way. They share:

* :class:`PairSide`, one leg of a pair: its endpoint, the scanner of the frames
  it sends, the bytes read from it, whether it is gone;
* :class:`PairState`, the pair as the engines see it: ``client``, ``backend``,
  ``last_activity`` (the idle watchdog's clock) and the steps an engine takes
  when something changes: :meth:`~PairState.scanned` once a side's scanner
  has stopped (a protocol error or a close frame), :meth:`~PairState.source_ended`
  when a read finds the connection ended, :meth:`~PairState.send_failed` when
  a send finds the peer gone.

Which :class:`~wsgate.closing.End` each of these means is decided in
:mod:`wsgate.closing`. The engines touch these attributes per chunk, so they
are plain attributes (no properties), and :class:`PairSide` has ``__slots__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from .closing import SIDE_ENDS, End, protocol_end

if TYPE_CHECKING:
    import structlog

    from .frames import FrameScanner
    from .netio import Endpoint
    from .policy import MessageLimiter

CLIENT = "client"
BACKEND = "backend"


class PairSide:
    """One leg of a pair and the scanner of the frames it sends."""

    __slots__ = (
        "broken",
        "bytes_in",
        "closed",
        "endpoint",
        "gone",
        "held_back",
        "name",
        "scanner",
    )

    def __init__(self, name: str, endpoint: Endpoint, scanner: FrameScanner) -> None:
        self.name = name  # CLIENT or BACKEND: closing.SIDE_ENDS says what its ends are
        self.endpoint = endpoint
        self.scanner = scanner  # frames *from* this side
        self.bytes_in = 0
        # Set when the gateway held back this side's last read (a rate limit):
        # whether the bytes it did relay ended at a frame boundary.
        self.held_back: bool | None = None
        self.gone = False  # its stream ended: nothing more is sent to it
        # How it ended, when gone: a reset or a failed send (True), or its end
        # read in order, a FIN without a close frame (False: it gets our FIN).
        self.broken = False
        self.closed = False  # the gateway closed it cleanly


class PairState:
    """A pair's sides, its activity clock and its course, as both engines change them.

    ``end`` is the first reason the pair was given to end (None: still
    relaying); ``first_closer`` the side whose close frame started a close
    handshake; ``scope`` the cancel scope whose cancellation ends the pair
    (its owner's nursery, once it runs).
    """

    def __init__(
        self,
        *,
        correlation_id: str,
        api: str,
        client: PairSide,
        backend: PairSide,
        close_timeout: float,
        log: structlog.typing.FilteringBoundLogger,  # the gateway's: see PairState.log
        limiter: MessageLimiter | None,
    ) -> None:
        self.correlation_id = correlation_id
        self.api = api
        self.client = client
        self.backend = backend
        self.close_timeout = close_timeout
        self.last_activity = trio.current_time()
        self.end: End | None = None
        self.stop_reason: str | None = None
        self.first_closer: PairSide | None = None
        # The nursery's own cancel scope, once the owner runs the pair (a scope
        # of the pair's own would cost memory per pair).
        self.scope: trio.CancelScope | None = None
        self.limiter = limiter
        self._gateway_log = log

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """This pair's logger: the gateway's, bound to the connection.

        Bound when something is logged rather than held: a bound logger costs
        each idle pair about 280 bytes, and a pair logs once or twice.
        """
        return self._gateway_log.bind(correlation_id=self.correlation_id, api_id=self.api)

    def stop(self, end: End, reason: str | None = None) -> None:
        """End the pair for ``end`` (the first reason given wins)."""
        if self.end is None:
            self.end = end
            self.stop_reason = reason
        if self.scope is not None:
            self.scope.cancel()  # before it runs, the owner sees self.end and does not start

    def fail(self) -> None:
        """End the pair for an unexpected error in its pump (1011 to the client)."""
        self.stop(End.INTERNAL_ERROR)

    def scanned(self, src: PairSide, count: int) -> bool:
        """Act on what ``src``'s scanner saw in ``count`` forwarded bytes; False to stop.

        The one place a protocol error, an oversize message or a passing close
        frame changes the pair's course. The engines call it once the scanner
        has stopped (``scanner.stopped``: checked by them, not here, to keep
        a call off the path of every chunk), or once held bytes are out.
        """
        scanner = src.scanner
        if scanner.error is not None:
            self.log.info("protocol_error", side=src.name, error=str(scanner.error))
            self.stop(protocol_end(SIDE_ENDS[src.name], scanner.error))
            return False
        if scanner.close_received and count:
            if self.first_closer is None:
                self.first_closer = src
                # The peer now has close_timeout to answer in kind.
                assert self.scope is not None  # scanning happens while the pair runs
                self.scope.deadline = trio.current_time() + self.close_timeout
            else:
                self.stop(SIDE_ENDS[self.first_closer.name].closed)
        return True

    def source_ended(self, side: PairSide) -> None:
        """``side``'s connection ended (EOF, reset or a failed send)."""
        if self.first_closer is not None:
            # A close handshake was under way: this is its (possibly abrupt) end.
            self.stop(SIDE_ENDS[self.first_closer.name].closed)
            if not side.scanner.close_received:
                side.gone = True
            return
        side.gone = True
        self.stop(SIDE_ENDS[side.name].vanished)

    def send_failed(self, side: PairSide) -> None:
        """A send to ``side`` found its connection gone: nothing more reaches it."""
        side.gone = side.broken = True
        self.source_ended(side)

    def source_broken(self, side: PairSide) -> None:
        """Reading ``side`` failed (a reset): it ended, and not in order."""
        side.broken = True
        self.source_ended(side)
