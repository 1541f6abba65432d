"""The echo backend: a picows server on uvloop, in its own process.

Every data frame is echoed back as it came (type, payload, FIN bit), so a
fragmented message comes back fragmented the same way; a CLOSE frame is
answered and the connection closed. The echoes of all the frames that one
read brought in leave in one write (picows tells which frame is the last in
its buffer), so pipelined load costs the backend one system call per read,
not one per message. Run as ``python -m benchmarks.backend
--port 0``: it prints ``READY <port>`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from .procs import die_with_parent, raise_nofile

#: Largest frame accepted (the gateway's default message limit).
MAX_FRAME = 16 * 1024 * 1024


_OPCODES = {
    WSMsgType.CONTINUATION: 0x0,
    WSMsgType.TEXT: 0x1,
    WSMsgType.BINARY: 0x2,
}


def frame_header(opcode: int, fin: bool, length: int, mask: bytes = b"") -> bytes:
    """A WebSocket frame header (RFC 6455 5.2); ``mask`` is the masking key, if any."""
    first = (0x80 if fin else 0) | opcode
    masked = 0x80 if mask else 0
    if length < 126:
        return bytes((first, masked | length)) + mask
    if length < 65536:
        return bytes((first, masked | 126)) + length.to_bytes(2, "big") + mask
    return bytes((first, masked | 127)) + length.to_bytes(8, "big") + mask


class Echo(WSListener):
    """Echo each data frame (batched per read); answer CLOSE and disconnect."""

    def __init__(self) -> None:
        self.out = bytearray()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        opcode = _OPCODES.get(frame.msg_type)
        if opcode is not None:
            payload = frame.get_payload_as_memoryview()
            self.out += frame_header(opcode, frame.fin, len(payload))
            self.out += payload
            if frame.last_in_buffer:
                data, self.out = self.out, bytearray()
                transport.underlying_transport.write(data)
        elif frame.msg_type is WSMsgType.CLOSE:
            if self.out:
                data, self.out = self.out, bytearray()
                transport.underlying_transport.write(data)
            transport.send_close(frame.get_close_code())
            transport.disconnect()


def _listener(_request: WSUpgradeRequest) -> Echo:
    return Echo()


async def serve(host: str, port: int) -> None:
    server = await ws_create_server(
        _listener,
        host,
        port,
        max_frame_size=MAX_FRAME,
        websocket_handshake_timeout=30,
        backlog=4096,
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    die_with_parent()
    raise_nofile()
    try:
        import uvloop

        uvloop.run(serve(args.host, args.port))
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
