"""Faults and hostile peers (issue 6): one bad peer never hurts another, slots always come back.

Everything runs on 127.0.0.1 with bounded counts and deadlines. Where the
measurement must be the gateway's alone (descriptors, RSS, exit status) the
gateway is a real ``python -m wsgate serve`` child process; elsewhere it runs
in-process so ``gateway.stats()`` can be read. The raw clients, the echo and
command backend and the /proc accounting come from :mod:`benchmarks.soak`.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import signal
import socket
import ssl
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from benchmarks.soak import (
    BINARY,
    PING,
    TEXT,
    Backend,
    Conn,
    GatewayProcess,
    build_frame,
    close_payload,
    connect,
    gateway_config,
    payload_for,
    raise_nofile,
    read_head,
    reset,
    tls_certificate,
    upgrade_request,
)
from wsgate.echo import serve_echo

from .helpers import (
    BackendRequest,
    RawBackend,
    RawClient,
    accept_response,
    start_gateway,
    wait_until,
)

# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(params=["tasks", "reactor"])
def engine(request: pytest.FixtureRequest) -> str:
    """The relay engine: the fault tests hold for both."""
    return str(request.param)


def port_of(gw: Any) -> int:
    return int(gw.addresses[0][1])


async def echo_backend(nursery: trio.Nursery) -> Backend:
    backend: Backend = await nursery.start(Backend().serve)
    return backend


async def open_pair(port: int, target: str = "/echo/s") -> Conn:
    shake = await connect(port, target)
    assert shake.status == 101, (shake.status, shake.body)
    assert shake.conn is not None
    return shake.conn


async def echo_once(conn: Conn, payload: bytes) -> None:
    await conn.send(conn.message_frames(BINARY, payload))
    event = await conn.next_event()
    assert (event.kind, event.payload) == ("message", payload)


async def expect_close(conn: Conn, code: int) -> float:
    """Wait for the gateway's close frame; return when it came (trio clock)."""
    event = await conn.next_event()
    while event.kind in ("ping", "pong", "message"):
        event = await conn.next_event()
    assert (event.kind, event.code) == ("close", code)
    return trio.current_time()


# -- the backend process dies --------------------------------------------------------------

# A backend in its own process, so that it can be SIGKILLed: answers one upgrade,
# then, depending on MODE, sends the first fragment of a message, or the header
# and 64 KiB of a 1 MiB frame, or reads 64 KiB of what the client uploads; then
# waits to be killed.
KILLABLE_BACKEND = r"""
import base64, hashlib, socket, sys, time
mode = sys.argv[1]
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
head = b""
while b"\r\n\r\n" not in head:
    head += conn.recv(65536)
key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n")
       if l.lower().startswith(b"sec-websocket-key:")][0]
accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
if mode == "between-fragments":
    conn.sendall(b"\x01\x05part1")
elif mode == "mid-frame":
    conn.sendall(b"\x82\x7f" + (1 << 20).to_bytes(8, "big") + b"x" * 65536)
else:
    got = 0
    while got < 65536:
        got += len(conn.recv(65536))
print("ready", flush=True)
time.sleep(3600)
"""


async def start_killable_backend(mode: str) -> tuple[trio.Process, int]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", KILLABLE_BACKEND, mode], stdout=-1
    )
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        line += await process.stdout.receive_some(100)
    return process, int(line)


async def wait_ready(process: trio.Process) -> None:
    assert process.stdout is not None
    data = b""
    while b"ready" not in data:
        chunk = await process.stdout.receive_some(100)
        assert chunk, "the backend process ended"
        data += chunk


CLOSE_TIMEOUT = 2.0


async def test_backend_killed_between_fragments_gives_client_1011(
    nursery: trio.Nursery, engine: str
) -> None:
    process, port = await start_killable_backend("between-fragments")
    try:
        gw = await start_gateway(
            nursery, f"ws://127.0.0.1:{port}", close_timeout=CLOSE_TIMEOUT, relay_engine=engine
        )
        conn = await open_pair(port_of(gw))
        await wait_ready(process)
        first = await conn.next_frame()
        assert first is not None and (first.opcode, first.fin, first.payload) == (
            TEXT,
            False,
            b"part1",
        )
        killed = trio.current_time()
        process.kill()
        # A close frame may follow a message's first fragment: the client learns why.
        closed = await expect_close(conn, 1011)
        assert closed - killed < CLOSE_TIMEOUT
        await conn.close(1011)
        assert await conn.read_to_eof(CLOSE_TIMEOUT)
        await conn.aclose()
        with trio.fail_after(CLOSE_TIMEOUT):
            await wait_until(lambda: gw.stats().active_pairs == 0)
    finally:
        process.kill()
        await process.wait()


