"""A small echo backend on trio-websocket, for trying the gateway out and for tests."""

from __future__ import annotations

import ssl

import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

#: Echo servers accept messages up to this size (the gateway's default limit).
MAX_MESSAGE = 16 * 1024 * 1024


async def _echo(request: WebSocketRequest) -> None:
    # Agree to the first offered subprotocol so clients can see negotiation work.
    offered = request.proposed_subprotocols
    ws = await request.accept(subprotocol=offered[0] if offered else None)
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except ConnectionClosed:
        pass
    except Exception:  # trio-websocket lets a handler's exception crash its server
        structlog.get_logger("wsgate.echo").exception("echo_handler_failed")


async def serve_echo(
    host: str = "127.0.0.1",
    port: int = 9000,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an echo WebSocket server on any path; reports the bound port via ``task_status``."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_websocket(
                _echo,
                host,
                port,
                ssl_context=ssl_context,
                max_message_size=MAX_MESSAGE,
                task_status=task_status,
            )
        )
        task_status.started(server.port)
