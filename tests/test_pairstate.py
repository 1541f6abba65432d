"""PairState: the course of a pair as both engines change it, without sockets."""

from __future__ import annotations

from typing import cast

import structlog
import structlog.testing
import trio

from wsgate.closing import End
from wsgate.frames import FrameScanner, build_close_frame
from wsgate.netio import Endpoint
from wsgate.pairstate import BACKEND, CLIENT, PairSide, PairState


def _pair() -> PairState:
    no_endpoint = cast(Endpoint, None)  # the state never touches its endpoints
    return PairState(
        correlation_id="c-1",
        api="echo",
        client=PairSide(CLIENT, no_endpoint, FrameScanner(from_client=True)),
        backend=PairSide(BACKEND, no_endpoint, FrameScanner(from_client=False)),
        close_timeout=5.0,
        log=structlog.get_logger("test"),
        limiter=None,
    )


async def test_a_failed_send_marks_the_peer_gone_and_ends_the_pair() -> None:
    pair = _pair()
    pair.send_failed(pair.backend)
    assert pair.backend.gone and not pair.client.gone
    assert pair.end is End.BACKEND_VANISHED
    pair.source_ended(pair.client)  # the first reason wins
    assert pair.end is End.BACKEND_VANISHED


async def test_a_close_handshake_starts_the_close_timeout_and_ends_when_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pair = _pair()
    scope = trio.CancelScope()  # the nursery's scope, as the owner would set it
    pair.scope = scope
    frame = build_close_frame(1000, "bye", mask=True)
    count = pair.client.scanner.feed(frame)
    assert pair.client.scanner.stopped and count == len(frame)
    assert pair.scanned(pair.client, count)
    assert pair.first_closer is pair.client and pair.end is None
    assert scope.deadline == trio.current_time() + 5.0
    answer = build_close_frame(1000, "", mask=False)
    assert pair.scanned(pair.backend, pair.backend.scanner.feed(answer))
    assert pair.end is End.CLIENT_CLOSED
    assert scope.cancel_called  # the end cancels the pair's scope


async def test_a_protocol_error_ends_the_pair_for_its_side() -> None:
    pair = _pair()
    with structlog.testing.capture_logs() as logs:
        count = pair.backend.scanner.feed(b"\x82\x80\0\0\0\0")  # masked: backends must not
        assert pair.backend.scanner.stopped
        assert not pair.scanned(pair.backend, count)
    assert pair.end is End.BACKEND_PROTOCOL_ERROR
    record = logs[0]
    assert (record["event"], record["side"]) == ("protocol_error", "backend")
