"""The two fuzzing entry points, as plain functions of bytes.

Used three ways: by the atheris harnesses (``fuzz_frames.py``,
``fuzz_handshake.py``, coverage-guided, ``make fuzz``), by
``test_corpus.py`` (every corpus file and crash regression replayed in
``make test``) and by ``test_properties.py`` (hypothesis). A check fails with
AssertionError when an invariant breaks; any other exception is a crash.

Input layout (so that a corpus file is all a reproduction needs):

* frames: ``flags`` byte, then ``flags >> 4`` cut bytes, then the stream.
  ``flags`` bit 0: frames from the client (masked); bit 1: RSV bits allowed
  (an extension was negotiated); bits 2-3: max_message_size 0, 1, 125 or 1000.
  Each cut byte ``c`` splits the stream at ``c * (len + 1) // 256``.
* handshake: ``flags`` byte, then ``flags & 7`` cut bytes, then the request.
  ``flags`` bit 3: the connection is TLS; bit 4: end of stream after the bytes.
"""

from __future__ import annotations

from itertools import pairwise
from urllib.parse import parse_qsl

import h11
from wsproto.frame_protocol import FrameProtocol, ParseFailed

from wsgate.errors import HandshakeRejected, MessageTooBig, ProtocolError
from wsgate.frames import FrameScanner
from wsgate.handshake import (
    SECRET_PARAMS,
    RequestParser,
    backend_headers,
    backend_request,
    error_response,
    redact_target,
    validate_upgrade,
)
from wsgate.routing import Router

LIMITS = (0, 1, 125, 1000)


