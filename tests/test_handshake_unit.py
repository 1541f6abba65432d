"""Sans-io tests of the opening handshake, routing and close-code rules (no sockets)."""

from __future__ import annotations

import base64
import json
from itertools import pairwise

import attrs
import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.utilities import generate_accept_token

from wsgate.closing import LOCAL_ONLY, End, close_plan
from wsgate.errors import BackendProtocolError, BackendRejected, HandshakeRejected
from wsgate.handshake import (
    MAX_REQUEST_HEAD,
    BackendAccept,
    ClientRequest,
    RequestParser,
    Upgrade,
    backend_headers,
    check_backend_101,
    end_to_end,
    error_response,
    redact_target,
    switching_protocols,
    validate_upgrade,
)
from wsgate.routing import Router

KEY = base64.b64encode(b"0123456789abcdef").decode()

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


def request(
    headers: list[tuple[str, str]] | None = None,
    *,
    method: str = "GET",
    target: str = "/echo",
    base: bool = True,
    secure: bool = False,
) -> ClientRequest:
    """A ClientRequest; ``base`` adds a complete, valid set of upgrade headers first."""
    valid = [
        ("host", "gateway.test"),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", KEY),
        ("sec-websocket-version", "13"),
    ]
    return ClientRequest(
        method=method,
        target=target,
        headers=[*(valid if base else []), *(headers or [])],
        client_ip="127.0.0.1",
        secure=secure,
    )


def without(name: str) -> ClientRequest:
    req = request()
    return attrs.evolve(req, headers=[(k, v) for k, v in req.headers if k != name])


def replaced(name: str, value: str) -> ClientRequest:
    req = request()
    return attrs.evolve(req, headers=[(k, value if k == name else v) for k, v in req.headers])


