"""The web console's server side, on the admin listener (docs/console.md).

The page shipped in ``wsgate/console_web`` and the two small endpoints it
calls: the gateway's address, and a probe that opens a handshake from here to
show what a browser hides of a refused one. The terminal client is
:mod:`wsgate.console`.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from wsproto import ConnectionType, WSConnection
from wsproto import events as ws_events
from wsproto.connection import ConnectionState

from wsgate.console import BODY_SHOWN, HTTP_TOKEN, describe_os_error, status_phrase

if TYPE_CHECKING:
    from wsgate.gateway import Gateway

__all__ = ["PROBE_TIMEOUT", "WEB_PACKAGE", "probe_handshake", "web_routes"]

#: Seconds the web console's probe waits for the gateway's answer.
PROBE_TIMEOUT = 10.0

#: Where the web console's files live: ``wsgate/console_web`` (package data).
WEB_PACKAGE = ("wsgate", "console_web")

Endpoint = Callable[[Request], Awaitable[Response]]


def web_routes(gateway: Gateway, protected: Callable[[Endpoint], Endpoint]) -> list[BaseRoute]:
    """The web console's routes, for the admin listener's Starlette app.

    * ``GET /console/`` and its files: the page (open: it holds no secrets);
    * ``GET /console/api/gateway`` (behind ``protected``, the admin bearer token):
      the gateway's WebSocket base URL, so the page can connect to it;
    * ``POST /console/api/probe`` (likewise), body ``{"target": "/path?query",
      "subprotocols": [...]}``: opens that handshake against the gateway from
      the admin listener and answers its HTTP status and body, which browsers
      hide from pages when a handshake is refused (docs/console.md).
    """

    async def gateway_info(_request: Request) -> Response:
        if not gateway.addresses:
            return JSONResponse({"errors": [{"field": None, "message": "not listening yet"}]}, 503)
        return JSONResponse(
            {
                "url": gateway.url,
                "tls": gateway.url.startswith("wss:"),
                "addresses": [[host, port] for host, port in gateway.addresses],
            }
        )

    async def probe(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        target = body.get("target") if isinstance(body, dict) else None
        subprotocols = body.get("subprotocols", []) if isinstance(body, dict) else None
        if not isinstance(target, str) or not re.fullmatch(r"/[!-~]*", target):
            problem = "'target' must be a path and query starting with '/', without spaces"
            return JSONResponse({"errors": [{"field": "target", "message": problem}]}, 400)
        if not isinstance(subprotocols, list) or not all(
            isinstance(p, str) and HTTP_TOKEN.fullmatch(p) for p in subprotocols
        ):
            problem = "'subprotocols' must be a list of tokens"
            return JSONResponse({"errors": [{"field": "subprotocols", "message": problem}]}, 400)
        if not gateway.addresses:
            return JSONResponse({"errors": [{"field": None, "message": "not listening yet"}]}, 503)
        return JSONResponse(await probe_handshake(gateway.url + target, subprotocols))

    return [
        Route("/console/api/gateway", protected(gateway_info), methods=["GET"]),
        Route("/console/api/probe", protected(probe), methods=["POST"]),
        Mount("/console", StaticFiles(packages=[WEB_PACKAGE], html=True), name="console"),
    ]


async def probe_handshake(url: str, subprotocols: Sequence[str] = ()) -> dict[str, Any]:
    """Try the opening handshake of ``url``; ``{"status": ..., "body": ...}`` or ``{"error": ...}``.

    Written on wsproto rather than trio-websocket, which leaves the socket of a
    refused handshake open. A handshake that succeeds is closed at once with
    1000. A wss:// certificate is not verified: the URL is the gateway's own
    listener.
    """
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        with trio.fail_after(PROBE_TIMEOUT):
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            async with stream:
                if secure:
                    context = ssl.create_default_context()
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                    stream = trio.SSLStream(stream, context, server_hostname=host)
                    await stream.do_handshake()
                return await _probe(stream, parts.netloc, target, subprotocols)
    except trio.TooSlowError:
        return {"error": f"no answer to the handshake within {PROBE_TIMEOUT:g} s"}
    except (OSError, trio.BrokenResourceError) as exc:
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        return {"error": f"cannot connect to {parts.netloc}: {describe_os_error(cause or exc)}"}


async def _probe(
    stream: trio.abc.Stream, host: str, target: str, subprotocols: Sequence[str]
) -> dict[str, Any]:
    conn = WSConnection(ConnectionType.CLIENT)
    request = ws_events.Request(host=host, target=target, subprotocols=list(subprotocols))
    await stream.send_all(conn.send(request))
    result: dict[str, Any] = {}
    body = bytearray()
    while True:
        data = await stream.receive_some(65536)
        conn.receive_data(bytes(data) or None)
        for event in conn.events():
            if isinstance(event, ws_events.AcceptConnection):
                await stream.send_all(
                    conn.send(ws_events.CloseConnection(1000, "wsgate console probe"))
                )
                with trio.move_on_after(2):  # the close reply, for a tidy gateway log
                    while conn.state is not ConnectionState.CLOSED:
                        if not (data := await stream.receive_some(65536)):
                            break
                        conn.receive_data(bytes(data))
                        list(conn.events())
                status = {"status": 101, "reason": "Switching Protocols"}
                return {**status, "subprotocol": event.subprotocol}
            if isinstance(event, ws_events.RejectConnection):
                headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers
                }
                result = {
                    "status": event.status_code,
                    "reason": status_phrase(event.status_code),
                    "content_type": headers.get("content-type"),
                    "body": "",
                }
                if not event.has_body:
                    return result
            elif isinstance(event, ws_events.RejectData):
                body += event.data
                if event.body_finished or len(body) >= BODY_SHOWN * 4:
                    return {**result, "body": body.decode("utf-8", "replace")[:BODY_SHOWN]}
        if not data:
            if result:
                return {**result, "body": body.decode("utf-8", "replace")[:BODY_SHOWN]}
            return {"error": "the gateway closed the connection without answering"}
