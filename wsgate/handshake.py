"""The opening handshake, sans-io: validate, route, rewrite headers, format responses.

Nothing here awaits or touches a socket; :mod:`wsgate.gateway` and
:mod:`wsgate.backend` feed it bytes and send what it returns. This module is
also the single owner of the hop-by-hop header rule (:func:`end_to_end`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from http import HTTPStatus
from urllib.parse import parse_qsl, urlencode

import attrs
import h11
from wsproto.utilities import generate_accept_token

from .errors import BackendProtocolError, BackendRejected, HandshakeRejected

#: Request line plus headers larger than this are refused with 431.
MAX_REQUEST_HEAD = 16 * 1024

Headers = list[tuple[str, str]]

# RFC 9110 7.6.1: meaningful only for one hop, never forwarded.
_HOP_BY_HOP = frozenset(
    {
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
)
# Each hop of a WebSocket handshake has its own; the gateway makes its own (and
# every Sec-WebSocket-* header, matched by prefix in end_to_end).
_PER_HANDSHAKE = frozenset({"host", "content-length", "x-forwarded-proto", "x-forwarded-host"})


@attrs.frozen
class ClientRequest:
    """A client's parsed opening handshake (header names lower-cased)."""

    method: str
    target: str
    headers: Headers
    client_ip: str
    secure: bool = False
    #: The peer that sent the request when ``client_ip`` came from trusted proxies'
    #: headers (wsgate.clientaddr); None: the peer is the client.
    peer_ip: str | None = None

    @property
    def path(self) -> str:
        """The request path, without the query."""
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        """The raw query string ('' when there is none)."""
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_list(self, name: str) -> list[str]:
        """All comma-separated tokens of every ``name`` header, stripped."""
        return [
            item.strip()
            for key, value in self.headers
            if key == name
            for item in value.split(",")
            if item.strip()
        ]


# h11 quotes the offending bytes in some messages ("illegal header line:
# bytearray(b'...')"); that line may be an Authorization or Cookie header.
_QUOTED_BYTES = re.compile(r":? *(?:bytearray\()?b['\"].*", re.DOTALL)


def describe_http_error(exc: h11.ProtocolError) -> str:
    """h11's complaint, without the bytes it quotes: they may hold secrets."""
    return _QUOTED_BYTES.sub("", str(exc))


class RequestParser:
    """Sans-io reader of one opening request: feed bytes, get a :class:`ClientRequest`.

    Raises HandshakeRejected for anything that is not a well-formed HTTP/1.1
    request head of at most MAX_REQUEST_HEAD bytes (431 past it), for a request
    with a body, and for absolute-form targets (the gateway is not a forward
    proxy). ``feed(b"")`` means end of stream; ``closed`` is then True when the
    client left without sending a byte, which deserves no response at all.
    """

    def __init__(self, *, client_ip: str, secure: bool) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self._client_ip = client_ip
        self._secure = secure
        self._request: h11.Request | None = None
        self._received = 0
        self.closed = False

    @property
    def trailing(self) -> bytes:
        """Bytes the client sent after its request head (early frames)."""
        return bytes(self._conn.trailing_data[0])

    def feed(self, data: bytes | bytearray | memoryview) -> ClientRequest | None:
        """Take the next bytes; return the request once its head is complete."""
        if not data and not self._received:
            self.closed = True
            return None
        self._received += len(data)
        self._conn.receive_data(bytes(data))
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                too_large = status == 431
                raise HandshakeRejected(
                    status,
                    "request header fields too large"
                    if too_large
                    else f"malformed request: {describe_http_error(exc)}",
                    reason="RequestHeaderTooLarge" if too_large else "MalformedRequest",
                ) from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                # PAUSED: the request was returned already; more bytes only add
                # to ``trailing`` (h11 would answer PAUSED forever).
                return None
            if isinstance(event, h11.Request):
                # h11 checks max_incomplete_event_size only while the head is still
                # incomplete: a head that completes within one feed() can exceed it.
                if self._received - len(self._conn.trailing_data[0]) > MAX_REQUEST_HEAD:
                    raise HandshakeRejected(
                        431, "request header fields too large", reason="RequestHeaderTooLarge"
                    )
                self._request = event
            elif isinstance(event, h11.Data):
                raise HandshakeRejected(
                    400, "a handshake request has no body", reason="BadHandshake"
                )
            elif isinstance(event, h11.EndOfMessage):
                return self._finish()
            elif isinstance(event, h11.ConnectionClosed):
                self.closed = True
                return None

    def _finish(self) -> ClientRequest:
        request = self._request
        assert request is not None
        target = request.target.decode("ascii", "replace")
        if not target.startswith("/"):
            raise HandshakeRejected(400, "request target must be a path", reason="BadHandshake")
        return ClientRequest(
            method=request.method.decode("ascii"),
            target=target,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers],
            client_ip=self._client_ip,
            secure=self._secure,
        )


