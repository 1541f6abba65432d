"""The shape's floor: what the brief's fixed per-connection shape costs on Trio, and nothing else.

Per client it keeps exactly the structure wsgate must keep: one connection task
holding a ``CapacityLimiter`` token, the backend connection opened only after
the request head arrived, the backend's answer read before anything is sent to
the client, then one nursery per pair with two pump tasks, either of whose end
cancels the other. It waits the way wsgate's ``netio`` waits (try the system
call first, park in ``trio.lowlevel.wait_readable``/``wait_writable`` only on
EAGAIN; a loopback connect is checked with ``getpeername`` before parking).

What it leaves out is everything a gateway does: no HTTP parsing (a head is
whatever ends in a blank line), no frame parsing, no policies, no log records,
no metrics, no close codes. wsgate's CPU per churn cycle minus this target's
is what wsgate's own code costs; this target's CPU against nginx's is what the
shape alone costs. Run as ``python -m benchmarks.trio_floor --port P
--backend-port B``.
"""

from __future__ import annotations

import errno
import socket
import sys

import trio

from .procs import run_trio_relay

MAX_HEAD = 16 * 1024
CHUNK = 64 * 1024


async def _recv(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(CHUNK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def _read_head(sock: socket.socket) -> bytes | None:
    head = b""
    while b"\r\n\r\n" not in head:
        data = await _recv(sock)
        if not data or len(head) + len(data) > MAX_HEAD:
            return None
        head += data
    return head


async def _connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    code = sock.connect_ex(("127.0.0.1", port))
    if code == errno.EINPROGRESS:
        try:
            sock.getpeername()  # on loopback the connect has usually completed
        except OSError:
            await trio.lowlevel.wait_writable(sock)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        sock.close()
        raise OSError(code, "connect failed")
    return sock


def _close(sock: socket.socket) -> None:
    trio.lowlevel.notify_closing(sock)
    sock.close()


async def _pump(src: socket.socket, dst: socket.socket, scope: trio.CancelScope) -> None:
    try:
        while data := await _recv(src):
            await _send_all(dst, data)
    except OSError:
        pass
    scope.cancel()


async def _serve(client: socket.socket, limiter: trio.CapacityLimiter, backend_port: int) -> None:
    try:
        async with limiter:
            head = await _read_head(client)
            if head is None:
                return
            try:
                backend = await _connect(backend_port)
            except OSError:
                return
            try:
                await _send_all(backend, head)
                answer = await _read_head(backend)
                if answer is None:
                    return
                await _send_all(client, answer)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, client, backend, nursery.cancel_scope)
                    nursery.start_soon(_pump, backend, client, nursery.cancel_scope)
            finally:
                _close(backend)
    except OSError:
        pass
    finally:
        _close(client)


async def serve(port: int, backend_port: int) -> None:
    """Accept on 127.0.0.1:``port`` and relay every client to the backend."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    print(f"READY {listener.getsockname()[1]}", flush=True)
    limiter = trio.CapacityLimiter(100_000)
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            while True:
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    break
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(_serve, client, limiter, backend_port)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``--port`` (0 picks one) and ``--backend-port``."""
    return run_trio_relay(serve, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
