"""The relay end to end: real clients, a real gateway, real backends, 127.0.0.1 only."""

from __future__ import annotations

import os

import pytest
import trio
from trio_websocket import open_websocket_url
from wsproto.frame_protocol import Opcode

from .helpers import (
    BackendRequest,
    RawBackend,
    RawClient,
    accept_response,
    read_all,
    server_frames,
    start_gateway,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("relay_engine")


async def test_text_binary_and_empty_messages_echo(nursery: trio.Nursery, echo_url: str) -> None:
    gw = await start_gateway(nursery, echo_url)
    async with open_websocket_url(f"{gw.url}/echo", max_message_size=32 * 2**20) as ws:
        for message in ["hello", "", "ünïcødé", b"", b"\x00\xff" * 1000, os.urandom(70000)]:
            await ws.send_message(message)
            assert await ws.get_message() == message


async def test_16_mib_message(nursery: trio.Nursery, echo_url: str) -> None:
    gw = await start_gateway(nursery, echo_url)
    big = os.urandom(16 * 2**20)
    async with open_websocket_url(f"{gw.url}/echo", max_message_size=32 * 2**20) as ws:
        await ws.send_message(big)
        assert await ws.get_message() == big


async def _recording_backend(
    nursery: trio.Nursery, reply: bytes = b""
) -> tuple[RawBackend, trio.MemoryReceiveChannel[bytes]]:
    """A backend that answers 101, sends ``reply`` raw, then reports every byte it got."""
    send, receive = trio.open_memory_channel[bytes](1)

    async def script(request: BackendRequest, stream: trio.SocketStream, early: bytes) -> None:
        await stream.send_all(accept_response(request) + reply)
        await send.send(early + await read_all(stream))

    backend = await nursery.start(RawBackend(script).serve)
    return backend, receive


async def test_frames_pass_through_byte_exact_both_ways(nursery: trio.Nursery) -> None:
    # The backend's frames (sent right behind its 101): fragments, pings, a pong.
    out = server_frames()
    reply = b"".join(
        [
            out.send_data("frag-", fin=False),
            out.ping(b"p1"),
            out.send_data("ment", fin=True),
            out.send_data(b"\x01\x02", fin=True),
            out.pong(b"p2"),
        ]
    )
    backend, received = await _recording_backend(nursery, reply)
    gw = await start_gateway(nursery, backend.url)
    client = await RawClient.connect(gw.addresses[0][1])
    sent = b"".join(
        [
            client.proto.send_data("a" * 200, fin=False),
            client.proto.ping(b"ping!"),
            client.proto.send_data("b" * 70000, fin=True),
            client.proto.send_data(b"", fin=True),
            client.proto.pong(b""),
            client.proto.close(4321, "done here"),
        ]
    )
    for i in range(0, len(sent), 1000):  # odd chunking: frames straddle reads
        await client.send(sent[i : i + 1000])
    assert await client.read_raw(len(reply)) == reply
    await client.aclose()
    assert await received.receive() == sent


async def test_close_code_from_client_reaches_backend(nursery: trio.Nursery, echo_url: str) -> None:
    closes: list[tuple[int, str]] = []

    async def script(request: BackendRequest, stream: trio.SocketStream, early: bytes) -> None:
        await stream.send_all(accept_response(request))
        proto = server_frames()
        proto.receive_bytes(early + await stream.receive_some(1000))
        frame = next(iter(proto.received_frames()))
        closes.append(tuple(frame.payload))
        await stream.send_all(proto.close(*frame.payload))

    backend = await nursery.start(RawBackend(script).serve)
    gw = await start_gateway(nursery, backend.url)
    async with open_websocket_url(f"{gw.url}/echo") as ws:
        await ws.aclose(4001, "client says bye")
        assert ws.closed is not None and ws.closed.code == 4001
    assert closes == [(4001, "client says bye")]


async def test_close_code_from_backend_reaches_client(nursery: trio.Nursery) -> None:
    async def script(request: BackendRequest, stream: trio.SocketStream, early: bytes) -> None:
        proto = server_frames()
        await stream.send_all(accept_response(request) + proto.close(4002, "backend done"))
        await read_all(stream)

    backend = await nursery.start(RawBackend(script).serve)
    gw = await start_gateway(nursery, backend.url)
    client = await RawClient.connect(gw.addresses[0][1])
    reason = await client.receive_close()
    await client.aclose()
    assert reason == (4002, "backend done")


async def test_backend_dropping_tcp_gives_client_1011(nursery: trio.Nursery) -> None:
    async def script(request: BackendRequest, stream: trio.SocketStream, early: bytes) -> None:
        await stream.send_all(accept_response(request))
        # No close frame: the TCP connection just ends.

    backend = await nursery.start(RawBackend(script).serve)
    gw = await start_gateway(nursery, backend.url)
    client = await RawClient.connect(gw.addresses[0][1])
    assert await client.receive_close() == (1011, "backend connection lost without a close frame")
    await client.aclose()
    with trio.fail_after(5):
        await wait_until(lambda: gw.stats().active_pairs == 0)


async def test_client_vanishing_gives_backend_1001(nursery: trio.Nursery) -> None:
    got: list[int] = []

    async def script(request: BackendRequest, stream: trio.SocketStream, early: bytes) -> None:
        await stream.send_all(accept_response(request))
        proto = server_frames()
        proto.receive_bytes(early + await read_all(stream))
        got.extend(f.payload[0] for f in proto.received_frames() if f.opcode is Opcode.CLOSE)

    backend = await nursery.start(RawBackend(script).serve)
    gw = await start_gateway(nursery, backend.url)
    client = await RawClient.connect(gw.addresses[0][1])
    await client.send_text("half a conversation")
    await client.aclose()
    with trio.fail_after(5):
        await wait_until(lambda: bool(got))
    assert got == [1001]


async def test_the_configured_engine_pumps_the_pair(
    nursery: trio.Nursery, echo_url: str, relay_engine: str
) -> None:
    gw = await start_gateway(nursery, echo_url)
    async with open_websocket_url(f"{gw.url}/echo") as ws:
        (pair,) = gw.pairs.values()
        assert (pair._reactor is not None) == (relay_engine == "reactor")
        await ws.send_message("x")
        assert await ws.get_message() == "x"


class Exploding:
    """A frame scanner stand-in whose feed() fails: an injected bug in one pair."""

    def __init__(self, real: object) -> None:
        self._real = real

    def feed(self, data: object) -> int:
        raise RuntimeError("injected fault")

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


async def test_a_failing_pair_fails_alone(
    nursery: trio.Nursery, echo_url: str, relay_engine: str
) -> None:
    gw = await start_gateway(nursery, echo_url)
    async with open_websocket_url(f"{gw.url}/echo") as bystander:
        victim = await RawClient.connect(gw.addresses[0][1])
        (pair,) = [p for p in gw.pairs.values() if p.messages_from_client == 0][-1:]

        pair.client.scanner = Exploding(pair.client.scanner)  # type: ignore[assignment]
        await victim.send_text("boom")
        assert (await victim.receive_close())[0] == 1011
        await victim.aclose()
        await bystander.send_message("fine")
        assert await bystander.get_message() == "fine"
