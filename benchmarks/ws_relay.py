"""What a Python user would write instead: a message-level relay with ``websockets``.

Per client: accept it with the ``websockets`` asyncio server, connect to the
backend with its client, and forward whole messages both ways (``async for``
plus ``send``). Stock asyncio event loop, no compression, no keepalive pings,
no size limit. Run as ``python -m benchmarks.ws_relay --port P --backend-port B``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .procs import relay_args

Connection = ServerConnection | ClientConnection


async def _forward(src: Connection, dst: Connection) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in src:
            await dst.send(message)


async def relay(client: ServerConnection, backend_port: int) -> None:
    path = client.request.path if client.request is not None else "/"
    try:
        backend = await connect(
            f"ws://127.0.0.1:{backend_port}{path}",
            compression=None,
            max_size=None,
            ping_interval=None,
            open_timeout=30,
        )
    except (TimeoutError, OSError):
        await client.close(1011)
        return
    async with backend:
        tasks = [
            asyncio.create_task(_forward(client, backend)),
            asyncio.create_task(_forward(backend, client)),
        ]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def main_async(port: int, backend_port: int) -> None:
    async with serve(
        lambda ws: relay(ws, backend_port),
        "127.0.0.1",
        port,
        compression=None,
        max_size=None,
        ping_interval=None,
        open_timeout=30,
        backlog=4096,
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"READY {bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``--port`` (0 picks one) and ``--backend-port``."""
    args = relay_args(__doc__, argv)
    asyncio.run(main_async(args.port, args.backend_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
