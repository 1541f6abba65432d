"""The relay: two pumps move frames byte-for-byte between a client and its backend.

A :class:`Pair` is owned by its client connection's task. :meth:`Pair.run`
opens the pair's nursery holding the two pump tasks (and an idle watchdog), so
the end of either side cancels everything deterministically; then it sends the
gateway's own close frames (decided by :func:`wsgate.closing.close_plan`) and
closes both legs.

Per chunk the hot path is: ``recv_into`` the buffer shared by the process
(:data:`wsgate.netio.SHARED_BUFFER`, and its rule), let the sans-io
:class:`~wsgate.frames.FrameScanner` vouch for the bytes, send them on
unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
import trio

from .closing import ABNORMAL, NO_STATUS, ClosePlan, End, close_plan
from .errors import MessageTooBig
from .frames import FrameScanner, build_close_frame
from .logs import utc_now
from .netio import PEER_GONE, SHARED_BUFFER, Endpoint
from .policy import MessageLimiter, PairStats

if TYPE_CHECKING:
    from .reactor import Reactor

CLIENT = "client"
BACKEND = "backend"
# Back-to-back full reads skip waiting for readability; yield to the scheduler
# every few of them so one busy pair cannot starve the others.
_FULL_READS_BEFORE_YIELD = 4

_PUMP_NAMES = ("wsgate.pump.from_client", "wsgate.pump.from_backend")


def _abort_at_once(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.SUCCEEDED


class _Side:
    """One leg of a pair and the scanner of the frames it sends."""

    __slots__ = ("bytes_in", "closed", "endpoint", "gone", "held_back", "name", "scanner")

    def __init__(self, name: str, endpoint: Endpoint, scanner: FrameScanner) -> None:
        self.name = name
        self.endpoint = endpoint
        self.scanner = scanner  # frames *from* this side
        self.bytes_in = 0
        # Set when the gateway held back this side's last read (a rate limit):
        # whether the bytes it did relay ended at a frame boundary.
        self.held_back: bool | None = None
        self.gone = False  # the connection broke: nothing more can be sent to it
        self.closed = False  # the gateway closed it cleanly


class Pair:
    """A client connection paired with its backend connection.

    Live counters (``messages_from_client``...) may be read at any time, e.g.
    by the management API; :meth:`stop` ends the pair from outside.
    """

    def __init__(
        self,
        *,
        correlation_id: str,
        api: str,
        caller_ip: str,
        client: Endpoint,
        backend: Endpoint,
        max_message_size: int,
        allow_rsv: bool,
        idle_timeout: float,
        close_timeout: float,
        log: structlog.typing.FilteringBoundLogger,  # the gateway's: see Pair.log
        deadline: float | None = None,
        deadline_reason: str = "",
        limiter: MessageLimiter | None = None,
        on_disconnect: Callable[[Pair, dict[str, Any]], None] | None = None,
        reactor: Reactor | None = None,
    ) -> None:
        self.correlation_id = correlation_id
        self.api = api
        self.caller_ip = caller_ip
        self.client = _Side(
            CLIENT,
            client,
            FrameScanner(from_client=True, max_message_size=max_message_size, allow_rsv=allow_rsv),
        )
        self.backend = _Side(
            BACKEND,
            backend,
            FrameScanner(from_client=False, max_message_size=max_message_size, allow_rsv=allow_rsv),
        )
        self.idle_timeout = idle_timeout
        self.close_timeout = close_timeout
        self.connected_at = time.time()
        self.last_activity = trio.current_time()
        self.end: End | None = None
        self._stop_reason: str | None = None
        self._first_closer: _Side | None = None
        # The nursery's own cancel scope, once run() has opened it (a scope of
        # the pair's own would cost memory per pair).
        self._scope: trio.CancelScope | None = None
        self._gateway_log = log
        self._deadline = deadline  # trio time at which a policy ends the pair (1008)
        self._deadline_reason = deadline_reason
        self.limiter = limiter
        self._reactor = reactor if reactor is not None and reactor.accepts(self) else None
        self._on_disconnect = on_disconnect

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """This pair's logger: the gateway's, bound to the connection.

        Bound when something is logged rather than held: a bound logger costs
        each idle pair about 280 bytes, and a pair logs once or twice.
        """
        return self._gateway_log.bind(correlation_id=self.correlation_id, api_id=self.api)

    @property
    def engine(self) -> str:
        """What pumps this pair: ``"reactor"``, or ``"tasks"`` (also the reactor's fallback)."""
        return "tasks" if self._reactor is None else "reactor"

    # -- live statistics -------------------------------------------------------------
    @property
    def messages_from_client(self) -> int:
        """Data messages the client has sent through the gateway."""
        return self.client.scanner.messages

    @property
    def messages_from_backend(self) -> int:
        """Data messages the backend has sent through the gateway."""
        return self.backend.scanner.messages

    @property
    def bytes_from_client(self) -> int:
        """Bytes (frame headers included) read from the client."""
        return self.client.bytes_in

    @property
    def bytes_from_backend(self) -> int:
        """Bytes (frame headers included) read from the backend."""
        return self.backend.bytes_in

    def fail(self) -> None:
        """End the pair for an unexpected error in its pump (1011 to the client)."""
        self.stop(End.INTERNAL_ERROR)

    def stats(self) -> PairStats:
        """What the pair has relayed so far."""
        return PairStats(
            messages_from_client=self.messages_from_client,
            messages_from_backend=self.messages_from_backend,
            bytes_from_client=self.bytes_from_client,
            bytes_from_backend=self.bytes_from_backend,
            duration=time.time() - self.connected_at,
        )

    # -- control -------------------------------------------------------------------
    def stop(self, end: End, reason: str | None = None) -> None:
        """End the pair for ``end`` (the first reason given wins)."""
        if self.end is None:
            self.end = end
            self._stop_reason = reason
        if self._scope is not None:
            self._scope.cancel()  # before run(), run() sees self.end and does not start

    async def run(self, client_initial: bytes = b"", backend_initial: bytes = b"") -> None:
        """Relay until the pair ends, then close both legs. Never raises but Cancelled.

        ``*_initial`` are bytes already read during the handshake (e.g. frames
        the backend sent right behind its 101).
        """
        cut = True  # until proven otherwise: an outer cancellation skips the goodbyes
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self.end is not None:
                    self._scope.cancel()  # stopped before it ran (a drain)
                else:
                    if self.idle_timeout > 0:
                        nursery.start_soon(self._watch_idle)
                    if self._deadline is not None:
                        nursery.start_soon(self._watch_deadline)
                    if self._reactor is None:
                        pump, names = self._pump, _PUMP_NAMES  # constant names: no string per task
                        nursery.start_soon(
                            pump, self.client, self.backend, client_initial, name=names[0]
                        )
                        nursery.start_soon(
                            pump, self.backend, self.client, backend_initial, name=names[1]
                        )
                    else:
                        # The reactor pumps; this task owns the pair until it ends
                        # (waiting here itself: a task of its own would cost memory).
                        self._reactor.add(self, client_initial, backend_initial)
                        # sleep_forever() without its frame and lambda: less memory per pair.
                        await trio.lowlevel.wait_task_rescheduled(_abort_at_once)
            if self.end is None:  # the close handshake's deadline passed
                self.end = End.CLOSE_TIMEOUT
            cut = False
        except Exception:
            self.log.exception("relay_failed")
            self.end = End.INTERNAL_ERROR
            cut = False
        finally:
            if self._reactor is not None:
                self._reactor.remove(self)
            if cut:
                self.end = End.ABORTED
                self._abort_both()
                self._log_disconnect(close_plan(self.end, reason=self._stop_reason))
        await self._finish()

    # -- the pumps -----------------------------------------------------------------
    async def _pump(self, src: _Side, dst: _Side, initial: bytes) -> None:
        if initial:
            src.bytes_in += len(initial)
            if not await self._forward(src, dst, memoryview(initial)):
                return
        # The hot path: per chunk one wait, one recv and one send when the
        # destination takes it all. The waits are Trio's own, awaited right here:
        # an idle pump holds no frame but this one.
        endpoint, out = src.endpoint, dst.endpoint
        clock = trio.lowlevel.current_clock()
        metered = src is self.client and self.limiter is not None
        buf = SHARED_BUFFER
        full_reads = 0  # back-to-back reads that filled buf: more is likely queued
        while True:
            try:
                if full_reads == 0:
                    await endpoint.wait_readable()  # a short read drained it: skip an EAGAIN
                elif full_reads >= _FULL_READS_BEFORE_YIELD:
                    full_reads = 0
                    await trio.lowlevel.checkpoint()  # a busy pair must not starve the others
                while (n := endpoint.recv_nowait(buf)) < 0:
                    await endpoint.wait_readable()
            except PEER_GONE:
                n = 0
            if n == 0:
                self.source_ended(src)
                return
            full_reads = full_reads + 1 if n == len(buf) else 0
            src.bytes_in += n
            self.last_activity = clock.current_time()
            scanner = src.scanner  # looked up per chunk: a test swaps it to inject a fault
            if scanner.close_received:
                continue  # nothing after a close frame is forwarded
            if metered:
                before, boundary = scanner.messages, scanner.at_boundary
            count = scanner.feed(buf[:n])
            delay = 0.0
            if metered and count:
                # Charged before it goes out: a read the limiter refuses is held back.
                charged = self._charge(scanner.messages - before, n, boundary)
                if charged is None:
                    return
                delay = charged
            if count:
                try:
                    sent = out.send_nowait(buf[:count])
                    if sent < count:
                        await out.send_all(buf[sent:count])
                except PEER_GONE:
                    dst.gone = True
                    self.source_ended(dst)
                    return
            # An error or the answering close frame ends the pair: return now
            # rather than park once more only to be cancelled.
            if (scanner.error is not None or scanner.close_received) and (
                not self.scanned(src, count) or self.end is not None
            ):
                return
            if delay > 0:
                await trio.sleep(delay)  # not reading is the backpressure

    def _charge(self, messages: int, nbytes: int, boundary: bool) -> float | None:
        """Charge a read from the client to its message-rate limiter before it is relayed.

        Returns the delay before reading on, or None when the limiter closes the
        pair: then that read is held back, and ``boundary`` (whether the bytes
        relayed before it ended at a frame boundary) tells the close what the
        backend really received.
        """
        assert self.limiter is not None
        delay = self.limiter.charge(messages, nbytes, trio.current_time())
        if delay is None:
            self.client.held_back = boundary
            self.stop(End.TERMINATED, "message rate limit exceeded")
        return delay

    async def _forward(self, src: _Side, dst: _Side, data: memoryview) -> bool:
        """Scan and send ``data``; False when this direction must stop."""
        count = src.scanner.feed(data)
        if count:
            try:
                await dst.endpoint.send_all(data[:count])
            except PEER_GONE:
                dst.gone = True
                self.source_ended(dst)
                return False
        return self.scanned(src, count)

    def scanned(self, src: _Side, count: int) -> bool:
        """Act on what the scanner saw in ``count`` forwarded bytes; False to stop.

        Shared by both engines: the one place a protocol error, an oversize
        message or a passing close frame changes the pair's course.
        """
        scanner = src.scanner
        if scanner.error is not None:
            too_big = isinstance(scanner.error, MessageTooBig)
            if src is self.client:
                end = End.CLIENT_MESSAGE_TOO_BIG if too_big else End.CLIENT_PROTOCOL_ERROR
            else:
                end = End.BACKEND_MESSAGE_TOO_BIG if too_big else End.BACKEND_PROTOCOL_ERROR
            self.log.info("protocol_error", side=src.name, error=str(scanner.error))
            self.stop(end)
            return False
        if scanner.close_received and count:
            if self._first_closer is None:
                self._first_closer = src
                # The peer now has close_timeout to answer in kind.
                assert self._scope is not None  # scanning happens inside run()
                self._scope.deadline = trio.current_time() + self.close_timeout
            else:
                self.stop(
                    End.CLIENT_CLOSED if self._first_closer is self.client else End.BACKEND_CLOSED
                )
        return True

    def source_ended(self, side: _Side) -> None:
        """``side``'s connection ended (EOF, reset or a failed send)."""
        if self._first_closer is not None:
            # A close handshake was under way: this is its (possibly abrupt) end.
            self.stop(
                End.CLIENT_CLOSED if self._first_closer is self.client else End.BACKEND_CLOSED
            )
            if not side.scanner.close_received:
                side.gone = True
            return
        side.gone = True
        self.stop(End.CLIENT_VANISHED if side is self.client else End.BACKEND_VANISHED)

    async def _watch_deadline(self) -> None:
        assert self._deadline is not None
        await trio.sleep_until(self._deadline)
        self.stop(End.TERMINATED, self._deadline_reason)

    async def _watch_idle(self) -> None:
        while True:
            deadline = self.last_activity + self.idle_timeout
            if trio.current_time() >= deadline:
                self.stop(End.IDLE_TIMEOUT)
                return
            await trio.sleep_until(deadline)

    # -- the end -------------------------------------------------------------------
    async def _finish(self) -> None:
        """Send the gateway's close frames, close both legs, log the disconnect.

        Both legs are served one after the other, without tasks of their own: first
        each gets its close frame and our FIN, then each is read until its peer
        is done. The two waits share one deadline, so this takes no longer
        than waiting on both at once.
        """
        end = self.end or End.INTERNAL_ERROR
        plan = close_plan(end, reason=self._stop_reason)
        try:
            with trio.move_on_after(self.close_timeout) as scope:
                scope.shield = True  # even when draining is cancelling us, say goodbye
                closing = []
                for side, partner, code in (
                    (self.client, self.backend, plan.to_client),
                    (self.backend, self.client, plan.to_backend),
                ):
                    if await self._say_goodbye(side, partner, code, plan.reason):
                        closing.append(side)
                for side in closing:
                    await self._await_peer_and_close(side)
        finally:
            self._abort_both()
        self._log_disconnect(plan)

    def _abort_both(self) -> None:
        for side in (self.client, self.backend):
            if not side.closed:
                side.closed = True
                side.endpoint.abort()

    def _log_disconnect(self, plan: ClosePlan) -> None:
        end = self.end or End.INTERNAL_ERROR
        closed_by, code, reason = self._outcome(end, plan.closed_by, plan.to_client)
        record: dict[str, Any] = {
            "timestamp": utc_now(),
            "correlation_id": self.correlation_id,
            "api_id": self.api,
            "duration": round(time.time() - self.connected_at, 6),
            "closed_by": closed_by,
            "close_code": code,
            "close_reason": reason,
            "end": end.name.lower(),
            "messages_from_client": self.messages_from_client,
            "messages_from_backend": self.messages_from_backend,
            "bytes_from_client": self.bytes_from_client,
            "bytes_from_backend": self.bytes_from_backend,
        }
        self.log.info("disconnect", **record)
        if self._on_disconnect is not None:
            self._on_disconnect(self, record)

    async def _say_goodbye(self, side: _Side, partner: _Side, code: int | None, why: str) -> bool:
        """Give ``side`` a close frame if it is owed one, then our FIN; False to abort it."""
        if side.gone:
            return False  # aborted by _finish
        frame: bytes | None = None
        # What of the partner's stream reached this side: all its scanner saw,
        # unless its last read was held back.
        if partner.held_back is None:
            close_passed, at_boundary = partner.scanner.close_received, partner.scanner.at_boundary
        else:
            close_passed, at_boundary = False, partner.held_back
        if not close_passed:  # no close frame reached this side yet
            if side.scanner.close_received and side.held_back is None:
                # It started a close handshake its partner never answered: answer it.
                # (Not when the read carrying it was held back: the gateway ended
                # the pair before relaying it, and says why with its own code.)
                frame = build_close_frame(side.scanner.close_code, "", mask=side is self.backend)
            elif code is not None:
                frame = build_close_frame(code, why, mask=side is self.backend)
        # Our own frame may only start where the partner's last frame ended.
        if frame is not None and (side.endpoint.dirty or not at_boundary):
            return False  # aborted by _finish
        try:
            if frame is not None:
                await side.endpoint.send_all(frame)
            side.endpoint.half_close()
        except OSError:  # PEER_GONE, or ENOTCONN from the half-close: it is gone
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def _await_peer_and_close(self, side: _Side) -> None:
        """Read what ``side`` still sends until it is done, then close its connection."""
        linger, enough = self.close_timeout, None
        if side is self.client:
            # As the client's server we close first once its close frame is in
            # (RFC 6455 7.1.1); clients may wait for that before closing theirs.
            scanner = side.scanner
            if scanner.close_received or scanner.error is not None:
                linger = 0

            def enough(data: memoryview) -> bool:
                scanner.feed(data)
                return scanner.close_received or scanner.error is not None

        try:
            await side.endpoint.close(linger, enough)
            side.closed = True
        except PEER_GONE:
            pass

    def _outcome(self, end: End, closed_by: str, gateway_code: int | None) -> tuple[str, int, str]:
        closer = self._first_closer
        if end in (End.CLIENT_CLOSED, End.BACKEND_CLOSED, End.CLOSE_TIMEOUT) and closer:
            code = closer.scanner.close_code
            return closer.name, NO_STATUS if code is None else code, closer.scanner.close_reason
        if end in (End.CLIENT_VANISHED, End.BACKEND_VANISHED):
            return closed_by, ABNORMAL, end.value
        return closed_by, gateway_code or ABNORMAL, self._stop_reason or end.value
