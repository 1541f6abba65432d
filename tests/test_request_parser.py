"""The sans-io request parser: valid requests parse, anything else is a clean HTTP error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgate.errors import HandshakeRejected
from wsgate.handshake import MAX_REQUEST_HEAD, RequestParser

GOOD = (
    b"GET /chat/room?x=1 HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def feed_all(chunks: list[bytes]) -> RequestParser:
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    for chunk in chunks:
        if parser.feed(chunk) is not None:
            break
    return parser


@given(st.data())
def test_a_valid_request_parses_however_it_is_split(data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(1, len(GOOD) - 1), max_size=6)))
    chunks = [GOOD[a:b] for a, b in zip([0, *cuts], [*cuts, len(GOOD)], strict=True)]
    early = data.draw(st.binary(max_size=20))
    chunks[-1] += early
    parser = RequestParser(client_ip="10.0.0.1", secure=True)
    results = [parser.feed(c) for c in chunks if c]
    request = results[-1]
    assert request is not None and all(r is None for r in results[:-1])
    assert request.path == "/chat/room" and request.query == "x=1"
    assert request.header("upgrade") == "websocket" and request.secure
    assert parser.trailing == early


@settings(max_examples=300)
@given(st.lists(st.binary(min_size=1, max_size=200), max_size=8), st.booleans())
def test_arbitrary_bytes_only_ever_raise_handshake_rejected(
    chunks: list[bytes], then_eof: bool
) -> None:
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    try:
        for chunk in [*chunks, b""] if then_eof else chunks:
            if parser.feed(chunk) is not None:
                break
    except HandshakeRejected as exc:
        assert exc.status in (400, 431)


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_garbage_after_a_valid_request_line_is_rejected_or_parsed(tail: bytes) -> None:
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    try:
        parser.feed(b"GET / HTTP/1.1\r\n" + tail)
    except HandshakeRejected as exc:
        assert exc.status in (400, 431)


def test_eof_before_any_byte_is_a_silent_close() -> None:
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    assert parser.feed(b"") is None and parser.closed


def test_eof_mid_request_is_400() -> None:
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    assert parser.feed(GOOD[:20]) is None
    with pytest.raises(HandshakeRejected) as info:
        parser.feed(b"")
    assert info.value.status == 400


def test_oversize_head_is_431() -> None:
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    with pytest.raises(HandshakeRejected) as info:
        parser.feed(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * MAX_REQUEST_HEAD)
    assert info.value.status == 431


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET http://evil.example/ HTTP/1.1\r\nHost: x\r\n\r\n",  # forward-proxy form
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Inject: a\rb\r\n\r\n",  # CR in a value
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",  # a body
    ],
)
def test_hostile_requests_are_400(request_bytes: bytes) -> None:
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    with pytest.raises(HandshakeRejected) as info:
        parser.feed(request_bytes)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "coding",
    [b"Transfer-Encoding: gzip\r\n", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n"],
)
def test_a_transfer_coding_it_does_not_implement_gets_501(coding: bytes) -> None:
    """RFC 9112 6.1 (and nginx): 501, not a parse of a body the gateway cannot frame."""
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    with pytest.raises(HandshakeRejected) as caught:
        parser.feed(GOOD.replace(b"\r\n\r\n", b"\r\n" + coding + b"\r\n"))
    assert caught.value.status == 501
    assert caught.value.reason == "MalformedRequest"


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (b"Host: other\r\n", "two Host headers"),
        (b"X-A: a\x01b\r\n", "a control character"),
        (b"X-A: a\r\n b\r\n", "obs-fold"),
    ],
)
def test_what_llhttp_or_rfc_9112_refuses_is_400(extra: bytes, why: str) -> None:
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    with pytest.raises(HandshakeRejected) as info:
        parser.feed(GOOD.replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n"))
    assert info.value.status == 400, why
    assert info.value.reason == "MalformedRequest"


def test_no_host_is_400_and_the_error_quotes_no_request_bytes() -> None:
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    secret = b"Authorization: Bearer s3cr3t\x01\r\n"
    with pytest.raises(HandshakeRejected) as info:
        parser.feed(b"GET / HTTP/1.1\r\n" + secret + b"\r\n")
    assert info.value.status == 400 and "s3cr3t" not in info.value.message
    with pytest.raises(HandshakeRejected) as info:
        RequestParser(client_ip="127.0.0.1", secure=False).feed(b"GET / HTTP/1.1\r\nX: y\r\n\r\n")
    assert info.value.status == 400 and "Host" in info.value.message


def test_values_lose_surrounding_whitespace_and_keep_their_bytes() -> None:
    request = RequestParser(client_ip="127.0.0.1", secure=False).feed(
        GOOD.replace(b"\r\n\r\n", b"\r\nX-Name: \t Jos\xc3\xa9 \t\r\n\r\n")
    )
    assert request is not None
    assert request.header("x-name") == "Jos\xc3\xa9"  # latin-1: the client's bytes one for one


def test_a_pipelined_second_request_is_neither_parsed_nor_an_error() -> None:
    # Not an upgrade: the first request is returned (to be refused with 426) and what
    # follows it is kept aside, whatever it is.
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    request = parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00garbage")
    assert request is not None and request.path == "/"
    assert request.header("host") == "x"
