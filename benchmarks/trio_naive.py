"""The naive Trio floor: a raw byte relay on Trio's stream API.

Per client: read the upgrade request head, connect to the backend, forward the
head, then two tasks copy bytes with ``receive_some``/``send_all`` until either
side ends. No frame parsing, no logging, no limits: this is what Trio's
high-level stream path costs per byte moved, with nothing else on top.
Run as ``python -m benchmarks.trio_naive --port P --backend-port B``.
"""

from __future__ import annotations

import functools
import sys

import trio

from .procs import run_trio_relay

MAX_HEAD = 16 * 1024
CHUNK = 64 * 1024


async def _copy(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    try:
        while True:
            data = await src.receive_some(CHUNK)
            if not data:
                return
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def _serve(client: trio.SocketStream, backend_port: int) -> None:
    async with client:
        head = b""
        with trio.move_on_after(30):
            while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                data = await client.receive_some(CHUNK)
                if not data:
                    return
                head += data
        if b"\r\n\r\n" not in head:
            return
        try:
            backend = await trio.open_tcp_stream("127.0.0.1", backend_port)
        except OSError:
            return
        async with backend:
            try:
                await backend.send_all(head)
            except trio.BrokenResourceError:
                return
            async with trio.open_nursery() as nursery:

                async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    await _copy(src, dst)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump, client, backend)
                nursery.start_soon(pump, backend, client)


async def serve(port: int, backend_port: int) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(
                trio.serve_tcp,
                functools.partial(_serve, backend_port=backend_port),
                port,
                host="127.0.0.1",
                backlog=4096,
            )
        )
        print(f"READY {listeners[0].socket.getsockname()[1]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``--port`` (0 picks one) and ``--backend-port``."""
    return run_trio_relay(serve, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
