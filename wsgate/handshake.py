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
import httptools
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


def _parse_error(exc: Exception) -> str:
    """The parser's complaint: llhttp's reasons are fixed texts that quote no bytes."""
    return str(exc) or type(exc).__name__


def _field_value(value: bytes) -> str:
    # llhttp drops the optional whitespace before a value, not after it (RFC 9110 5.5).
    # latin-1: bytes 0x80-0xFF are legal in a value and must reach the backend unchanged.
    return value.decode("latin-1").rstrip(" \t")


class RequestParser:
    """Sans-io reader of one opening request: feed bytes, get a :class:`ClientRequest`.

    Raises HandshakeRejected for anything that is not a well-formed HTTP/1.x
    request head of at most MAX_REQUEST_HEAD bytes (431 past it), for a request
    with a body (501 for a transfer coding other than chunked, as nginx answers,
    RFC 9112 6.1), and for absolute-form targets (the gateway is not a forward
    proxy). ``feed(b"")`` means end of stream; ``closed`` is then True when the
    client left without sending a byte, which deserves no response at all.

    The parsing is llhttp's (through httptools, in strict mode): about twenty
    times cheaper per request than a pure-Python parser, and the same parser
    Node.js trusts on the open internet.
    """

    def __init__(self, *, client_ip: str, secure: bool) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._client_ip = client_ip
        self._secure = secure
        self._url = b""
        self._headers: Headers = []
        self._received = 0
        self._head_done = False
        self._done = False
        self._refusal: HandshakeRejected | None = None
        self._trailing = b""
        self.closed = False

    @property
    def trailing(self) -> bytes:
        """Bytes the client sent after its request head (early frames)."""
        return self._trailing

    # -- httptools callbacks ---------------------------------------------------------
    def on_url(self, url: bytes) -> None:
        if not self._head_done:
            self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_done:
            self._headers.append((name.decode("latin-1").lower(), _field_value(value)))

    def on_headers_complete(self) -> None:
        if self._head_done:
            return  # a pipelined request behind one that is not an upgrade: ignored
        self._head_done = True
        codings = [
            t.strip().lower()
            for k, v in self._headers
            if k == "transfer-encoding"
            for t in v.split(",")
        ]
        if codings and codings != ["chunked"]:
            self._refusal = HandshakeRejected(
                501,
                "malformed request: unsupported transfer coding",
                reason="MalformedRequest",
            )
        elif codings or any(k == "content-length" and v != "0" for k, v in self._headers):
            self._refusal = HandshakeRejected(
                400, "a handshake request has no body", reason="BadHandshake"
            )
        if self._refusal is not None:
            raise self._refusal  # stops the parser; feed() raises it

    def on_message_complete(self) -> None:
        self._done = True

    # -- feeding -------------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> ClientRequest | None:
        """Take the next bytes; return the request once its head is complete."""
        if self._done:
            self._trailing += bytes(data)  # behind a request already returned
            return None
        if not data:
            if not self._received:
                self.closed = True
                return None
            raise HandshakeRejected(
                400,
                "malformed request: the connection ended inside the request head",
                reason="MalformedRequest",
            )
        chunk = bytes(data)
        self._received += len(chunk)
        try:
            self._parser.feed_data(chunk)
        except httptools.HttpParserUpgrade as upgrade:
            self._trailing = chunk[upgrade.args[0] :]
        except httptools.HttpParserCallbackError:
            assert self._refusal is not None  # only on_headers_complete raises
            raise self._refusal from None
        except httptools.HttpParserError as exc:
            if not self._done:  # else: bytes past a request that is not an upgrade
                # llhttp refuses a coding after "chunked" itself: a coding it cannot frame.
                coding = "transfer-encoding" in str(exc).lower()
                raise HandshakeRejected(
                    501 if coding else 400,
                    f"malformed request: {_parse_error(exc)}",
                    reason="MalformedRequest",
                ) from None
        if self._received - len(self._trailing) > MAX_REQUEST_HEAD:
            raise HandshakeRejected(
                431, "request header fields too large", reason="RequestHeaderTooLarge"
            )
        return self._finish() if self._done else None

    def _finish(self) -> ClientRequest:
        if not self._parser.get_http_version().startswith("1."):
            raise HandshakeRejected(
                400,
                "malformed request: only HTTP/1.x carries a WebSocket handshake",
                reason="MalformedRequest",
            )
        # RFC 9112 3.2: exactly one Host, or two hops could disagree on the authority.
        if sum(1 for k, _ in self._headers if k == "host") != 1:
            raise HandshakeRejected(
                400,
                "malformed request: a request needs exactly one Host header",
                reason="MalformedRequest",
            )
        try:
            target = self._url.decode("ascii")
        except UnicodeDecodeError:
            raise HandshakeRejected(
                400,
                "malformed request: the request-target is not ASCII",
                reason="MalformedRequest",
            ) from None
        if not target.startswith("/"):
            raise HandshakeRejected(400, "request target must be a path", reason="BadHandshake")
        return ClientRequest(
            method=self._parser.get_method().decode("ascii"),
            target=target,
            headers=self._headers,
            client_ip=self._client_ip,
            secure=self._secure,
        )


