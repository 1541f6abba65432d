"""The backend leg's HTTP, sans-io: the request wsgate writes and the answers it reads."""

from __future__ import annotations

import h11
import pytest

from wsgate.errors import BackendProtocolError, HandshakeRejected
from wsgate.handshake import (
    MAX_REQUEST_HEAD,
    ResponseParser,
    Upgrade,
    backend_request,
    check_backend_101,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def test_the_request_is_http_that_an_independent_parser_reads_back() -> None:
    raw = backend_request(
        "/chat?room=1", "backend:9000", KEY, [("x-name", "Jos\xc3\xa9"), ("x-tab", "a\tb")]
    )
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert event.method == b"GET" and event.target == b"/chat?room=1"
    headers = dict(event.headers)
    assert headers[b"host"] == b"backend:9000" and headers[b"sec-websocket-key"] == KEY.encode()
    assert headers[b"x-name"] == b"Jos\xc3\xa9" and headers[b"x-tab"] == b"a\tb"
    assert isinstance(conn.next_event(), h11.EndOfMessage)


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/", [("x-a", "v\r\nX-Evil: 1")]),
        ("/", [("x-a", "v\nX")]),
        ("/", [("x-a", "v\x00")]),
        ("/", [("x-a", "caf\u00e9\u20ac")]),  # not latin-1: not sendable as is
        ("/", [("x a", "v")]),
        ("/", [("x-a:", "v")]),
        ("/a b", []),
        ("/a\r\nX: 1", []),
        ("http://elsewhere/", []),
    ],
)
def test_anything_that_would_not_be_valid_http_is_refused_before_sending(
    target: str, headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(HandshakeRejected) as info:
        backend_request(target, "b", KEY, headers)
    assert info.value.status == 500 and info.value.reason == "InvalidBackendRequest"


def test_a_101_returns_its_headers_and_the_frames_behind_it_however_split() -> None:
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: x  \r\n\r\n\x81\x02hi"
    )
    for cut in range(1, len(answer)):
        parser = ResponseParser()
        head = parser.feed(answer[:cut])
        if head is None:
            head = parser.feed(answer[cut:])
            assert head is not None
            trailing = head.trailing
        else:
            trailing = head.trailing + answer[cut:]
        assert head.status == 101
        assert ("Sec-WebSocket-Accept", "x") in head.headers
        assert trailing == b"\x81\x02hi", cut


def test_interim_responses_are_skipped() -> None:
    head = ResponseParser().feed(
        b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    assert head is not None and head.status == 101
    assert [k for k, _ in head.headers] == ["Upgrade", "Connection"]


def test_a_101_without_connection_upgrade_is_read_then_refused() -> None:
    head = ResponseParser().feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert head is not None and head.status == 101
    upgrade = Upgrade(KEY, [], None)
    with pytest.raises(BackendProtocolError, match="lacks"):
        check_backend_101(head.headers, key=KEY, upgrade=upgrade)


def test_a_refusal_is_complete_once_its_body_is_in() -> None:
    parser = ResponseParser()
    head = parser.feed(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nno")
    assert head is not None and head.status == 403 and not head.complete
    head = parser.feed(b"pe")
    assert head is not None and head.complete and head.body == b"nope"


def test_a_chunked_refusal_and_one_delimited_by_the_close() -> None:
    parser = ResponseParser()
    head = parser.feed(
        b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    assert head is not None and head.complete and head.body == b"abc"
    parser = ResponseParser()
    head = parser.feed(b"HTTP/1.1 404 Not Found\r\n\r\nmissing")
    assert head is not None and not head.complete
    head = parser.feed(b"")
    assert head is not None and head.complete and head.body == b"missing"


@pytest.mark.parametrize(
    "answer",
    [b"HTTP/1.1 abc\r\n\r\n", b"NOTHTTP\r\n\r\n", b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n"],
)
def test_invalid_http_from_a_backend_is_a_protocol_error(answer: bytes) -> None:
    with pytest.raises(BackendProtocolError, match="invalid HTTP"):
        ResponseParser().feed(answer)


def test_a_backend_that_closes_or_sends_a_huge_head_is_a_protocol_error() -> None:
    with pytest.raises(BackendProtocolError, match="closed"):
        ResponseParser().feed(b"")
    parser = ResponseParser()
    with pytest.raises(BackendProtocolError, match="too large"):
        parser.feed(b"HTTP/1.1 101 Switching Protocols\r\nX: " + b"a" * MAX_REQUEST_HEAD)