@attrs.frozen
class Upgrade:
    """What a valid upgrade request offers."""

    key: str
    protocols: list[str]
    extensions: str | None  # the raw offer, forwarded as-is


def validate_upgrade(request: ClientRequest) -> Upgrade:
    """Check that ``request`` is a WebSocket opening handshake (RFC 6455 4.2.1).

    Raises HandshakeRejected: 426 for a plain HTTP request (so a browser or curl
    learns what this port speaks), 400 for a broken upgrade.
    """
    upgrade = [t.lower() for t in request.header_list("upgrade")]
    if "websocket" not in upgrade:
        raise HandshakeRejected(
            426,
            "this endpoint only accepts WebSocket upgrade requests",
            reason="NotAWebSocketRequest",
            headers=[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
        )
    if request.method != "GET":
        raise HandshakeRejected(400, "WebSocket handshake must use GET", reason="BadHandshake")
    if "upgrade" not in (t.lower() for t in request.header_list("connection")):
        raise HandshakeRejected(
            400, "Connection header must include 'Upgrade'", reason="BadHandshake"
        )
    if request.header("sec-websocket-version") != "13":
        raise HandshakeRejected(
            426,
            "unsupported Sec-WebSocket-Version (only 13 is supported)",
            reason="BadHandshake",
            headers=[("Sec-WebSocket-Version", "13")],
        )
    key = request.header("sec-websocket-key") or ""
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        raise HandshakeRejected(
            400, "Sec-WebSocket-Key must be 16 base64-encoded bytes", reason="BadHandshake"
        )
    offer = ", ".join(v for k, v in request.headers if k == "sec-websocket-extensions")
    return Upgrade(key, request.header_list("sec-websocket-protocol"), offer or None)


def end_to_end(headers: Iterable[tuple[str, str]]) -> Headers:
    """Drop hop-by-hop and per-handshake headers; the one place this rule lives.

    Every ``Sec-WebSocket-*`` header belongs to one hop's handshake, not only the
    five RFC 6455 defines. Also drops any header the sender named in its
    Connection header, as RFC 9110 requires of every proxy.
    """
    headers = list(headers)
    named = {
        token.strip().lower()
        for key, value in headers
        if key.lower() == "connection"
        for token in value.split(",")
    }
    return [
        (key, value)
        for key, value in headers
        if (low := key.lower()) not in _HOP_BY_HOP
        and low not in _PER_HANDSHAKE
        and not low.startswith("sec-websocket-")
        and low not in named
    ]


def backend_headers(
    request: ClientRequest, upgrade: Upgrade, *, gateway_host: str | None
) -> Headers:
    """The end-to-end headers to send the backend, plus the X-Forwarded-* trio.

    ``Host``, the upgrade headers and the key are added by the backend
    connector, which owns that handshake.
    """
    headers = end_to_end(request.headers)
    forwarded_for = [v for k, v in headers if k == "x-forwarded-for"]
    headers = [(k, v) for k, v in headers if k != "x-forwarded-for"]
    # The chain grows by the hop that sent the request, even when the client is
    # known to be further left: the backend sees every hop, as with any proxy.
    peer = request.peer_ip or request.client_ip
    headers.append(("x-forwarded-for", ", ".join([*forwarded_for, peer])))
    headers.append(("x-forwarded-proto", "wss" if request.secure else "ws"))
    if gateway_host:
        headers.append(("x-forwarded-host", gateway_host))
    if upgrade.protocols:
        headers.append(("sec-websocket-protocol", ", ".join(upgrade.protocols)))
    if upgrade.extensions:
        headers.append(("sec-websocket-extensions", upgrade.extensions))
    return headers


@attrs.frozen
class BackendAccept:
    """What the backend chose in its 101 answer."""

    subprotocol: str | None
    extensions: str | None
    headers: Headers  # its end-to-end headers, passed on to the client


def check_backend_101(headers: Headers, *, key: str, upgrade: Upgrade) -> BackendAccept:
    """Validate the backend's 101 response against what was offered (RFC 6455 4.1).

    Raises BackendProtocolError when the backend accepted something the client
    never offered or got the accept token wrong.
    """
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value)

    def tokens(name: str) -> list[str]:
        return [t.strip().lower() for v in values.get(name, []) for t in v.split(",")]

    if "websocket" not in tokens("upgrade") or "upgrade" not in tokens("connection"):
        raise BackendProtocolError("backend's 101 lacks 'Upgrade: websocket'")
    if values.get("sec-websocket-accept") != [generate_accept_token(key.encode()).decode()]:
        raise BackendProtocolError("backend's Sec-WebSocket-Accept is wrong")
    chosen = values.get("sec-websocket-protocol", [])
    if len(chosen) > 1 or (chosen and chosen[0] not in upgrade.protocols):
        raise BackendProtocolError(f"backend chose a subprotocol not offered: {chosen}")
    extensions = ", ".join(values.get("sec-websocket-extensions", [])) or None
    if extensions:
        offered = _extension_names(upgrade.extensions or "")
        if not _extension_names(extensions) <= offered:
            raise BackendProtocolError(f"backend accepted extensions not offered: {extensions}")
    return BackendAccept(chosen[0] if chosen else None, extensions, end_to_end(headers))