async def test_backend_killed_mid_frame_cuts_the_client_without_a_frame(
    nursery: trio.Nursery,
    engine: str,
) -> None:
    process, port = await start_killable_backend("mid-frame")
    try:
        with capture_logs() as logs:
            gw = await start_gateway(
                nursery, f"ws://127.0.0.1:{port}", close_timeout=CLOSE_TIMEOUT, relay_engine=engine
            )
            conn = await open_pair(port_of(gw))
            await wait_ready(process)
            got = len(conn.parser._buf)
            while got < 65536 + 10:  # the partial frame reached the client
                chunk = await conn.stream.receive_some(65536)
                assert chunk
                got += len(chunk)
            killed = trio.current_time()
            process.kill()
            # A close frame here would be read as payload of the unfinished frame:
            # the gateway ends the TCP connection instead, at once.
            event = await conn.next_event()
            assert event.kind == "eof"
            assert trio.current_time() - killed < CLOSE_TIMEOUT
            conn.abort()
            with trio.fail_after(CLOSE_TIMEOUT):
                await wait_until(lambda: gw.stats().active_pairs == 0)
        [record] = [r for r in logs if r["event"] == "disconnect"]
        assert record["end"] == "backend_vanished"
    finally:
        process.kill()
        await process.wait()


async def test_backend_killed_during_an_upload_gives_client_1011(
    nursery: trio.Nursery, engine: str
) -> None:
    process, port = await start_killable_backend("mid-upload")
    try:
        gw = await start_gateway(
            nursery, f"ws://127.0.0.1:{port}", close_timeout=CLOSE_TIMEOUT, relay_engine=engine
        )
        conn = await open_pair(port_of(gw))
        big = conn.message_frames(BINARY, os.urandom(8 << 20))  # more than the buffers hold

        async def upload() -> None:
            try:
                await conn.send(big)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as uploading:
            uploading.start_soon(upload)
            await wait_ready(process)
            await trio.sleep(0.2)  # the upload is stuck now: the backend reads nothing
            killed = trio.current_time()
            process.kill()
            closed = await expect_close(conn, 1011)
            assert closed - killed < CLOSE_TIMEOUT
            uploading.cancel_scope.cancel()
        with trio.fail_after(CLOSE_TIMEOUT + 1):
            await wait_until(lambda: gw.stats().active_pairs == 0)
        conn.abort()
    finally:
        process.kill()
        await process.wait()


# -- the client vanishes -------------------------------------------------------------------


async def test_client_reset_gives_backend_1001(nursery: trio.Nursery, engine: str) -> None:
    backend = await echo_backend(nursery)
    gw = await start_gateway(nursery, backend.url, close_timeout=CLOSE_TIMEOUT, relay_engine=engine)
    conn = await open_pair(port_of(gw), "/echo/reset")
    await echo_once(conn, payload_for("reset", 0, 100))
    conn.abort()  # SO_LINGER 0: an RST, no FIN, no close frame
    with trio.fail_after(CLOSE_TIMEOUT):
        await wait_until(lambda: backend.stats.by_session.get("reset") == 1001)
        await wait_until(lambda: gw.stats().active_pairs == 0)


async def test_client_reset_while_the_gateway_is_blocked_sending_to_it(
    nursery: trio.Nursery,
    engine: str,
) -> None:
    """The client's window is full (the gateway's send is parked) when it resets."""
    codes: list[int] = []
    flooding = trio.Event()

    async def script(request: BackendRequest, stream: trio.SocketStream, early: bytes) -> None:
        await stream.send_all(accept_response(request))

        async def flood() -> None:
            frame = build_frame(BINARY, b"z" * 65536, masked=False)
            for _ in range(1024):
                await stream.send_all(frame)
            flooding.set()

        async with trio.open_nursery() as inner:
            inner.start_soon(flood)
            conn = Conn(stream, client=False, pending=early)
            event = await conn.next_event()
            if event.kind == "close":
                codes.append(event.code or 0)
            inner.cancel_scope.cancel()

    backend: RawBackend = await nursery.start(RawBackend(script).serve)
    gw = await start_gateway(nursery, backend.url, close_timeout=CLOSE_TIMEOUT, relay_engine=engine)
    conn = await open_pair(port_of(gw))
    pair = next(iter(gw.pairs.values()))
    previous = -1
    while pair.bytes_from_backend != previous:  # until the gateway stops reading
        previous = pair.bytes_from_backend
        await trio.sleep(0.1)
    assert not flooding.is_set()
    conn.abort()
    with trio.fail_after(CLOSE_TIMEOUT):
        await wait_until(lambda: codes == [1001])
        await wait_until(lambda: gw.stats().active_pairs == 0)


