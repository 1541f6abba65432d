"""Real peers for the tests: raw WebSocket clients/backends on real sockets.

The raw peers speak HTTP with h11 and build/parse frames with wsproto, so a test
can send exact bytes (fragments, pings, bad frames) and see exactly what the
other side of the gateway received.
"""

from __future__ import annotations

import base64
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import h11
import trio
from wsproto.frame_protocol import CloseReason, Frame, FrameProtocol, Opcode
from wsproto.utilities import generate_accept_token

import wsgate
from wsgate.config import parse_config

Headers = list[tuple[str, str]]


#: Secrets the tests hand the gateway; every log record of the suite is checked for
#: them (conftest.py), and test_zz_no_secret_logged.py fails on any hit.
SUITE_SECRETS: set[str] = set()
LEAKS: list[str] = []
SCANNED = [0]


def scan_record(record: object) -> None:
    """Note any registered secret that appears in one log record."""
    SCANNED[0] += 1
    text = repr(record)
    LEAKS.extend(f"{secret!r} in {text[:300]}" for secret in SUITE_SECRETS if secret in text)


#: The relay engine gateways built here use; the ``relay_engine`` fixture switches it.
RELAY_ENGINE = "tasks"


def make_config(apis: list[dict[str, Any]], **gateway: Any) -> wsgate.Config:
    """A config listening on 127.0.0.1:0 with ``apis`` and gateway overrides."""
    defaults = {"listen": "127.0.0.1:0", "relay_engine": RELAY_ENGINE}
    return parse_config({"gateway": {**defaults, **gateway}, "apis": apis})


async def start_gateway(
    nursery: trio.Nursery, backend_url: str, *, api: dict[str, Any] | None = None, **gateway: Any
) -> wsgate.Gateway:
    """Start a gateway routing ``/echo`` to ``backend_url`` (plus ``api`` overrides)."""
    config = make_config(
        [{"name": "echo", "path": "echo", "service_url": backend_url, **(api or {})}], **gateway
    )
    gw: wsgate.Gateway = await nursery.start(wsgate.Gateway(config).run)
    return gw


@attrs.define
class Response:
    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class RawClient:
    """A WebSocket client over a plain TCP stream, frame by frame."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.proto = FrameProtocol(client=True, extensions=[])
        self.response: Response | None = None
        self._pending = b""

    @classmethod
    async def connect(
        cls,
        port: int,
        target: str = "/echo",
        headers: Headers | None = None,
        *,
        raw_request: bytes | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> RawClient:
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_hostname="127.0.0.1")
        client = cls(stream)
        key = base64.b64encode(os.urandom(16)).decode()
        request = raw_request or _request(target, key, headers or [])
        await stream.send_all(request)
        client.response, client._pending = await read_response(stream)
        if client.response.status == 101:
            assert client.response.header("sec-websocket-accept") == (
                generate_accept_token(key.encode()).decode()
            )
        return client

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_text(self, text: str, fin: bool = True) -> None:
        await self.send(self.proto.send_data(text, fin))

    async def send_binary(self, data: bytes, fin: bool = True) -> None:
        await self.send(self.proto.send_data(data, fin))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.send(self.proto.close(code, reason))

    async def receive_frames(self, count: int) -> list[Frame]:
        """Read until ``count`` whole frames have arrived (fewer if the stream ends)."""
        frames: list[Frame] = []
        if self._pending:
            self.proto.receive_bytes(self._pending)
            self._pending = b""
        while True:
            frames.extend(self.proto.received_frames())
            if len(frames) >= count:
                return frames
            data = await self.stream.receive_some(65536)
            if not data:
                return frames
            self.proto.receive_bytes(data)

    async def receive_close(self) -> tuple[int, str]:
        """Skip frames until a close frame; return its code and reason."""
        while True:
            frames = await self.receive_frames(1)
            if not frames:
                raise AssertionError("connection ended without a close frame")
            for frame in frames:
                if frame.opcode is Opcode.CLOSE:
                    return tuple(frame.payload)  # type: ignore[return-value]

    async def read_raw(self, size: int) -> bytes:
        """Exactly ``size`` raw bytes (or fewer at end of stream)."""
        data = bytearray(self._pending)
        self._pending = b""
        while len(data) < size:
            chunk = await self.stream.receive_some(size - len(data))
            if not chunk:
                break
            data += chunk
        return bytes(data)

    async def read_until_eof(self) -> bytes:
        data = bytearray(self._pending)
        self._pending = b""
        while chunk := await self.stream.receive_some(65536):
            data += chunk
        return bytes(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


def _request(target: str, key: str, headers: Headers) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: gateway.test",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def echo_and_close(port: int, text: str, target: str = "/echo") -> None:
    """One client through the gateway on ``port``: upgrade, echo ``text``, close with 1000.

    Asserts each step: a 101, the echo back, and the close answered in kind.
    """
    client = await RawClient.connect(port, target)
    try:
        assert client.response is not None and client.response.status == 101
        await client.send_text(text)
        [echo] = await client.receive_frames(1)
        assert echo.payload == text
        await client.close(1000)
        with trio.fail_after(5):
            assert await client.receive_close() == (1000, "")
    finally:
        await client.aclose()


async def read_response(stream: trio.abc.ReceiveStream) -> tuple[Response, bytes]:
    """Read one HTTP response head (and body unless 101); return it and leftover bytes."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(
            method="GET",
            target="/",
            headers=[("Host", "x"), ("Upgrade", "websocket"), ("Connection", "Upgrade")],
        )
    )
    conn.send(h11.EndOfMessage())
    response: Any = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            headers = [(k.decode(), v.decode()) for k, v in event.headers]
            return Response(101, headers, b""), conn.trailing_data[0]
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            headers = [(k.decode(), v.decode()) for k, v in response.headers]
            return Response(response.status_code, headers, bytes(body)), b""


@attrs.define
class BackendRequest:
    """What a scripted backend saw of the gateway's handshake."""

    target: str
    headers: Headers

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class RawBackend:
    """A backend server whose every connection is handled by a test-supplied script.

    The script gets the upgrade request and the stream, and decides what to answer.
    ``requests`` records each handshake request the gateway sent.
    """

    def __init__(
        self, script: Callable[[BackendRequest, trio.SocketStream, bytes], Awaitable[None]]
    ):
        self.script = script
        self.requests: list[BackendRequest] = []
        self.port = 0

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: Any = None
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage):
                    break
            seen = BackendRequest(
                request.target.decode(), [(k.decode(), v.decode()) for k, v in request.headers]
            )
            self.requests.append(seen)
            try:
                await self.script(seen, stream, conn.trailing_data[0])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


def accept_response(request: BackendRequest, extra: Headers | None = None) -> bytes:
    """A valid 101 answer to ``request``."""
    key = request.header("sec-websocket-key") or ""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {generate_accept_token(key.encode()).decode()}",
        *(f"{k}: {v}" for k, v in extra or []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return bytes(data)


def server_frames() -> FrameProtocol:
    """A frame builder/parser in the server role (unmasked frames out)."""
    return FrameProtocol(client=False, extensions=[])


__all__ = ["CloseReason", "Frame", "FrameProtocol", "Opcode"]


async def wait_until(predicate: Callable[[], bool], interval: float = 0.01) -> None:
    """Poll ``predicate``: for state (pair counts) that publishes no event of its own."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(interval)