def _extension_names(header: str) -> set[str]:
    return {item.split(";")[0].strip().lower() for item in header.split(",") if item.strip()}


def switching_protocols(client_key: str, accept: BackendAccept) -> bytes:
    """The 101 response for the client, carrying the backend's choices."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {generate_accept_token(client_key.encode()).decode()}",
    ]
    # An empty Sec-WebSocket-Protocol header makes browsers fail the connection.
    if accept.subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {accept.subprotocol}")
    if accept.extensions:
        lines.append(f"Sec-WebSocket-Extensions: {accept.extensions}")
    lines.extend(f"{name}: {value}" for name, value in accept.headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def error_response(rejection: HandshakeRejected) -> bytes:
    """A complete ``Connection: close`` HTTP response for a refused handshake.

    The body is the backend's (capped) body when the backend refused, else a
    small JSON document ``{"statusCode": ..., "message": ...}``.
    """
    body = rejection.body
    content_type = "application/json"
    if body is None:
        body = json.dumps({"statusCode": rejection.status, "message": rejection.message}).encode()
    else:
        content_type = next(
            (v for k, v in rejection.headers if k.lower() == "content-type"),
            "application/octet-stream",
        )
    try:
        phrase = HTTPStatus(rejection.status).phrase
    except ValueError:
        phrase = "Error"
    extra = [
        (name, value)
        for name, value in rejection.headers
        if name.lower() not in ("content-type", "content-length", "connection")
        # A refusing backend's own headers (cookies, caching...) stay on its hop.
        and (
            not isinstance(rejection, BackendRejected)
            or name.lower() in ("retry-after", "www-authenticate")
        )
    ]
    # RFC 9110 7.8: whoever sends Upgrade (a 426) must list it in Connection too.
    upgrading = any(name.lower() == "upgrade" for name, _ in extra)
    lines = [
        f"HTTP/1.1 {rejection.status} {phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: Upgrade, close" if upgrading else "Connection: close",
        *(f"{name}: {value}" for name, value in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# Query parameters whose values never reach a log line.
SECRET_PARAMS = frozenset(
    {
        "subscription-key",
        "access_token",
        "token",
        "id_token",
        "api_key",
        "apikey",
        "key",
        "code",
        "sig",
        "signature",
        "password",
        "secret",
    }
)


def redact_target(target: str, extra: Iterable[str] = ()) -> str:
    """``target`` with the values of secret-bearing query parameters replaced.

    ``extra``: more parameter names (lower case) to redact, beyond SECRET_PARAMS.
    """
    path, sep, query = target.partition("?")
    if not sep:
        return path
    secret = SECRET_PARAMS.union(name.lower() for name in extra)
    pairs = [
        (k, "REDACTED" if k.lower() in secret else v)
        for k, v in parse_qsl(query, keep_blank_values=True)
    ]
    return f"{path}?{urlencode(pairs, safe='/:')}"