def parse_http(data: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Parse one complete HTTP response with h11 (which also checks it is well-formed)."""
    conn = h11.Connection(h11.CLIENT)
    upgrade = [("Host", "x"), ("Upgrade", "websocket"), ("Connection", "Upgrade")]
    conn.send(h11.Request(method="GET", target="/", headers=upgrade))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    response = conn.next_event()
    assert isinstance(response, h11.Response | h11.InformationalResponse), response
    headers = [(k.decode(), v.decode()) for k, v in response.headers]
    body = b""
    if isinstance(response, h11.Response):
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            body += event.data
    return response.status_code, headers, body


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


# -- validate_upgrade ------------------------------------------------------------------


def test_valid_upgrade_offers_protocols_and_extensions() -> None:
    req = request(
        [
            ("sec-websocket-protocol", "chat, superchat"),
            ("sec-websocket-protocol", "v3"),
            ("sec-websocket-extensions", "permessage-deflate; client_max_window_bits"),
            ("sec-websocket-extensions", "x-foo"),
        ]
    )
    upgrade = validate_upgrade(req)
    assert upgrade == Upgrade(
        key=KEY,
        protocols=["chat", "superchat", "v3"],
        extensions="permessage-deflate; client_max_window_bits, x-foo",
    )


@pytest.mark.parametrize(
    "headers",
    [
        [("upgrade", "WebSocket"), ("connection", "keep-alive, Upgrade")],  # Firefox
        [("upgrade", "h2c, websocket"), ("connection", "UPGRADE")],
    ],
)
def test_upgrade_tokens_are_case_insensitive_lists(headers: list[tuple[str, str]]) -> None:
    req = request(
        [*headers, ("sec-websocket-key", KEY), ("sec-websocket-version", "13")], base=False
    )
    upgrade = validate_upgrade(req)
    assert upgrade.key == KEY
    assert upgrade.protocols == []
    assert upgrade.extensions is None


def test_plain_http_request_gets_426_with_upgrade_header() -> None:
    with pytest.raises(HandshakeRejected) as info:
        validate_upgrade(without("upgrade"))
    assert info.value.status == 426
    assert ("Upgrade", "websocket") in info.value.headers
    assert info.value.reason == "NotAWebSocketRequest"


def test_post_upgrade_gets_400() -> None:
    with pytest.raises(HandshakeRejected) as info:
        validate_upgrade(request(method="POST"))
    assert info.value.status == 400
    assert "GET" in info.value.message


@pytest.mark.parametrize("connection", [None, "keep-alive", "close"])
def test_connection_without_upgrade_gets_400(connection: str | None) -> None:
    req = without("connection") if connection is None else replaced("connection", connection)
    with pytest.raises(HandshakeRejected) as info:
        validate_upgrade(req)
    assert info.value.status == 400
    assert "Connection" in info.value.message


@pytest.mark.parametrize("version", ["8", "12", "14", None])
def test_wrong_version_gets_426_naming_13(version: str | None) -> None:
    req = (
        without("sec-websocket-version")
        if version is None
        else replaced("sec-websocket-version", version)
    )
    with pytest.raises(HandshakeRejected) as info:
        validate_upgrade(req)
    assert info.value.status == 426
    assert ("Sec-WebSocket-Version", "13") in info.value.headers


@pytest.mark.parametrize(
    "key",
    [
        None,
        "",
        base64.b64encode(b"x" * 15).decode(),
        base64.b64encode(b"x" * 17).decode(),
        base64.b64encode(b"x" * 32).decode(),
        base64.b64encode(b"x" * 16).decode().rstrip("="),  # padding missing
        "!!!!!!!!!!!!!!!!!!!!!!==",  # right length, not base64
        "dGhlIHNhbXBsZSBub25j ZQ==",  # embedded space
        "dGhlIHNhbXBsZSBub25jZQ==\u00e9",  # non-ASCII tail
    ],
)
def test_bad_key_gets_400(key: str | None) -> None:
    req = without("sec-websocket-key") if key is None else replaced("sec-websocket-key", key)
    with pytest.raises(HandshakeRejected) as info:
        validate_upgrade(req)
    assert info.value.status == 400
    assert "Sec-WebSocket-Key" in info.value.message


def test_rfc_sample_key_is_valid() -> None:
    req = replaced("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    assert validate_upgrade(req).key == "dGhlIHNhbXBsZSBub25jZQ=="


# -- RequestParser: the head size limit ------------------------------------------------


def head_of_size(size: int) -> bytes:
    """A valid upgrade request head of exactly ``size`` bytes (final CRLF CRLF included)."""
    head = (
        "GET /echo HTTP/1.1\r\nHost: gateway.test\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    )
    filler = size - len(head) - len("X-Filler: \r\n\r\n")
    data = (head + "X-Filler: " + "a" * filler + "\r\n\r\n").encode()
    assert len(data) == size
    return data


def feed_in_chunks(data: bytes, cuts: list[int]) -> ClientRequest | None:
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    bounds = sorted({0, *(c % len(data) for c in cuts), len(data)})
    for start, end in pairwise(bounds):
        request = parser.feed(data[start:end])
        if request is not None:
            return request
    return None


@pytest.mark.parametrize("size", [MAX_REQUEST_HEAD - 1, MAX_REQUEST_HEAD])
def test_head_up_to_the_limit_parses_in_one_piece(size: int) -> None:
    request = feed_in_chunks(head_of_size(size), [])
    assert request is not None and request.path == "/echo"


@pytest.mark.parametrize("size", [MAX_REQUEST_HEAD + 1, 17 * 1024, 24 * 1024 - 1, 64 * 1024])
def test_head_over_the_limit_is_431_even_when_it_arrives_whole(size: int) -> None:
    with pytest.raises(HandshakeRejected) as info:
        feed_in_chunks(head_of_size(size), [])
    assert info.value.status == 431
    assert info.value.reason == "RequestHeaderTooLarge"


@given(
    st.integers(MAX_REQUEST_HEAD - 300, MAX_REQUEST_HEAD + 9000),
    st.lists(st.integers(1, 1 << 20), max_size=5),
)
def test_head_limit_does_not_depend_on_how_bytes_arrive(size: int, cuts: list[int]) -> None:
    data = head_of_size(size)
    if size <= MAX_REQUEST_HEAD:
        assert feed_in_chunks(data, cuts) is not None
    else:
        with pytest.raises(HandshakeRejected) as info:
            feed_in_chunks(data, cuts)
        assert info.value.status == 431


def test_early_frames_behind_a_full_size_head_do_not_count() -> None:
    early = b"\x81\x85" + b"\x00" * 4 + b"hello" + b"x" * 8000
    parser = RequestParser(client_ip="127.0.0.1", secure=False)
    request = parser.feed(head_of_size(MAX_REQUEST_HEAD) + early)
    assert request is not None
    assert parser.trailing == early


# -- end_to_end ------------------------------------------------------------------------


def test_end_to_end_drops_hop_by_hop_and_connection_named_headers() -> None:
    headers = [
        ("Host", "gateway.test"),
        ("Connection", "Upgrade, X-Hop-One ,x-hop-two"),
        ("Upgrade", "websocket"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "0"),
        ("X-Hop-One", "1"),
        ("X-HOP-TWO", "2"),
        ("Sec-WebSocket-Key", KEY),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", "chat"),
        ("Sec-WebSocket-Extensions", "permessage-deflate"),
        ("Sec-WebSocket-Accept", "x"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "spoofed.example"),
        ("Authorization", "Bearer abc"),
        ("Cookie", "a=1; b=2"),
        ("Origin", "https://app.example"),
        ("User-Agent", "test/1.0"),
        ("X-Custom", "kept"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("Cookie", "c=3"),
    ]
    assert end_to_end(headers) == [
        ("Authorization", "Bearer abc"),
        ("Cookie", "a=1; b=2"),
        ("Origin", "https://app.example"),
        ("User-Agent", "test/1.0"),
        ("X-Custom", "kept"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("Cookie", "c=3"),
    ]


def test_end_to_end_accepts_any_iterable() -> None:
    headers = iter([("connection", "x-a"), ("x-a", "1"), ("x-b", "2")])
    assert end_to_end(headers) == [("x-b", "2")]


_TOKEN = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}", fullmatch=True)


def _random_case(draw: st.DrawFn, name: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if flip else c for c, flip in zip(name, flips, strict=True))


@st.composite
def header_names(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["hop", "sec", "token", "end-to-end"]))
    if kind == "hop":
        name = draw(st.sampled_from(sorted(HOP_BY_HOP)))
    elif kind == "sec":
        name = "sec-websocket-" + draw(
            st.sampled_from(["key", "version", "accept", "protocol", "extensions"]) | _TOKEN
        )
    elif kind == "end-to-end":
        name = draw(st.sampled_from(["authorization", "cookie", "origin", "user-agent", "x-a"]))
    else:
        name = draw(_TOKEN)
    return _random_case(draw, name)


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[str, str]]:
    names = draw(st.lists(header_names(), max_size=12))
    value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
    headers = [(name, draw(value)) for name in names]
    # Connection headers listing some of those names (and others), loosely spaced.
    for _ in range(draw(st.integers(0, 2))):
        listed = draw(st.lists(st.sampled_from(names) if names else _TOKEN, max_size=3))
        listed += draw(st.lists(_TOKEN, max_size=2))
        sep = draw(st.sampled_from([",", ", ", " ,\t", " , "]))
        position = draw(st.integers(0, len(headers)))
        headers.insert(position, (_random_case(draw, "connection"), sep.join(listed)))
    return headers


@given(header_lists())
def test_end_to_end_never_forwards_hop_or_handshake_headers(
    headers: list[tuple[str, str]],
) -> None:
    named = {
        token.strip().lower()
        for key, value in headers
        if key.lower() == "connection"
        for token in value.split(",")
    }
    result = end_to_end(headers)
    for name, _ in result:
        low = name.lower()
        assert low not in HOP_BY_HOP
        assert not low.startswith("sec-websocket-"), name
        assert low not in named
        assert low not in {"host", "content-length", "x-forwarded-proto", "x-forwarded-host"}
    # Everything else survives, in order, untouched.
    expected = [
        (k, v)
        for k, v in headers
        if k.lower() not in HOP_BY_HOP
        and not k.lower().startswith("sec-websocket-")
        and k.lower() not in named
        and k.lower() not in {"host", "content-length", "x-forwarded-proto", "x-forwarded-host"}
    ]
    assert result == expected


# -- backend_headers -------------------------------------------------------------------


def test_backend_headers_append_client_to_forwarded_for_chain() -> None:
    req = request(
        [
            ("x-forwarded-for", "203.0.113.7, 10.0.0.2"),
            ("x-forwarded-for", "10.0.0.3"),
            ("x-forwarded-proto", "https"),  # spoofed: replaced
            ("x-forwarded-host", "evil.example"),  # spoofed: replaced
            ("authorization", "Bearer t"),
        ]
    )
    headers = backend_headers(req, validate_upgrade(req), gateway_host="gw.example:8443")
    assert values(headers, "x-forwarded-for") == ["203.0.113.7, 10.0.0.2, 10.0.0.3, 127.0.0.1"]
    assert values(headers, "x-forwarded-proto") == ["ws"]
    assert values(headers, "x-forwarded-host") == ["gw.example:8443"]
    assert values(headers, "authorization") == ["Bearer t"]
    for name in ("host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version"):
        assert values(headers, name) == [], name


def test_backend_headers_start_a_chain_and_say_wss_for_tls_clients() -> None:
    req = request(secure=True)
    headers = backend_headers(req, validate_upgrade(req), gateway_host=None)
    assert values(headers, "x-forwarded-for") == ["127.0.0.1"]
    assert values(headers, "x-forwarded-proto") == ["wss"]
    assert values(headers, "x-forwarded-host") == []
    assert values(headers, "sec-websocket-protocol") == []
    assert values(headers, "sec-websocket-extensions") == []


def test_backend_headers_offer_the_clients_protocols_and_extensions() -> None:
    req = request(
        [
            ("sec-websocket-protocol", "a, b"),
            ("sec-websocket-protocol", "c"),
            ("sec-websocket-extensions", "permessage-deflate; client_max_window_bits"),
        ]
    )
    headers = backend_headers(req, validate_upgrade(req), gateway_host="gateway.test")
    assert values(headers, "sec-websocket-protocol") == ["a, b, c"]
    assert values(headers, "sec-websocket-extensions") == [
        "permessage-deflate; client_max_window_bits"
    ]


# -- check_backend_101 -----------------------------------------------------------------

BACKEND_KEY = base64.b64encode(b"fedcba9876543210").decode()
GOOD_ACCEPT = generate_accept_token(BACKEND_KEY.encode()).decode()


def response_101(*extra: tuple[str, str], accept: str = GOOD_ACCEPT) -> list[tuple[str, str]]:
    return [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept),
        *extra,
    ]


OFFER = Upgrade(key=KEY, protocols=["a", "b"], extensions="permessage-deflate; x=1")


def test_good_101_reports_choices_and_end_to_end_headers() -> None:
    accept = check_backend_101(
        response_101(
            ("Sec-WebSocket-Protocol", "b"),
            ("Sec-WebSocket-Extensions", "permessage-deflate; server_no_context_takeover"),
            ("Set-Cookie", "session=1"),
            ("Keep-Alive", "timeout=1"),
        ),
        key=BACKEND_KEY,
        upgrade=OFFER,
    )
    assert accept == BackendAccept(
        subprotocol="b",
        extensions="permessage-deflate; server_no_context_takeover",
        headers=[("Set-Cookie", "session=1")],
    )


def test_101_without_choices() -> None:
    upgrade = Upgrade(key=KEY, protocols=[], extensions=None)
    accept = check_backend_101(response_101(), key=BACKEND_KEY, upgrade=upgrade)
    assert accept == BackendAccept(subprotocol=None, extensions=None, headers=[])


@pytest.mark.parametrize(
    ("headers", "complaint"),
    [
        (response_101(accept=generate_accept_token(KEY.encode()).decode()), "Accept"),
        (response_101(accept=""), "Accept"),
        ([("Connection", "Upgrade"), ("Sec-WebSocket-Accept", GOOD_ACCEPT)], "Upgrade"),
        ([("Upgrade", "websocket"), ("Sec-WebSocket-Accept", GOOD_ACCEPT)], "Upgrade"),
        (response_101(("Sec-WebSocket-Protocol", "c")), "subprotocol"),
        (response_101(("Sec-WebSocket-Protocol", "a"), ("Sec-WebSocket-Protocol", "b")), "sub"),
        (response_101(("Sec-WebSocket-Protocol", "a, b")), "subprotocol"),
        (response_101(("Sec-WebSocket-Extensions", "x-webkit-deflate-frame")), "extension"),
        (
            response_101(("Sec-WebSocket-Extensions", "permessage-deflate, x-other")),
            "extension",
        ),
    ],
)
def test_bad_101_is_a_backend_protocol_error(
    headers: list[tuple[str, str]], complaint: str
) -> None:
    with pytest.raises(BackendProtocolError) as info:
        check_backend_101(headers, key=BACKEND_KEY, upgrade=OFFER)
    assert info.value.status == 502
    assert complaint in info.value.message


def test_extension_when_none_was_offered_is_refused() -> None:
    upgrade = Upgrade(key=KEY, protocols=[], extensions=None)
    with pytest.raises(BackendProtocolError):
        check_backend_101(
            response_101(("Sec-WebSocket-Extensions", "permessage-deflate")),
            key=BACKEND_KEY,
            upgrade=upgrade,
        )


# -- switching_protocols ---------------------------------------------------------------


def test_switching_protocols_without_choices_has_no_protocol_header() -> None:
    data = switching_protocols(KEY, BackendAccept(None, None, []))
    status, headers, _ = parse_http(data)
    assert status == 101
    assert values(headers, "sec-websocket-accept") == [generate_accept_token(KEY.encode()).decode()]
    assert values(headers, "upgrade") == ["websocket"]
    assert values(headers, "sec-websocket-protocol") == []
    assert values(headers, "sec-websocket-extensions") == []
    assert b"Sec-WebSocket-Protocol" not in data


def test_switching_protocols_carries_the_backends_choices_and_headers() -> None:
    accept = BackendAccept("b", "permessage-deflate", [("Set-Cookie", "s=1")])
    status, headers, _ = parse_http(switching_protocols(KEY, accept))
    assert status == 101
    assert values(headers, "sec-websocket-protocol") == ["b"]
    assert values(headers, "sec-websocket-extensions") == ["permessage-deflate"]
    assert values(headers, "set-cookie") == ["s=1"]


# -- error_response --------------------------------------------------------------------


def test_error_response_is_json_and_closes() -> None:
    rejection = HandshakeRejected(404, "no API at this path", reason="ApiNotFound")
    status, headers, body = parse_http(error_response(rejection))
    assert status == 404
    assert json.loads(body) == {"statusCode": 404, "message": "no API at this path"}
    assert values(headers, "content-type") == ["application/json"]
    assert values(headers, "connection") == ["close"]


def test_error_response_keeps_retry_after_and_upgrade_hints() -> None:
    rejection = HandshakeRejected(
        503,
        "gateway is at capacity",
        reason="CapacityExceeded",
        headers=[("Retry-After", "1"), ("Content-Length", "999"), ("Connection", "keep-alive")],
    )
    status, headers, body = parse_http(error_response(rejection))
    assert status == 503
    assert values(headers, "retry-after") == ["1"]
    assert values(headers, "content-length") == [str(len(body))]
    assert values(headers, "connection") == ["close"]
    assert json.loads(body)["statusCode"] == 503


def test_426_lists_upgrade_in_connection() -> None:
    # RFC 9110 7.8: a sender of Upgrade MUST also send the "upgrade" connection option.
    upgrade = HandshakeRejected(426, "ws only", reason="x", headers=[("Upgrade", "websocket")])
    status, headers, _ = parse_http(error_response(upgrade))
    assert status == 426
    assert values(headers, "upgrade") == ["websocket"]
    [connection] = values(headers, "connection")
    assert {t.strip().lower() for t in connection.split(",")} == {"upgrade", "close"}


def test_error_response_relays_a_backends_body_and_content_type() -> None:
    rejection = BackendRejected(
        403,
        "backend refused the handshake with 403",
        body=b"<h1>go away</h1>",
        headers=[
            ("Content-Type", "text/html"),
            ("Content-Length", "16"),
            ("Retry-After", "30"),
            ("WWW-Authenticate", "Bearer"),
            ("Set-Cookie", "tracking=1"),  # not a refusal's business
            ("Server", "backend/1.0"),
        ],
    )
    status, headers, body = parse_http(error_response(rejection))
    assert status == 403
    assert body == b"<h1>go away</h1>"
    assert values(headers, "content-type") == ["text/html"]
    assert values(headers, "retry-after") == ["30"]
    assert values(headers, "www-authenticate") == ["Bearer"]
    assert values(headers, "set-cookie") == []
    assert values(headers, "server") == []


def test_error_response_backend_body_without_content_type() -> None:
    rejection = BackendRejected(418, "teapot", body=b"", headers=[])
    status, headers, body = parse_http(error_response(rejection))
    assert (status, body) == (418, b"")
    assert values(headers, "content-type") == ["application/octet-stream"]


def test_error_response_unknown_status_still_parses() -> None:
    rejection = BackendRejected(599, "odd", body=b"x", headers=[])
    assert error_response(rejection).startswith(b"HTTP/1.1 599 Error\r\n")
    assert parse_http(error_response(rejection))[0] == 599


# -- redact_target ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/echo", "/echo"),
        ("/echo?room=1", "/echo?room=1"),
        ("/echo?token=s3cret&room=1", "/echo?token=REDACTED&room=1"),
        ("/echo?Access_Token=s3cret", "/echo?Access_Token=REDACTED"),
        (
            "/echo?subscription-key=abc&sig=def&x=",
            "/echo?subscription-key=REDACTED&sig=REDACTED&x=",
        ),
        ("/echo?tok%65n=s3cret", "/echo?token=REDACTED"),  # encoded names are still names
        ("/echo?token", "/echo?token=REDACTED"),
        ("/echo?next=/a/b:c", "/echo?next=/a/b:c"),
    ],
)
def test_redact_target(target: str, expected: str) -> None:
    assert redact_target(target) == expected


def test_redact_target_extra_names() -> None:
    assert redact_target("/e?Session=abc&token=x&y=1", ["session"]) == (
        "/e?Session=REDACTED&token=REDACTED&y=1"
    )


@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30))
def test_redact_target_never_leaks_a_token_value(secret: str) -> None:
    redacted = redact_target("/e?a=1&token=" + secret.replace("&", "").replace("#", ""))
    assert redacted.startswith("/e?a=1&token=REDACTED")


# -- Router ----------------------------------------------------------------------------


@attrs.frozen
class Api:
    path: str


def test_router_longest_suffix_wins() -> None:
    chat, rooms, room1 = Api("chat"), Api("chat/rooms"), Api("/chat/rooms/1/")
    router = Router([chat, rooms, room1])
    assert router.match("/chat/rooms/1/x") == (room1, "/x")
    assert router.match("/chat/rooms/2") == (rooms, "/2")
    assert router.match("/chat/other") == (chat, "/other")
    assert router.match("/chat") == (chat, "")


def test_router_matches_on_segment_boundaries() -> None:
    chat = Api("chat")
    router = Router([chat])
    assert router.match("/chatroom") is None
    assert router.match("/chat-x") is None
    assert router.match("/cha") is None
    assert router.match("/x/chat") is None
    assert router.match("/") is None
    assert router.match("") is None


def test_router_trailing_and_doubled_slashes() -> None:
    chat = Api("chat/")
    router = Router([chat])
    assert router.match("/chat/") == (chat, "/")
    assert router.match("//chat") == (chat, "")
    assert router.match("/chat//x") == (chat, "//x")


def test_router_root_api_catches_the_rest() -> None:
    root, chat = Api(""), Api("chat")
    router = Router([root, chat])
    assert router.match("/chat/1") == (chat, "/1")
    assert router.match("/chatroom") == (root, "/chatroom")
    assert router.match("/a/b") == (root, "/a/b")
    assert router.match("/") == (root, "")
    assert router.match("") == (root, "")


_SEGMENT = st.sampled_from(["a", "b", "ab", "chat", "x"])


@given(
    st.lists(st.lists(_SEGMENT, max_size=3).map("/".join), max_size=5, unique=True),
    st.lists(_SEGMENT, max_size=5).map("/".join),
    st.booleans(),
)
def test_router_matches_the_longest_api_prefix(
    api_paths: list[str], path: str, trailing_slash: bool
) -> None:
    router = Router([Api(p) for p in api_paths])
    full = "/" + path + ("/" if trailing_slash and path else "")
    trimmed = full.lstrip("/")
    candidates = [p for p in api_paths if p == "" or trimmed == p or trimmed.startswith(p + "/")]
    result = router.match(full)
    if not candidates:
        assert result is None
        return
    assert result is not None
    api, rest = result
    best = max(candidates, key=len)
    assert api.path == best
    # The API's path and the rest put back together are the request path.
    assert (best + ("/" if best == "" and rest else "") + rest).strip("/") == trimmed.strip("/")
    assert rest == "" or rest.startswith("/")


# -- close codes -----------------------------------------------------------------------

GOING_AWAY, PROTOCOL, TOO_BIG, POLICY, INTERNAL = 1001, 1002, 1009, 1008, 1011

EXPECTED_PLANS = {
    End.CLIENT_CLOSED: ("client", None, None),
    End.BACKEND_CLOSED: ("backend", None, None),
    End.CLIENT_VANISHED: ("client", None, GOING_AWAY),
    End.BACKEND_VANISHED: ("backend", INTERNAL, None),
    End.CLIENT_PROTOCOL_ERROR: ("gateway", PROTOCOL, PROTOCOL),
    End.BACKEND_PROTOCOL_ERROR: ("gateway", PROTOCOL, PROTOCOL),
    End.CLIENT_MESSAGE_TOO_BIG: ("gateway", TOO_BIG, GOING_AWAY),
    End.BACKEND_MESSAGE_TOO_BIG: ("gateway", GOING_AWAY, TOO_BIG),
    End.CLOSE_TIMEOUT: ("gateway", None, None),
    End.IDLE_TIMEOUT: ("gateway", GOING_AWAY, GOING_AWAY),
    End.DRAIN: ("gateway", GOING_AWAY, GOING_AWAY),
    End.TERMINATED: ("gateway", POLICY, POLICY),
    End.INTERNAL_ERROR: ("gateway", INTERNAL, GOING_AWAY),
    End.ABORTED: ("gateway", None, None),
}
# RFC 6455 7.4: codes an endpoint may send (1004-1006 and 1015 are reserved/local).
SENDABLE = {1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)}


def test_every_end_has_an_expected_plan() -> None:
    assert set(EXPECTED_PLANS) == set(End)


@pytest.mark.parametrize("end", list(End), ids=lambda e: e.name)
def test_close_plan(end: End) -> None:
    plan = close_plan(end)
    assert (plan.closed_by, plan.to_client, plan.to_backend) == EXPECTED_PLANS[end]
    assert plan.reason == end.value
    for code in (plan.to_client, plan.to_backend):
        assert code not in LOCAL_ONLY
        assert code is None or code in SENDABLE
    # The default reason must fit in a close frame (125 bytes minus the code).
    assert len(plan.reason.encode()) <= 123
    # wsproto fails a connection on 1014, so a vanished backend must not earn it.
    assert 1014 not in (plan.to_client, plan.to_backend)


def test_close_plan_reason_override() -> None:
    plan = close_plan(End.TERMINATED, reason="operator said so")
    assert (plan.to_client, plan.to_backend, plan.reason) == (POLICY, POLICY, "operator said so")
    assert close_plan(End.DRAIN, reason="").reason == ""