def _cut(stream: bytes, cut_bytes: bytes) -> list[bytes]:
    bounds = sorted({0, len(stream), *(c * (len(stream) + 1) // 256 for c in cut_bytes)})
    return [stream[a:b] for a, b in pairwise(bounds)]


# -- frames ------------------------------------------------------------------------------


def frames_input(
    stream: bytes, *, from_client: bool, allow_rsv: bool = False, limit: int = 0, cuts: bytes = b""
) -> bytes:
    """Encode a frames-target input (for seeds and regression tests)."""
    flags = int(from_client) | int(allow_rsv) << 1 | LIMITS.index(limit) << 2 | len(cuts) << 4
    return bytes([flags]) + cuts + stream


def check_frames(data: bytes) -> None:
    """The scanner never raises, forwards only valid frames, and agrees with wsproto."""
    if not data:
        return
    flags = data[0]
    from_client, allow_rsv, limit = bool(flags & 1), bool(flags & 2), LIMITS[(flags >> 2) & 3]
    ncuts = flags >> 4
    cut_bytes, stream = data[1 : 1 + ncuts], data[1 + ncuts :]

    def scanner() -> FrameScanner:
        return FrameScanner(from_client=from_client, allow_rsv=allow_rsv, max_message_size=limit)

    whole = scanner()
    stop = whole.feed(stream)
    assert 0 <= stop <= len(stream)
    chunked = scanner()
    forwarded = 0
    for chunk in _cut(stream, cut_bytes):
        n = chunked.feed(memoryview(chunk))
        assert 0 <= n <= len(chunk)
        if n < len(chunk):  # a stop: nothing more is ever accepted
            assert chunked.error is not None or chunked.close_received
        forwarded += n
        if chunked.error is not None or chunked.close_received:
            break
    for s in (whole, chunked):
        assert s.error is None or isinstance(s.error, ProtocolError)
        assert not (s.error is not None and s.close_received)
        if s.error is not None or s.close_received:
            assert s.feed(stream) == 0  # stopped for good
    # Chunking changes nothing but where a bad frame that straddles reads is cut.
    assert type(chunked.error) is type(whole.error)
    assert str(chunked.error) == str(whole.error)
    assert chunked.close_received == whole.close_received
    assert (chunked.close_code, chunked.close_reason) == (whole.close_code, whole.close_reason)
    assert chunked.messages == whole.messages
    if whole.error is not None:
        assert whole.at_boundary
        assert stop <= forwarded < stop + 14 + 125
        assert chunked.at_boundary == (forwarded == stop)
    else:
        assert forwarded == stop
    if not allow_rsv:
        _agrees_with_wsproto(stream, stop, whole, from_client)


def _frame_starts(data: bytes, from_client: bool) -> list[int]:
    """Where each frame of an already valid stream starts (the last may be incomplete)."""
    return [start for start, _, _ in _frames(data, from_client)]


def _frames(data: bytes, from_client: bool) -> list[tuple[int, int, int]]:
    """(start, payload start, end) of each frame of a valid stream; the last may be cut."""
    frames = []
    pos = 0
    while pos < len(data):
        code = data[pos + 1] & 0x7F if len(data) - pos >= 2 else 0
        head = pos + 2
        if code == 126:
            length, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), pos + 4
        elif code == 127:
            length, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), pos + 10
        else:
            length = code
        head += 4 if from_client else 0
        frames.append((pos, head, head + length))
        pos = head + length
    return frames


def canonical(data: bytes, from_client: bool) -> bytes:
    """A valid stream as wsproto can judge it, every other rule left intact.

    The scanner never reads payloads, so text frames become binary (UTF-8 is the
    endpoints' business). Lengths are re-encoded in the fewest bytes: RFC 6455
    5.2 asks *senders* for that; wsproto fails a longer encoding, the gateway
    relays it (the length is unambiguous either way). Close code 1014 becomes
    1011: the IANA registry assigned it after wsproto's list was written.
    """
    out = bytearray()
    for start, head, end in _frames(data, from_client):
        b0 = data[start]
        if b0 & 0x0F == 0x1:
            b0 = (b0 & 0xF0) | 0x2
        if start + 1 >= len(data):
            out.append(b0)
            break
        code, mbit = data[start + 1] & 0x7F, data[start + 1] & 0x80
        length_end = start + 2 + {126: 2, 127: 8}.get(code, 0)
        if length_end > len(data):  # the length itself is cut short: as it is
            out += bytes([b0]) + data[start + 1 :]
            break
        length = end - head
        if length < 126:
            out += bytes([b0, mbit | length])
        elif length < 65536:
            out += bytes([b0, mbit | 126]) + length.to_bytes(2, "big")
        else:
            out += bytes([b0, mbit | 127]) + length.to_bytes(8, "big")
        if head > len(data):  # the masking key is cut short
            out += data[length_end:]
            break
        key = data[head - 4 : head] if from_client else b"\0\0\0\0"
        payload = bytearray(data[head:end])
        if b0 & 0x0F == 0x8 and len(payload) >= 2:
            close = int.from_bytes(bytes(payload[i] ^ key[i] for i in (0, 1)), "big")
            if close == 1014:  # registered after wsproto's list was written
                payload[0:2] = bytes(b ^ k for b, k in zip(b"\x03\xf3", key[:2], strict=True))
        out += data[length_end:head] + payload
    return bytes(out)


def _wsproto(data: bytes, from_client: bool) -> ParseFailed | None:
    proto = FrameProtocol(client=not from_client, extensions=[])
    proto.receive_bytes(data)
    try:
        for _ in proto.received_frames():
            pass
    except ParseFailed as exc:
        return exc
    return None


def _agrees_with_wsproto(
    stream: bytes, stop: int, scanner: FrameScanner, from_client: bool
) -> None:
    """Differential check: wsproto accepts what the scanner forwards, and rejects what it stops.

    See :func:`canonical` for the rules left out.
    """
    prefix = canonical(stream[:stop], from_client)
    failure = _wsproto(prefix, from_client)
    assert failure is None, f"the scanner forwarded what wsproto rejects: {failure}"
    if scanner.error is not None and not isinstance(scanner.error, MessageTooBig):
        # The offending frame's header, completed with zeros wherever it was cut short.
        failure = _wsproto(prefix + stream[stop:] + bytes(14 + 125), from_client)
        assert failure is not None, f"wsproto accepts what the scanner refused: {scanner.error}"


# -- handshake ---------------------------------------------------------------------------


def handshake_input(
    request: bytes, *, cuts: bytes = b"", secure: bool = False, eof: bool = False
) -> bytes:
    """Encode a handshake-target input (for seeds and regression tests)."""
    return bytes([len(cuts) | int(secure) << 3 | int(eof) << 4]) + cuts + request


_ROUTER = Router([type("Api", (), {"path": p})() for p in ("echo", "chat/v1", "")])
_ADDED = {
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
}
_NEVER_FORWARDED = {
    "host",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
}


def check_handshake(data: bytes) -> None:
    """Whatever a client sends: a clean 4xx, or a valid request for the backend."""
    if not data:
        return
    flags = data[0]
    ncuts = flags & 7
    cut_bytes, raw = data[1 : 1 + ncuts], data[1 + ncuts :]
    parser = RequestParser(client_ip="192.0.2.1", secure=bool(flags & 8))
    request = None
    try:
        for chunk in _cut(raw, cut_bytes):
            request = parser.feed(chunk)
            if request is not None:
                break
        else:
            if flags & 16:
                request = parser.feed(b"")
    except HandshakeRejected as exc:
        # 501: a transfer coding the gateway cannot frame (RFC 9112 6.1), as nginx answers.
        assert exc.status in (400, 431, 501), exc.status
        _clean_refusal(exc)
        return
    if request is None:
        return
    assert request.target.startswith("/")
    assert all(name == name.lower() for name, _ in request.headers)
    redacted = redact_target(request.target, ["subscription-key"])
    _, _, query = redacted.partition("?")
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key.lower() in SECRET_PARAMS:
            assert value == "REDACTED", redacted
    _ROUTER.match(request.path)
    try:
        upgrade = validate_upgrade(request)
    except HandshakeRejected as exc:
        assert exc.status in (400, 426), exc.status
        _clean_refusal(exc)
        return
    headers = backend_headers(request, upgrade, gateway_host=request.header("host"))
    names = {name.lower() for name, _ in headers}
    assert not names & _NEVER_FORWARDED, names & _NEVER_FORWARDED
    # The request the gateway would send the backend (backend_request, as backend.py
    # builds it) is valid HTTP/1.1 to a second, independent parser: h11.
    raw = backend_request(request.target, "backend.test", "dGhlIHNhbXBsZSBub25jZQ==", headers)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    assert event.target.decode("ascii") == request.target
    sent = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
    assert sent[5:] == [(k.lower(), v) for k, v in headers], (sent, headers)
    assert names <= _ADDED | {name for name, _ in request.headers}


def _clean_refusal(exc: HandshakeRejected) -> None:
    """A refusal's message quotes none of the request (it may hold secrets) and encodes."""
    assert "b'" not in exc.message and 'b"' not in exc.message and "bytearray" not in exc.message
    assert len(exc.message) < 200
    error_response(exc)