@attrs.frozen
class ResponseHead:
    """A backend's answer to the upgrade request, as far as the gateway reads it."""

    status: int
    headers: Headers
    complete: bool  # the whole response (head and body) was read
    body: bytes  # what was read of the body (a refusal's, capped by the reader)
    trailing: bytes  # bytes behind a 101: the backend's first frames


class ResponseParser:
    """Sans-io reader of the backend's answer to the upgrade request.

    ``feed`` returns a :class:`ResponseHead` once the head of a final response
    is in (1xx other than 101 are skipped, as RFC 9110 15.2 allows); for a
    refusal, keep feeding to collect its body until ``complete``. Raises
    BackendProtocolError for anything that is not valid HTTP/1.1.
    """

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._headers: Headers = []
        self._received = 0
        self._status = 0
        self._head: ResponseHead | None = None
        self._body = bytearray()
        self._complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), _field_value(value)))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        if 100 <= self._status < 200 and self._status != 101:
            self._headers, self._status = [], 0  # an interim response: the next one counts
        else:
            self._complete = True

    def feed(self, data: bytes) -> ResponseHead | None:
        """Take the next bytes (``b""`` at end of stream); the head once it is in."""
        if not data:
            if self._status == 0 or self._status == 101:
                raise BackendProtocolError("backend closed the connection during the handshake")
            # A body delimited by the end of the connection ends here.
            self._complete = self._complete or not self._has_length()
            return self._result(b"")
        self._received += len(data)
        trailing = b""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            trailing = data[upgrade.args[0] :]
        except httptools.HttpParserError as exc:
            # httptools reports a 101 as an upgrade only with "Connection: upgrade";
            # without it llhttp stops all the same, and check_backend_101 refuses it.
            if not (self._status == 101 and self._complete):
                raise BackendProtocolError(
                    f"backend answered with invalid HTTP: {_parse_error(exc)}"
                ) from None
        if self._status == 0 and self._received > MAX_REQUEST_HEAD:
            raise BackendProtocolError("backend's response head is too large")
        return self._result(trailing) if self._status else None

    def _has_length(self) -> bool:
        return any(k.lower() in ("content-length", "transfer-encoding") for k, _ in self._headers)

    def _result(self, trailing: bytes) -> ResponseHead:
        return ResponseHead(
            self._status, self._headers, self._complete, bytes(self._body), trailing
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


# RFC 9110 5.6.2 tokens; a field value is VCHAR, obs-text, SP and HTAB (5.5).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NOT_IN_VALUE = re.compile(r"[^\t\x20-\x7e\x80-\xff]")
_NOT_IN_TARGET = re.compile(r"[^\x21-\x7e]")


def backend_request(target: str, host: str, key: str, headers: Headers) -> bytes:
    """The upgrade request for the backend, as bytes ready to send.

    ``headers`` are the end-to-end headers and the X-Forwarded-* ones
    (:func:`backend_headers`) after the policies' rewrites; the upgrade headers
    and ``key`` are this hop's own. Every name and value is checked here, at the
    last step, whatever produced it: a value a policy took from a token claim
    must not smuggle a header in. Raises HandshakeRejected (500) for one that
    is not valid HTTP, before any byte goes to the backend.
    """
    if not target.startswith("/") or _NOT_IN_TARGET.search(target):
        raise HandshakeRejected(
            500, "the backend request-target is not valid HTTP", reason="InvalidBackendRequest"
        )
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or _NOT_IN_VALUE.search(value):
            raise HandshakeRejected(
                500,
                f"header {name!r} for the backend is not valid HTTP",
                reason="InvalidBackendRequest",
            )
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    # latin-1 gives the client's bytes back one for one (see _field_value).
    return "\r\n".join(lines).encode("latin-1")


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
