"""Every close-code decision the gateway makes, in one place.

A pair ends for one :class:`End` reason; :class:`SideEnds` says which ends
each side can cause (:func:`protocol_end` picks the one a scanner error
means). :func:`close_plan` says which close code the gateway itself sends to
each side (``None``: that side gets no frame from the gateway, because the
peer's own close frame reached it, or it is gone), :func:`owed_close` the
frame one side gets when the pair's streams are done, and :func:`logged_close`
what the disconnect log records. :data:`TERMINATE_CODE` is the code an
operator's or a policy's termination sends, as the management API reports it.

A backend that vanishes earns the client 1011, not 1014 "bad gateway": wsproto
(under trio-websocket, among others) fails a connection that receives 1014 as
"unknown reserved code", which would turn our report into a protocol error.

Close frames sent by the peers are never rewritten: they pass through the relay
byte for byte. Local-only codes (1005 "no status", 1006 "abnormal", 1015 "TLS
failure") can be *recorded* in logs but never go on the wire: no plan holds one
(where trio-websocket would send 1000 for them, the plans say 1011 or 1001).
"""

from __future__ import annotations

import enum

import attrs

from .errors import MessageTooBig, ProtocolError

GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
NO_STATUS = 1005  # local only: a close frame with no code
ABNORMAL = 1006  # local only: the TCP connection ended without a close frame
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
TLS_FAILURE = 1015  # local only

LOCAL_ONLY = frozenset({NO_STATUS, ABNORMAL, TLS_FAILURE})


class End(enum.Enum):
    """Why a pair ended."""

    CLIENT_CLOSED = "client sent a close frame"
    BACKEND_CLOSED = "backend sent a close frame"
    CLIENT_VANISHED = "client connection lost without a close frame"
    BACKEND_VANISHED = "backend connection lost without a close frame"
    CLIENT_PROTOCOL_ERROR = "client broke the WebSocket protocol"
    BACKEND_PROTOCOL_ERROR = "backend broke the WebSocket protocol"
    CLIENT_MESSAGE_TOO_BIG = "client message exceeded max_message_size"
    BACKEND_MESSAGE_TOO_BIG = "backend message exceeded max_message_size"
    CLOSE_TIMEOUT = "close handshake did not finish within close_timeout"
    IDLE_TIMEOUT = "no frame in either direction within idle_timeout"
    DRAIN = "gateway shutting down"
    TERMINATED = "terminated by the gateway"
    INTERNAL_ERROR = "internal gateway error"
    ABORTED = "connections cut without close frames (gateway cancelled)"


@attrs.frozen
class SideEnds:
    """The ends one side of a pair can cause: the client's or the backend's."""

    closed: End  # its close frame started the handshake that finished
    vanished: End
    protocol_error: End
    message_too_big: End


CLIENT_ENDS = SideEnds(
    End.CLIENT_CLOSED, End.CLIENT_VANISHED, End.CLIENT_PROTOCOL_ERROR, End.CLIENT_MESSAGE_TOO_BIG
)
BACKEND_ENDS = SideEnds(
    End.BACKEND_CLOSED,
    End.BACKEND_VANISHED,
    End.BACKEND_PROTOCOL_ERROR,
    End.BACKEND_MESSAGE_TOO_BIG,
)
#: The ends of each side, by its name (``"client"``, ``"backend"``).
SIDE_ENDS = {"client": CLIENT_ENDS, "backend": BACKEND_ENDS}


def protocol_end(ends: SideEnds, error: ProtocolError) -> End:
    """The end a scanner ``error`` in the frames of the side with ``ends`` means."""
    return ends.message_too_big if isinstance(error, MessageTooBig) else ends.protocol_error


@attrs.frozen
class ClosePlan:
    """What the gateway sends each side when a pair ends, and what it logs."""

    closed_by: str  # "client", "backend" or "gateway"
    to_client: int | None
    to_backend: int | None
    reason: str  # reason text of the gateway's own close frames