def _keepalive_of(sock: Any) -> tuple[int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


@pytest.mark.parametrize(
    ("settings", "expected_on"), [({"tcp_keepalive": 7}, True), ({"tcp_keepalive": 0}, False)]
)
async def test_tcp_keepalive_is_set_on_both_legs(
    nursery: trio.Nursery, engine: str, settings: dict[str, int], expected_on: bool
) -> None:
    """Without idle_timeout, only the kernel's probes notice a peer that vanished silently."""
    backend = await echo_backend(nursery)
    gw = await start_gateway(
        nursery,
        backend.url,
        relay_engine=engine,
        tcp_keepalive_interval=3,
        tcp_keepalive_probes=4,
        **settings,
    )
    conn = await open_pair(port_of(gw), "/echo/keepalive")
    await echo_once(conn, payload_for("keepalive", 0, 10))
    (pair,) = gw.pairs.values()
    try:
        for side in (pair.client, pair.backend):
            on, idle, interval, probes = _keepalive_of(side.endpoint.sock)
            if expected_on:
                assert (on, idle, interval, probes) == (1, 7, 3, 4), side.name
            else:
                assert on == 0, side.name
    finally:
        conn.abort()


async def test_silent_half_open_client_is_closed_after_idle_timeout(
    nursery: trio.Nursery, engine: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A client that stops reading and writing (its host vanished) never answers a close."""
    backend = await echo_backend(nursery)
    idle, close = 10.0, 5.0  # virtual seconds
    gw = await start_gateway(
        nursery, backend.url, api={"idle_timeout": idle}, close_timeout=close, relay_engine=engine
    )
    conn = await open_pair(port_of(gw), "/echo/halfopen")
    await echo_once(conn, payload_for("halfopen", 0, 100))
    silent_since = trio.current_time()
    # The client is still connected but never reads or writes again.
    with trio.fail_after(idle + 1):
        await wait_until(lambda: backend.stats.by_session.get("halfopen") == 1001)
    assert trio.current_time() - silent_since >= idle
    with trio.fail_after(close + 1):  # the gateway waits close_timeout for the client's close
        await wait_until(lambda: gw.stats().active_pairs == 0)
    conn.abort()


async def test_half_open_client_with_a_full_window_is_closed_after_idle_timeout(
    nursery: trio.Nursery, engine: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Same, while the backend was streaming to it: the gateway's send to it is stuck."""
    codes: list[int] = []

    async def script(request: BackendRequest, stream: trio.SocketStream, early: bytes) -> None:
        await stream.send_all(accept_response(request))
        frame = build_frame(BINARY, b"s" * 65536, masked=False)
        conn = Conn(stream, client=False, pending=early)
        with trio.move_on_after(60):  # stuck once the window is full; the close comes meanwhile
            async with trio.open_nursery() as inner:

                async def stream_out() -> None:
                    while True:
                        await stream.send_all(frame)

                inner.start_soon(stream_out)
                event = await conn.next_event()
                codes.append(event.code or 0)
                inner.cancel_scope.cancel()

    backend: RawBackend = await nursery.start(RawBackend(script).serve)
    idle, close = 10.0, 5.0  # virtual seconds
    gw = await start_gateway(
        nursery, backend.url, api={"idle_timeout": idle}, close_timeout=close, relay_engine=engine
    )
    conn = await open_pair(port_of(gw))
    with trio.fail_after(idle + 3):
        await wait_until(lambda: codes == [1001])
        await wait_until(lambda: gw.stats().active_pairs == 0)
    conn.abort()


# -- slow loris ----------------------------------------------------------------------------


async def test_slow_loris_holds_no_slot_and_no_descriptor_past_the_timeouts(
    nursery: trio.Nursery,
) -> None:
    """Many clients dribbling their upgrade request a byte at a time, never reading."""
    raise_nofile(4096)
    backend = await echo_backend(nursery)
    handshake_timeout, close_timeout, clients = 1.0, 0.5, 300
    gw = GatewayProcess(
        gateway_config(
            {"echo": backend.url},
            max_connections=2,  # slow clients must not take any of these
            handshake_timeout=handshake_timeout,
            close_timeout=close_timeout,
        )
    )
    await gw.start(nursery)
    try:
        await (await open_pair(gw.port, "/echo/warm")).aclose()
        await trio.sleep(0.2)
        idle_fds, idle_rss = gw.fds(), gw.rss_kib()
        request = upgrade_request("/echo/loris")
        sockets: list[trio.SocketStream] = []
        attack_started = trio.current_time()

        async def loris() -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            sockets.append(stream)
            try:
                for byte in request:  # never finishes: ~0.05 s a byte
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.05)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return  # the gateway hung up on us

        peak_fds = peak_rss = 0
        async with trio.open_nursery() as attack:
            for _ in range(clients):
                attack.start_soon(loris)
            await wait_until(lambda: len(sockets) == clients)
            await trio.sleep(0.3)
            # Meanwhile a real client gets through: slow handshakes hold no pair slot.
            conn = await open_pair(gw.port, "/echo/legit")
            await echo_once(conn, payload_for("legit", 0, 1000))
            await conn.close(1000)
            await expect_close(conn, 1000)
            await conn.aclose()
            peak_fds, peak_rss = gw.fds(), gw.rss_kib()
            # Each slow client costs the gateway one descriptor (no backend yet), for at
            # most handshake_timeout (then a 408) plus close_timeout (draining its bytes).
            deadline = attack_started + handshake_timeout + close_timeout + 1.5
            with trio.fail_after(deadline - trio.current_time()):
                await wait_until(lambda: gw.fds() <= idle_fds, interval=0.05)
            attack.cancel_scope.cancel()
        assert peak_fds <= idle_fds + clients + 2
        assert peak_fds >= idle_fds + clients // 2  # they really were connected at once
        # A slow handshake costs well under 64 KiB of gateway memory.
        assert peak_rss - idle_rss < clients * 64, f"RSS grew {peak_rss - idle_rss} KiB"
        assert gw.handshake_codes[408] >= clients * 0.9
        assert not gw.alarms
    finally:
        for stream in sockets:
            reset(stream)
        await gw.aclose()


# -- a client that reads nothing while the backend floods -----------------------------------

FLOOD = 256 << 20  # bytes in the test suite; `make soak` floods 1 GiB
FLOOD_RSS_BOUND_MIB = 64


async def test_flood_to_a_client_that_reads_nothing_keeps_rss_bounded(
    nursery: trio.Nursery,
    engine: str,
) -> None:
    backend = await echo_backend(nursery)
    gw = GatewayProcess(gateway_config({"echo": backend.url}, relay_engine=engine))
    await gw.start(nursery)
    try:
        bystander = await open_pair(gw.port, "/echo/bystander")
        for seq in range(20):  # warm up the bystander's path
            await echo_once(bystander, payload_for("bystander", seq, 1000))
        await trio.sleep(0.2)
        base_rss = gw.rss_kib()
        flooded = await open_pair(gw.port, "/echo/flood")
        size = 1 << 20
        await flooded.send_frame(TEXT, f"!flood {FLOOD // size} {size}".encode())
        peak = [base_rss]
        seq = 20

        async def watch_rss() -> None:
            while True:
                peak[0] = max(peak[0], gw.rss_kib())
                await trio.sleep(0.05)

        async def echo_for(seconds: float) -> list[float]:
            nonlocal seq
            times = []
            end = trio.current_time() + seconds
            while trio.current_time() < end:
                started = trio.current_time()
                await echo_once(bystander, payload_for("bystander", seq, 1000))
                times.append(trio.current_time() - started)
                seq += 1
            return times

        async with trio.open_nursery() as watching:
            watching.start_soon(watch_rss)
            # Phase 1: the flooded client reads nothing; the bystander keeps echoing.
            stalled = await echo_for(1.5)
            sent_while_stalled = backend.flood_sent
            # Phase 2: it reads everything, as fast as it can, while the bystander echoes.
            frame_len = len(build_frame(BINARY, b"F" * size, masked=False))
            want = FLOOD // size * frame_len
            got = 0
            first = b""

            async def read_all() -> None:
                nonlocal got, first
                while got < want:
                    chunk = await flooded.stream.receive_some(1 << 20)
                    assert chunk, f"stream ended after {got} of {want} bytes"
                    if len(first) < 16:
                        first += chunk[:16]
                    got += len(chunk)

            busy: list[float] = []
            async with trio.open_nursery() as phase2:
                phase2.start_soon(read_all)
                while got < want:
                    busy += await echo_for(0.2)
            watching.cancel_scope.cancel()
        growth_mib = (peak[0] - base_rss) / 1024
        assert growth_mib < FLOOD_RSS_BOUND_MIB, f"gateway RSS grew {growth_mib:.1f} MiB"
        # Backpressure: while the client read nothing, the backend could not send it much.
        assert sent_while_stalled < 32 << 20, sent_while_stalled
        assert got == want
        assert first == build_frame(BINARY, b"F" * size, masked=False)[:16]
        # The bystander kept going throughout, with no long stall.
        assert len(stalled) > 50, len(stalled)
        assert busy and max(stalled + busy) < 1.0, max(stalled + busy)
        await flooded.close(1000)
        await expect_close(flooded, 1000)
        await flooded.aclose()
        await echo_once(bystander, payload_for("bystander", seq, 1000))
        await bystander.close(1000)
        await expect_close(bystander, 1000)
        await bystander.aclose()
        assert not gw.alarms
    finally:
        await gw.aclose()


# -- malformed frames ----------------------------------------------------------------------

MASK = b"\x00\x00\x00\x00"


def masked(b0: int, payload: bytes = b"", length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    length_bytes = bytes((0x80 | n,)) if n < 126 else bytes((0x80 | 127,)) + n.to_bytes(8, "big")
    return bytes((b0,)) + length_bytes + MASK + payload


BAD_FRAMES: dict[str, tuple[bytes, int]] = {
    "unmasked": (build_frame(TEXT, b"hi", masked=False), 1002),
    "reserved-opcode": (masked(0x83, b"x"), 1002),
    "rsv1-without-extension": (masked(0xC1, b"x"), 1002),
    "fragmented-ping": (masked(0x09, b"x"), 1002),
    "long-ping": (masked(0x89, b"p" * 126), 1002),
    "orphan-continuation": (masked(0x80, b"x"), 1002),
    "message-inside-message": (masked(0x01, b"a") + masked(0x81, b"b"), 1002),
    "close-1-byte": (masked(0x88, b"\x03"), 1002),
    "close-code-1005": (masked(0x88, close_payload(1005)), 1002),
    "close-bad-utf8": (masked(0x88, b"\x03\xe8\xff\xfe"), 1002),
    "length-msb-set": (bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big") + MASK, 1002),
    "too-big": (masked(0x82, length=2000), 1009),
}


async def test_malformed_frames_close_only_their_own_pair(
    nursery: trio.Nursery, engine: str
) -> None:
    backend = await echo_backend(nursery)
    gw = await start_gateway(
        nursery,
        backend.url,
        api={"max_message_size": 1000},
        close_timeout=CLOSE_TIMEOUT,
        relay_engine=engine,
    )
    port = port_of(gw)
    bystanders = [await open_pair(port, f"/echo/by{i}") for i in range(5)]
    stop = trio.Event()
    echoed = [0] * len(bystanders)

    async def keep_echoing(i: int) -> None:
        seq = 0
        while not stop.is_set():
            # Fragmented and whole messages, with pings between fragments.
            payload = payload_for(f"by{i}", seq, 900)
            frames = bystanders[i].message_frames(TEXT, payload, 3)
            await bystanders[i].send(frames + build_frame(PING, b"p", masked=True))
            event = await bystanders[i].next_event()
            assert (event.kind, event.payload, event.frames) == ("message", payload, 3)
            assert (await bystanders[i].next_event()).kind == "pong"
            seq += 1
            echoed[i] = seq

    async def offend(name: str, data: bytes, code: int) -> None:
        conn = await open_pair(port, f"/echo/bad-{name}")
        await echo_once(conn, payload_for(f"bad-{name}", 0, 10))
        await conn.send(data)
        await expect_close(conn, code)
        await conn.aclose()

    with capture_logs() as logs:
        async with trio.open_nursery() as running:
            for i in range(len(bystanders)):
                running.start_soon(keep_echoing, i)
            async with trio.open_nursery() as offenders:
                for name, (data, code) in BAD_FRAMES.items():
                    offenders.start_soon(offend, name, data, code)
            before = list(echoed)
            await wait_until(lambda: all(e > b + 3 for e, b in zip(echoed, before, strict=True)))
            stop.set()
    for conn in bystanders:
        await conn.close(1000)
        await expect_close(conn, 1000)
        await conn.aclose()
    ends = {r["correlation_id"]: r["end"] for r in logs if r["event"] == "disconnect"}
    assert sorted(ends.values()) == sorted(
        ["client_message_too_big"] + ["client_protocol_error"] * (len(BAD_FRAMES) - 1)
    )
    for name in BAD_FRAMES:
        expected = 1001 if name == "too-big" else 1002
        assert backend.stats.by_session[f"bad-{name}"] == expected, name
    assert not backend.stats.problems
    with trio.fail_after(CLOSE_TIMEOUT):
        await wait_until(lambda: gw.stats().active_pairs == 0)


# -- hostile handshakes ------------------------------------------------------------------

GOOD_HEAD = (
    "GET /echo HTTP/1.1\r\nHost: gateway.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


@pytest.mark.parametrize(
    "injected",
    [
        b"X-Inject: a\rX-Evil: b\r\n",  # a bare CR inside a value
        b"X-Inject: a\x00b\r\n",  # NUL
        b"X-Inject: a\r\n\rX-Evil: b\r\n",
        b"X-Inject : b\r\n",  # whitespace before the colon (request smuggling vector)
        b"X-In ject: b\r\n",
    ],
    ids=["bare-cr", "nul", "cr-line", "space-before-colon", "space-in-name"],
)
async def test_header_injection_is_refused_before_any_backend(
    nursery: trio.Nursery, injected: bytes
) -> None:
    backend = await echo_backend(nursery)
    gw = await start_gateway(nursery, backend.url)
    with capture_logs() as logs:
        shake = await connect(port_of(gw), request=GOOD_HEAD.encode() + injected + b"\r\n")
    assert shake.status == 400
    assert backend.stats.connections == 0
    [record] = [r for r in logs if r["event"] == "handshake"]
    assert record["last_error_reason"] == "MalformedRequest"
    assert not [r for r in logs if r.get("log_level") == "error"]


class HeadRecorder:
    """A backend that records each raw request head it gets, answers 101 and holds on."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.port = 0

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            head, _ = await read_head(stream)
            self.heads.append(head)
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            request = BackendRequest("/", [("sec-websocket-key", key.decode())])
            await stream.send_all(accept_response(request))
            try:
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass


@pytest.mark.parametrize(
    "line",
    [
        "X-Name: Jos\u00e9".encode(),  # UTF-8 bytes (obs-text): allowed in a field value
        b"X-Raw: \xff\xfe\x80 x",
    ],
    ids=["utf8", "latin1"],
)
async def test_unusual_but_legal_header_values_reach_the_backend(
    nursery: trio.Nursery, line: bytes
) -> None:
    """Bytes 0x80-0xFF are legal in a field value (RFC 9110 5.5): relayed, never a 500."""
    backend: HeadRecorder = await nursery.start(HeadRecorder().serve)
    gw = await start_gateway(nursery, f"ws://127.0.0.1:{backend.port}")
    with capture_logs() as logs:
        shake = await connect(port_of(gw), request=GOOD_HEAD.encode() + line + b"\r\n\r\n")
        assert shake.status == 101, shake.body
        assert shake.conn is not None
        await shake.conn.aclose()
    assert not [r for r in logs if r.get("log_level") == "error"]
    [head] = backend.heads
    name = line.split(b":")[0].lower()
    [forwarded] = [h for h in head.split(b"\r\n") if h.lower().startswith(name + b":")]
    assert forwarded.split(b":", 1)[1].strip() == line.split(b":", 1)[1].strip()


async def test_an_obs_folded_header_is_a_clean_400_and_the_gateway_serves_on(
    nursery: trio.Nursery,
) -> None:
    """RFC 9112 5.2 lets a server refuse obs-fold with 400; the gateway does, as llhttp does."""
    backend: HeadRecorder = await nursery.start(HeadRecorder().serve)
    gw = await start_gateway(nursery, f"ws://127.0.0.1:{backend.port}")
    with capture_logs() as logs:
        folded = await connect(port_of(gw), request=GOOD_HEAD.encode() + b"X-F: a\r\n b\r\n\r\n")
        assert folded.status == 400 and b"malformed request" in folded.body
        good = await connect(port_of(gw))
        assert good.status == 101 and good.conn is not None
        await good.conn.aclose()
    assert len(backend.heads) == 1  # only the good handshake reached the backend
    assert [r["response_code"] for r in logs if r["event"] == "handshake"] == [400, 101]


async def _accept_and_hold(
    request: BackendRequest, stream: trio.SocketStream, early: bytes
) -> None:
    await stream.send_all(accept_response(request))
    while await stream.receive_some(65536):
        pass


# -- the limiter ---------------------------------------------------------------------------


async def test_limiter_admits_exactly_max_connections_and_slots_come_back(
    nursery: trio.Nursery,
    engine: str,
) -> None:
    raise_nofile(4096)
    backend = await echo_backend(nursery)
    limit = 50
    gw = await start_gateway(nursery, backend.url, max_connections=limit, relay_engine=engine)
    port = port_of(gw)

    async def burst(tag: str) -> tuple[list[Conn], list[int]]:
        opened: list[Conn] = []
        refused: list[int] = []

        async def one(i: int) -> None:
            shake = await connect(port, f"/echo/{tag}{i}")
            if shake.conn is not None:
                opened.append(shake.conn)
            else:
                refused.append(shake.status)
                assert shake.head.lower().count(b"retry-after: 1") == 1
                assert json.loads(shake.body)["statusCode"] == 503

        async with trio.open_nursery() as all_at_once:
            for i in range(limit + 100):
                all_at_once.start_soon(one, i)
        return opened, refused

    for round_ in ("a", "b"):
        opened, refused = await burst(round_)
        assert len(opened) == limit
        assert refused == [503] * 100
        assert gw.stats().active_pairs == limit
        for i, conn in enumerate(opened):  # every admitted pair works
            await echo_once(conn, payload_for("x", i, 10))
        async with trio.open_nursery() as closing:
            for conn in opened:

                async def close(conn: Conn = conn) -> None:
                    await conn.close(1000)
                    await expect_close(conn, 1000)
                    await conn.aclose()

                closing.start_soon(close)
        with trio.fail_after(5):
            await wait_until(lambda: gw.stats().active_pairs == 0)


# -- drain ---------------------------------------------------------------------------------

DRAIN_PAIRS = 1000


@pytest.mark.deadline(90)
async def test_sigterm_drains_1000_pairs_with_1001_and_exits_0(
    nursery: trio.Nursery, engine: str
) -> None:
    raise_nofile(4 * DRAIN_PAIRS + 200)
    backend = await echo_backend(nursery)
    drain_timeout = 15.0
    gw = GatewayProcess(
        gateway_config(
            {"echo": backend.url},
            max_connections=DRAIN_PAIRS + 10,
            drain_timeout=drain_timeout,
            close_timeout=5,
            relay_engine=engine,
        )
    )
    await gw.start(nursery)
    conns: list[Conn] = []
    try:
        limiter = trio.CapacityLimiter(25)  # more in flight only adds contention

        async def open_one(i: int) -> None:
            async with limiter:
                conns.append(await open_pair(gw.port, f"/echo/d{i}"))

        async with trio.open_nursery() as opening:
            for i in range(DRAIN_PAIRS):
                opening.start_soon(open_one, i)
        assert len(conns) == DRAIN_PAIRS
        await wait_until(lambda: backend.stats.connections == DRAIN_PAIRS)
        codes: list[int | None] = []

        async def goodbye(conn: Conn) -> None:
            event = await conn.next_event()
            codes.append(event.code if event.kind == "close" else None)
            if event.kind == "close":
                await conn.close(1001)  # as clients do
            await conn.read_to_eof(drain_timeout)

        signalled = trio.current_time()
        async with trio.open_nursery() as waiting:
            for conn in conns:
                waiting.start_soon(goodbye, conn)
            gw.signal(signal.SIGTERM)
            with trio.fail_after(drain_timeout + 2):
                status = await gw.wait()
        elapsed = trio.current_time() - signalled
        assert status == 0
        assert elapsed < drain_timeout
        assert codes == [1001] * DRAIN_PAIRS
        with trio.fail_after(5):
            await wait_until(lambda: backend.stats.closes[1001] == DRAIN_PAIRS)
        assert gw.records["drain_finished"] == 1
        assert not gw.alarms
    finally:
        for conn in conns:
            conn.abort()
        await gw.aclose()


# -- not an open proxy ---------------------------------------------------------------------


async def test_no_client_input_can_choose_the_backend_host(nursery: trio.Nursery) -> None:
    """Host, X-Forwarded-Host, Forwarded, absolute-form or odd targets: the backend stays put."""
    good = await nursery.start(RawBackend(_accept_and_hold).serve)
    evil = await nursery.start(RawBackend(_accept_and_hold).serve)
    gw = await start_gateway(nursery, good.url)
    there = f"127.0.0.1:{evil.port}"
    attempts: list[tuple[str, list[tuple[str, str]]]] = [
        ("/echo", [("X-Forwarded-Host", there)]),
        ("/echo", [("Forwarded", f"host={there};proto=ws")]),
        ("/echo", [("X-Original-URL", f"ws://{there}/")]),
        ("/echo", [("X-Rewrite-URL", f"ws://{there}/")]),
        ("/echo", [("X-Host", there), ("X-Forwarded-Server", there)]),
        (f"/echo/@{there}/x", []),
        (f"/echo?next=ws://{there}/", []),
        (f"/echo/..%2f..%2f{there}", []),
        (f"//{there}/echo", []),
        (f"ws://{there}/echo", []),
        (f"http://{there}/echo", []),
        (f"{there}", []),
    ]
    statuses = []
    for target, headers in attempts:
        request = upgrade_request(target, headers, host=there)  # the Host header too
        shake = await connect(port_of(gw), request=request)
        statuses.append(shake.status)
        if shake.conn is not None:
            await shake.conn.aclose()
    assert evil.requests == []
    assert all(status in (101, 400, 404) for status in statuses), statuses
    assert statuses[:8] == [101] * 8
    for seen in good.requests:
        assert seen.header("host") == f"127.0.0.1:{good.port}"
        # What the client claimed is passed on only as X-Forwarded-Host, for the backend.
        assert seen.all("x-forwarded-host") == [there]


# -- TLS -----------------------------------------------------------------------------------


async def receive_messages(client: RawClient, count: int) -> list[bytes]:
    """The next ``count`` data messages, reassembled (wsproto hands out frames in pieces)."""
    messages: list[bytes] = []
    message = bytearray()
    while len(messages) < count:
        pieces = await client.receive_frames(1)
        assert pieces, f"the stream ended after {len(messages)} messages"
        for piece in pieces:
            message += piece.payload
            if piece.message_finished:
                messages.append(bytes(message))
                message.clear()
    return messages


async def test_wss_front_end_refuses_tls_below_1_2(nursery: trio.Nursery, tmp_path: Path) -> None:
    tls, _, ca = tls_certificate(tmp_path)
    backend = await echo_backend(nursery)
    with capture_logs() as logs:
        gw = await start_gateway(nursery, backend.url, tls=tls)

        def client_context(version: ssl.TLSVersion) -> ssl.SSLContext:
            context = ssl.create_default_context()
            ca.configure_trust(context)
            # Let this client offer old versions at all (OpenSSL 3 refuses them by default),
            # so that the refusal measured is the gateway's.
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 on purpose
                context.minimum_version = ssl.TLSVersion.TLSv1
                context.maximum_version = version
            return context

        async def handshake(version: ssl.TLSVersion) -> None:
            stream = await trio.open_tcp_stream("127.0.0.1", port_of(gw))
            tls = trio.SSLStream(stream, client_context(version), server_hostname="127.0.0.1")
            try:
                await tls.do_handshake()
                await tls.send_all(upgrade_request("/echo"))
                assert (await tls.receive_some(12)).startswith(b"HTTP/1.1 101")
            finally:
                await trio.aclose_forcefully(tls)

        for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            with pytest.raises(trio.BrokenResourceError) as info:
                await handshake(old)
            assert isinstance(info.value.__cause__, ssl.SSLError)
        await handshake(ssl.TLSVersion.TLSv1_2)
        await handshake(ssl.TLSVersion.TLSv1_3)
        await wait_until(lambda: sum(r["event"] == "tls_handshake_failed" for r in logs) == 2)
    # The refusal is the gateway's: it saw a ClientHello for a version it does not accept.
    for record in [r for r in logs if r["event"] == "tls_handshake_failed"]:
        assert "UNSUPPORTED_PROTOCOL" in record["error"], record


async def test_wss_backpressure_and_order_through_the_tls_endpoint(
    nursery: trio.Nursery, tmp_path: Path, engine: str
) -> None:
    """A wss client that stops reading stalls the backend; when it reads, all arrives in order.

    The gateway's TLS leg parks mid-record with the socket full, and holds at
    most one chunk of ciphertext while the backend is not read; then the client
    closes and the backend hears of it.
    """
    tls, context, _ = tls_certificate(tmp_path)
    frames = [build_frame(BINARY, bytes([i]) * 65536, masked=False) for i in range(256)]
    codes: list[int] = []
    flooded = trio.Event()

    async def script(request: BackendRequest, stream: trio.SocketStream, early: bytes) -> None:
        await stream.send_all(accept_response(request))
        for frame in frames:
            await stream.send_all(frame)
        flooded.set()
        event = await Conn(stream, client=False, pending=early).next_event()
        if event.kind == "close":
            codes.append(event.code or 0)

    backend: RawBackend = await nursery.start(RawBackend(script).serve)
    gw = await start_gateway(
        nursery,
        backend.url,
        close_timeout=CLOSE_TIMEOUT,
        relay_engine=engine,
        tls=tls,
    )
    client = await RawClient.connect(port_of(gw), "/echo", ssl_context=context)
    assert client.response is not None and client.response.status == 101
    [pair] = gw.pairs.values()
    assert pair.engine == engine  # the reactor pumps TLS legs too
    previous = -1
    while pair.bytes_from_backend != previous:  # until the gateway stops reading
        previous = pair.bytes_from_backend
        await trio.sleep(0.1)
    assert not flooded.is_set()
    assert pair.bytes_from_backend < 12 << 20  # 16 MiB sent: most of it still in the backend
    assert pair.client.endpoint.dirty  # parked with ciphertext waiting for the socket
    messages = await receive_messages(client, len(frames))
    assert messages == [bytes([i]) * 65536 for i in range(256)]
    await flooded.wait()
    await client.close(1000)
    assert (await client.receive_close())[0] == 1000
    await client.aclose()
    with trio.fail_after(CLOSE_TIMEOUT):
        await wait_until(lambda: codes == [1000])
        await wait_until(lambda: gw.stats().active_pairs == 0)


async def test_wss_messages_sent_right_behind_the_request_are_all_relayed(
    nursery: trio.Nursery, tmp_path: Path, engine: str
) -> None:
    """Frames that share TLS records with the request, or follow it before the 101, all go through.

    The request is read into a small buffer, so most of these frames are still
    buffered, decrypted or not, inside the gateway's TLS object when relaying
    starts, with nothing more arriving on the socket to wake the pump.
    """
    settings, context, _ = tls_certificate(tmp_path)
    backend = await echo_backend(nursery)
    gw = await start_gateway(nursery, backend.url, relay_engine=engine, tls=settings)
    tcp = await trio.open_tcp_stream("127.0.0.1", port_of(gw))
    tls = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
    payloads = [bytes([i]) * 1000 for i in range(40)]  # 40 KB: three TLS records or more
    await tls.send_all(
        upgrade_request("/echo/early")
        + b"".join(build_frame(BINARY, p, masked=True) for p in payloads)
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await tls.receive_some(65536)
    assert head.startswith(b"HTTP/1.1 101"), head
    conn = Conn(tls, client=True, pending=head.split(b"\r\n\r\n", 1)[1])
    [pair] = gw.pairs.values()
    assert pair.engine == engine
    with trio.fail_after(5):  # a stalled relay would wait for bytes that never come
        for payload in payloads:
            event = await conn.next_event()
            assert (event.kind, event.payload) == ("message", payload)
    await conn.aclose()


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_a_finished_pair_is_freed_without_the_garbage_collector(
    nursery: trio.Nursery, tmp_path: Path, engine: str, tls: bool
) -> None:
    """Nothing of a finished pair may wait for the cyclic garbage collector.

    A TLS leg's buffers live in OpenSSL, where the collector does not see them:
    while the reactor's two legs of a pair pointed at each other, 40 churning
    wss clients grew the gateway's RSS by 50 MiB in a minute.
    """
    backend = await echo_backend(nursery)
    settings: dict[str, Any] = {"relay_engine": engine}
    context = None
    if tls:
        settings["tls"], context, _ = tls_certificate(tmp_path)
    gw = await start_gateway(nursery, backend.url, **settings)
    gc.collect()
    gc.disable()
    try:
        client = await RawClient.connect(port_of(gw), "/echo/freed", ssl_context=context)
        await client.send_binary(b"ping")
        [echo] = await client.receive_frames(1)
        assert echo.payload == b"ping"
        [pair] = gw.pairs.values()
        assert pair.engine == engine
        freed = weakref.ref(pair)
        del pair
        await client.close(1000)
        assert (await client.receive_close())[0] == 1000
        await client.aclose()
        with trio.fail_after(5):
            await wait_until(lambda: not gw.pairs)
            await wait_until(lambda: freed() is None)
    finally:
        gc.enable()


async def test_a_wss_backend_relays_both_ways_with_either_engine(
    nursery: trio.Nursery, tmp_path: Path, engine: str
) -> None:
    settings, _, ca = tls_certificate(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(settings["certificate"], settings["private_key"])
    port = await nursery.start(functools.partial(serve_echo, "127.0.0.1", 0, ssl_context=server))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    gw = await start_gateway(
        nursery,
        f"wss://127.0.0.1:{port}/echo",
        relay_engine=engine,
        api={"backend_ca_file": str(ca_file)},
    )
    client = await RawClient.connect(port_of(gw), "/echo")
    [pair] = gw.pairs.values()
    assert pair.engine == engine
    sent = [os.urandom(300_000), *(bytes([i]) * 100 for i in range(50)), os.urandom(70_000)]
    for message in sent:
        await client.send_binary(message)
    assert await receive_messages(client, len(sent)) == sent
    await client.close(1000)
    assert (await client.receive_close())[0] == 1000
    await client.aclose()
    await wait_until(lambda: not gw.pairs)
