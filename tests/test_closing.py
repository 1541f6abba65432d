"""closing.py's decisions, errors.py's one mapping boundary and logs.utc_iso, without sockets."""

from __future__ import annotations

import errno

import pytest
import trio

from wsgate.closing import (
    ABNORMAL,
    NO_STATUS,
    SIDE_ENDS,
    TERMINATE_CODE,
    End,
    close_plan,
    logged_close,
    owed_close,
    protocol_end,
)
from wsgate.errors import (
    BackendTimeout,
    HandshakeRejected,
    MessageTooBig,
    OutOfFileDescriptors,
    ProtocolError,
    map_backend_errors,
)
from wsgate.logs import utc_iso


@pytest.mark.parametrize(
    ("side", "error", "end", "to_client", "to_backend"),
    [
        ("client", ProtocolError("x"), End.CLIENT_PROTOCOL_ERROR, 1002, 1002),
        ("client", MessageTooBig("x"), End.CLIENT_MESSAGE_TOO_BIG, 1009, 1001),
        ("backend", ProtocolError("x"), End.BACKEND_PROTOCOL_ERROR, 1002, 1002),
        ("backend", MessageTooBig("x"), End.BACKEND_MESSAGE_TOO_BIG, 1001, 1009),
    ],
)
def test_a_scanner_error_picks_the_end_of_its_side(
    side: str, error: ProtocolError, end: End, to_client: int, to_backend: int
) -> None:
    assert protocol_end(SIDE_ENDS[side], error) is end
    plan = close_plan(end)
    assert (plan.closed_by, plan.to_client, plan.to_backend) == ("gateway", to_client, to_backend)


def test_each_side_has_its_own_ends() -> None:
    client, backend = SIDE_ENDS["client"], SIDE_ENDS["backend"]
    assert (client.closed, client.vanished) == (End.CLIENT_CLOSED, End.CLIENT_VANISHED)
    assert (backend.closed, backend.vanished) == (End.BACKEND_CLOSED, End.BACKEND_VANISHED)


def test_terminate_code_is_what_a_terminated_pair_gets() -> None:
    plan = close_plan(End.TERMINATED, reason="terminated by operator")
    assert (plan.to_client, plan.to_backend, plan.reason) == (1008, 1008, "terminated by operator")
    assert TERMINATE_CODE == 1008


def _logged(
    end: End,
    *,
    closer: str | None = None,
    code: int | None = None,
    why: str = "",
    stop_reason: str | None = None,
) -> tuple[str, int, str]:
    return logged_close(
        end,
        close_plan(end, reason=stop_reason),
        closer=closer,
        closer_code=code,
        closer_reason=why,
        stop_reason=stop_reason,
    )


def test_a_finished_close_handshake_is_logged_with_the_first_closers_frame() -> None:
    assert _logged(End.CLIENT_CLOSED, closer="client", code=1000, why="bye") == (
        "client",
        1000,
        "bye",
    )
    # The backend started it; the pair ended when the client answered.
    assert _logged(End.BACKEND_CLOSED, closer="backend", code=4000, why="") == (
        "backend",
        4000,
        "",
    )
    # A close frame without a code is logged as 1005, which never goes on the wire.
    assert _logged(End.CLOSE_TIMEOUT, closer="client") == ("client", NO_STATUS, "")


def test_a_vanished_peer_is_logged_1006() -> None:
    assert _logged(End.BACKEND_VANISHED) == (
        "backend",
        ABNORMAL,
        "backend connection lost without a close frame",
    )
    assert _logged(End.CLIENT_VANISHED)[:2] == ("client", ABNORMAL)


def test_a_gateway_end_is_logged_with_the_code_the_client_got() -> None:
    assert _logged(End.DRAIN) == ("gateway", 1001, "gateway shutting down")
    assert _logged(End.TERMINATED, stop_reason="quota") == ("gateway", 1008, "quota")
    # Connections cut without close frames: nothing was sent, 1006 is logged.
    assert _logged(End.ABORTED) == ("gateway", ABNORMAL, End.ABORTED.value)
    # A close timeout with no first closer on record is the gateway's.
    assert _logged(End.CLOSE_TIMEOUT)[:2] == ("gateway", ABNORMAL)


def test_owed_close_answers_an_unanswered_close_with_its_own_code() -> None:
    answer = {"close_reached": False, "unanswered": True}
    assert owed_close(1001, "drain", **answer, their_code=4001) == (4001, "")
    assert owed_close(None, "", **answer, their_code=None) == (None, "")  # an empty close back


def test_owed_close_sends_the_plan_unless_a_close_frame_got_through() -> None:
    def owed(planned: int | None, reason: str, reached: bool) -> tuple[int | None, str] | None:
        return owed_close(planned, reason, close_reached=reached, unanswered=False, their_code=None)

    assert owed(1001, "drain", False) == (1001, "drain")
    assert owed(None, "", False) is None
    assert owed(1011, "x", True) is None
    # The partner's close frame reached it: even an unanswered close gets nothing more.
    assert owed_close(1001, "", close_reached=True, unanswered=True, their_code=1000) is None


async def test_the_backend_deadline_inside_the_mapping_is_a_504(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with (
        pytest.raises(BackendTimeout) as info,
        map_backend_errors("ws://backend:1/x"),
        trio.fail_after(10),
    ):
        await trio.sleep_forever()
    assert info.value.status == 504
    assert info.value.reason == "BackendTimeout"
    assert str(info.value) == "ws://backend:1/x: no complete handshake in time"


def test_running_out_of_descriptors_is_one_503() -> None:
    with pytest.raises(OutOfFileDescriptors) as info, map_backend_errors("ws://backend:1/x"):
        raise OSError(errno.EMFILE, "Too many open files")
    rejection = info.value
    assert isinstance(rejection, HandshakeRejected)
    assert (rejection.status, rejection.reason) == (503, "OutOfFileDescriptors")
    assert rejection.headers == [("Retry-After", "1")]
    assert rejection.message == "gateway is out of file descriptors"


def test_utc_iso_formats_any_time_with_milliseconds() -> None:
    assert utc_iso(0.1234) == "1970-01-01T00:00:00.123Z"
    assert utc_iso(1_700_000_000.5) == "2023-11-14T22:13:20.500Z"
    # The cached seconds part follows the timestamp, back and forth.
    assert utc_iso(0.9996) == "1970-01-01T00:00:00.999Z"
    assert utc_iso(1_700_000_061.25) == "2023-11-14T22:14:21.250Z"
