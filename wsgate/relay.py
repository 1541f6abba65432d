"""The relay: two pumps move frames byte-for-byte between a client and its backend.

A :class:`Pair` is owned by its client connection's task. :meth:`Pair.run`
opens the pair's nursery holding the two pump tasks (and an idle watchdog), so
the end of either side cancels everything deterministically; then it sends the
gateway's own close frames (decided by :func:`wsgate.closing.close_plan`) and
closes both legs. What a pair's course depends on (its sides, when a close
handshake started, why it ended) is :class:`~wsgate.pairstate.PairState`,
shared with the reactor engine.

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

from .closing import ClosePlan, End, close_plan, logged_close, owed_close
from .frames import FrameScanner, build_close_frame
from .logs import utc_now
from .netio import PEER_GONE, SHARED_BUFFER, Endpoint
from .pairstate import BACKEND, CLIENT, PairSide, PairState
from .policy import MessageLimiter, PairStats

if TYPE_CHECKING:
    from .reactor import Reactor

__all__ = ["BACKEND", "CLIENT", "Pair"]

# Back-to-back full reads skip waiting for readability; yield to the scheduler
# every few of them so one busy pair cannot starve the others.
_FULL_READS_BEFORE_YIELD = 4

_PUMP_NAMES = ("wsgate.pump.from_client", "wsgate.pump.from_backend")


def _abort_at_once(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.SUCCEEDED


class Pair(PairState):
    """A client connection paired with its backend connection, and the "tasks" engine.

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
        super().__init__(
            correlation_id=correlation_id,
            api=api,
            client=PairSide(
                CLIENT,
                client,
                FrameScanner(
                    from_client=True, max_message_size=max_message_size, allow_rsv=allow_rsv
                ),
            ),
            backend=PairSide(
                BACKEND,
                backend,
                FrameScanner(
                    from_client=False, max_message_size=max_message_size, allow_rsv=allow_rsv
                ),
            ),
            close_timeout=close_timeout,
            log=log,
            limiter=limiter,
        )
        self.caller_ip = caller_ip
        self.idle_timeout = idle_timeout
        self.connected_at = time.time()
        self._deadline = deadline  # trio time at which a policy ends the pair (1008)
        self._deadline_reason = deadline_reason
        self._reactor = reactor if reactor is not None and reactor.accepts(self) else None
        self._on_disconnect = on_disconnect

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

    def stats(self) -> PairStats:
        """What the pair has relayed so far."""
        return PairStats(
            messages_from_client=self.messages_from_client,
            messages_from_backend=self.messages_from_backend,
            bytes_from_client=self.bytes_from_client,
            bytes_from_backend=self.bytes_from_backend,
            duration=time.time() - self.connected_at,
        )

    # -- the tasks engine ----------------------------------------------------------
    async def run(self, client_initial: bytes = b"", backend_initial: bytes = b"") -> None:
        """Relay until the pair ends, then close both legs. Never raises but Cancelled.

        ``*_initial`` are bytes already read during the handshake (e.g. frames
        the backend sent right behind its 101).
        """
        cut = True  # until proven otherwise: an outer cancellation skips the goodbyes
        try:
            async with trio.open_nursery() as nursery:
                self.scope = nursery.cancel_scope
                if self.end is not None:
                    self.scope.cancel()  # stopped before it ran (a drain)
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
                self._log_disconnect(close_plan(self.end, reason=self.stop_reason))
        await self._finish()

    # -- the pumps -----------------------------------------------------------------
    async def _pump(self, src: PairSide, dst: PairSide, initial: bytes) -> None:
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
                self.source_broken(src)
                return
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
                    self.send_failed(dst)
                    return
            # An error or the answering close frame ends the pair: return now
            # rather than park once more only to be cancelled.
            if scanner.stopped and (not self.scanned(src, count) or self.end is not None):
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

    async def _forward(self, src: PairSide, dst: PairSide, data: memoryview) -> bool:
        """Scan and send ``data``; False when this direction must stop."""
        count = src.scanner.feed(data)
        if count:
            try:
                await dst.endpoint.send_all(data[:count])
            except PEER_GONE:
                self.send_failed(dst)
                return False
        return self.scanned(src, count)

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
        plan = close_plan(end, reason=self.stop_reason)
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
        closer = self.first_closer
        closed_by, code, reason = logged_close(
            end,
            plan,
            closer=None if closer is None else closer.name,
            closer_code=None if closer is None else closer.scanner.close_code,
            closer_reason="" if closer is None else closer.scanner.close_reason,
            stop_reason=self.stop_reason,
        )
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

    async def _say_goodbye(
        self, side: PairSide, partner: PairSide, code: int | None, why: str
    ) -> bool:
        """Give ``side`` a close frame if it is owed one, then our FIN; False to abort it."""
        if side.gone:
            if side.broken:
                return False  # aborted by _finish
            # Its end was read in order, without a close frame: it may still
            # read (a half-close), and gets our FIN rather than a reset.
            try:
                side.endpoint.half_close()
            except OSError:
                return False
            return True
        # What of the partner's stream reached this side: all its scanner saw,
        # unless its last read was held back.
        if partner.held_back is None:
            close_passed, at_boundary = partner.scanner.close_received, partner.scanner.at_boundary
        else:
            close_passed, at_boundary = False, partner.held_back
        owed = owed_close(
            code,
            why,
            close_reached=close_passed,
            # Not when the read carrying its close frame was held back: the gateway
            # ended the pair before relaying it, and says why with its own code.
            unanswered=side.scanner.close_received and side.held_back is None,
            their_code=side.scanner.close_code,
        )
        frame = None if owed is None else build_close_frame(*owed, mask=side is self.backend)
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

    async def _await_peer_and_close(self, side: PairSide) -> None:
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