#: What a terminated pair's sides get (an operator's DELETE, a policy's deadline).
TERMINATE_CODE = POLICY_VIOLATION

_PLANS: dict[End, tuple[str, int | None, int | None]] = {
    # A peer's close frame travelled through; the gateway adds nothing.
    End.CLIENT_CLOSED: ("client", None, None),
    End.BACKEND_CLOSED: ("backend", None, None),
    End.CLIENT_VANISHED: ("client", None, GOING_AWAY),
    End.BACKEND_VANISHED: ("backend", INTERNAL_ERROR, None),
    End.CLIENT_PROTOCOL_ERROR: ("gateway", PROTOCOL_ERROR, PROTOCOL_ERROR),
    End.BACKEND_PROTOCOL_ERROR: ("gateway", PROTOCOL_ERROR, PROTOCOL_ERROR),
    End.CLIENT_MESSAGE_TOO_BIG: ("gateway", MESSAGE_TOO_BIG, GOING_AWAY),
    End.BACKEND_MESSAGE_TOO_BIG: ("gateway", GOING_AWAY, MESSAGE_TOO_BIG),
    End.CLOSE_TIMEOUT: ("gateway", None, None),
    End.IDLE_TIMEOUT: ("gateway", GOING_AWAY, GOING_AWAY),
    End.DRAIN: ("gateway", GOING_AWAY, GOING_AWAY),
    End.TERMINATED: ("gateway", TERMINATE_CODE, TERMINATE_CODE),
    End.INTERNAL_ERROR: ("gateway", INTERNAL_ERROR, GOING_AWAY),
    End.ABORTED: ("gateway", None, None),
}


def close_plan(end: End, *, reason: str | None = None) -> ClosePlan:
    """The gateway's close frames for a pair that ended because of ``end``.

    ``reason`` overrides the close reason text (e.g. an operator's message when
    a pair is terminated); by default it is the :class:`End`'s description.
    """
    closed_by, to_client, to_backend = _PLANS[end]
    return ClosePlan(closed_by, to_client, to_backend, reason if reason is not None else end.value)


def logged_close(
    end: End,
    plan: ClosePlan,
    *,
    closer: str | None,
    closer_code: int | None,
    closer_reason: str,
    stop_reason: str | None,
) -> tuple[str, int, str]:
    """``closed_by``, ``close_code`` and ``close_reason`` of a pair's disconnect log.

    ``closer`` names the side whose close frame started a close handshake
    (``None``: none did), with that frame's code and reason. A handshake that
    finished, or timed out, is logged with the peer's code (1005 when its frame
    had none); a vanished peer with 1006; anything else with the gateway's
    own code to the client (1006 when it sent none).
    """
    if closer is not None and end in (End.CLIENT_CLOSED, End.BACKEND_CLOSED, End.CLOSE_TIMEOUT):
        return closer, NO_STATUS if closer_code is None else closer_code, closer_reason
    if end in (End.CLIENT_VANISHED, End.BACKEND_VANISHED):
        return plan.closed_by, ABNORMAL, end.value
    return plan.closed_by, plan.to_client or ABNORMAL, stop_reason or end.value


def owed_close(
    planned: int | None,
    reason: str,
    *,
    close_reached: bool,
    unanswered: bool,
    their_code: int | None,
) -> tuple[int | None, str] | None:
    """The close frame (code, reason) the gateway sends one side as a pair ends; None: none.

    ``planned`` and ``reason`` are the plan's for that side. ``close_reached``:
    its partner's close frame was relayed to it, so it needs none from us.
    ``unanswered``: it sent a close frame (code ``their_code``, None for an
    empty one) that its partner never answered; the gateway answers it with its
    own code, as RFC 6455 5.5.1 has the receiver of a close frame do.
    """
    if close_reached:
        return None
    if unanswered:
        return their_code, ""
    if planned is not None:
        return planned, reason
    return None
