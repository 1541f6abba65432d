"""How pairs end: protocol errors, oversize messages, idle pairs, drain, backpressure."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url
from wsproto.frame_protocol import FrameProtocol, Opcode

from .helpers import (
    BackendRequest,
    RawBackend,
    RawClient,
    accept_response,
    read_all,
    server_frames,
    start_gateway,
)

pytestmark = pytest.mark.usefixtures("relay_engine")


class CloseRecorder:
    """A backend script: answer 101, then record the close codes it is sent."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.codes: list[int] = []
        self.data: list[bytes] = []
        self.done = trio.Event()

    async def __call__(
        self, request: BackendRequest, stream: trio.SocketStream, early: bytes
    ) -> None:
        await stream.send_all(accept_response(request) + self.reply)
        proto = server_frames()
        try:
            proto.receive_bytes(early + await read_all(stream))
            for frame in proto.received_frames():
                if frame.opcode is Opcode.CLOSE:
                    self.codes.append(frame.payload[0])
                else:
                    self.data.append(
                        frame.payload
                        if isinstance(frame.payload, bytes)
                        else frame.payload.encode()
                    )
        finally:
            self.done.set()


async def test_unmasked_client_frame_closes_both_sides_with_1002(
    nursery: trio.Nursery, echo_url: str
) -> None:
    recorder = CloseRecorder()
    backend = await nursery.start(RawBackend(recorder).serve)
    gw = await start_gateway(nursery, backend.url)
    # A bystander pair on another API must not notice.
    client = await RawClient.connect(gw.addresses[0][1])
    await client.send_text("fine")
    await client.send(FrameProtocol(client=False, extensions=[]).send_data("unmasked"))
    assert (await client.receive_close())[0] == 1002
    await client.aclose()
    await recorder.done.wait()
    assert recorder.codes == [1002]
    assert recorder.data == [b"fine"]


async def test_masked_backend_frame_closes_both_sides_with_1002(nursery: trio.Nursery) -> None:
    recorder = CloseRecorder(reply=FrameProtocol(client=True, extensions=[]).send_data("masked!"))
    backend = await nursery.start(RawBackend(recorder).serve)
    gw = await start_gateway(nursery, backend.url)
    client = await RawClient.connect(gw.addresses[0][1])
    assert (await client.receive_close())[0] == 1002
    await client.aclose()
    await recorder.done.wait()
    assert recorder.codes == [1002]


async def test_bad_pair_leaves_other_pairs_alone(nursery: trio.Nursery, echo_url: str) -> None:
    gw = await start_gateway(nursery, echo_url)
    async with open_websocket_url(f"{gw.url}/echo") as bystander:
        bad = await RawClient.connect(gw.addresses[0][1])
        await bad.send(b"\x8f\x80\x00\x00\x00\x00")  # reserved opcode 0xF
        assert (await bad.receive_close())[0] == 1002
        await bad.aclose()
        await bystander.send_message("still here")
        assert await bystander.get_message() == "still here"


async def test_oversize_message_gives_sender_1009_and_partner_1001(nursery: trio.Nursery) -> None:
    recorder = CloseRecorder()
    backend = await nursery.start(RawBackend(recorder).serve)
    gw = await start_gateway(nursery, backend.url, api={"max_message_size": 1000})
    client = await RawClient.connect(gw.addresses[0][1])
    await client.send_binary(b"x" * 1000)  # exactly at the limit: allowed
    await client.send_binary(b"y" * 600, fin=False)
    await client.send_binary(b"y" * 600, fin=True)  # 1200 in total: too big
    assert (await client.receive_close())[0] == 1009
    await client.aclose()
    await recorder.done.wait()
    assert recorder.codes == [1001]
    assert recorder.data[0] == b"x" * 1000


async def test_idle_pair_is_closed_with_1001_both_ways(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # Virtual time: the clock jumps to the next timer whenever every task waits.
    recorder = CloseRecorder()
    backend = await nursery.start(RawBackend(recorder).serve)
    gw = await start_gateway(nursery, backend.url, api={"idle_timeout": 10})
    client = await RawClient.connect(gw.addresses[0][1])
    started = trio.current_time()
    await trio.sleep(6)
    await client.send_text("activity resets the clock")
    assert (await client.receive_close())[0] == 1001
    assert 16 <= trio.current_time() - started < 17  # 6 s, then 10 s idle
    await client.aclose()
    await recorder.done.wait()
    assert recorder.codes == [1001]


async def test_drain_sends_1001_to_clients_and_backends(nursery: trio.Nursery) -> None:
    recorder = CloseRecorder()
    backend = await nursery.start(RawBackend(recorder).serve)
    gw = await start_gateway(nursery, backend.url)
    clients = [await RawClient.connect(gw.addresses[0][1]) for _ in range(3)]
    assert gw.stats().active_pairs == 3
    async with trio.open_nursery() as draining:
        draining.start_soon(gw.drain)
        for client in clients:
            assert (await client.receive_close())[0] == 1001
            await client.close(1001)  # complete the close handshake, as clients do
            await client.aclose()
    while len(recorder.codes) < 3:
        await recorder.done.wait()
        recorder.done = trio.Event()
    assert recorder.codes == [1001] * 3
    assert gw.stats().active_pairs == 0
    assert gw.stats().draining
    # A new client is refused: the listener is closed.
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", gw.addresses[0][1])
    except OSError:
        pass
    else:
        await stream.aclose()
        raise AssertionError("the gateway still accepts connections after drain")


async def test_slow_reader_backpressures_the_backend(nursery: trio.Nursery) -> None:
    total = 64 * 2**20
    sent = 0

    async def flood(request: BackendRequest, stream: trio.SocketStream, early: bytes) -> None:
        nonlocal sent
        await stream.send_all(accept_response(request))
        frame = server_frames().send_data(b"z" * 65536)
        while sent < total:
            await stream.send_all(frame)
            sent += 65536
        await read_all(stream)

    backend = await nursery.start(RawBackend(flood).serve)
    gw = await start_gateway(nursery, backend.url)
    client = await RawClient.connect(gw.addresses[0][1])
    pair = next(iter(gw.pairs.values()))
    # Wait until the gateway stops reading: the client reads nothing.
    previous = -1
    while pair.bytes_from_backend != previous:
        previous = pair.bytes_from_backend
        await trio.sleep(0.2)
    assert pair.bytes_from_backend < total // 2, (
        "the gateway kept reading for a reader that doesn't"
    )
    # Everything arrives, whole and in order, once the client reads.
    received = 0
    while received < total:
        for frame in await client.receive_frames(1):  # wsproto yields partial frames
            assert frame.payload == b"z" * len(frame.payload)
            received += len(frame.payload)
    assert received == total
    await client.aclose()
