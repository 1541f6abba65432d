"""The gateway between peers that are not Python: Node's ``ws`` as backend and as client.

tests/node/backend.js is a backend written the way Node services commonly are:
an ``upgrade`` handler that refuses with ``socket.end(...)`` and adds no
``error`` listener, so a TCP reset after its refusal kills the process.
tests/node/client.js is a ``ws`` client driven over a control socket. Each is
started once for the module (``make node`` installs ``ws`` from
tests/node/package-lock.json); when Node or ``ws`` is missing the tests fail,
they never skip.

The raw-socket tests at the end pin down what each backend refusal looks like
on the wire: a graceful close (the backend reads our FIN) after a complete
non-101 answer, a reset after an answer that is not HTTP.
"""

from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import trio
import trustme

import wsgate

from .helpers import (
    BackendRequest,
    RawBackend,
    RawClient,
    accept_response,
    make_config,
    server_frames,
    wait_until,
)

NODE_DIR = Path(__file__).parent / "node"
NODE = os.environ.get("WSGATE_NODE", shutil.which("node") or "/usr/bin/node")

pytestmark = pytest.mark.usefixtures("relay_engine")


class NodeProcess:
    """A Node script that prints ``{"port": N}`` once listening, run for a whole module."""

    def __init__(self, script: str, stderr: IO[bytes]) -> None:
        self.script = script
        self.stderr = stderr
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.start()

    def start(self) -> None:
        if not (NODE_DIR / "node_modules" / "ws").is_dir():
            pytest.fail(f"{NODE_DIR}/node_modules/ws is missing: run `make node` (npm ci)")
        if not Path(NODE).exists():
            pytest.fail(f"node is missing ({NODE}): run `make node` as root (apt-get)")
        self.process = subprocess.Popen(
            [NODE, str(NODE_DIR / self.script)],
            cwd=NODE_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=20):
                self.stop()
                pytest.fail(f"{self.script} printed no port within 20 s:\n{self.errors()}")
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            pytest.fail(f"{self.script} exited at start:\n{self.errors()}")
        self.port = json.loads(line)["port"]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def errors(self) -> str:
        """What the process wrote on stderr so far (an uncaught exception's trace)."""
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
            self.process.wait(timeout=10)
            assert self.process.stdout is not None
            self.process.stdout.close()
            self.process = None


@pytest.fixture(scope="module")
def node_backend_process() -> Iterator[NodeProcess]:
    with tempfile.TemporaryFile() as stderr:
        node = NodeProcess("backend.js", stderr)
        yield node
        node.stop()


@pytest.fixture(scope="module")
def node_client_process() -> Iterator[NodeProcess]:
    with tempfile.TemporaryFile() as stderr:
        node = NodeProcess("client.js", stderr)
        yield node
        node.stop()


@pytest.fixture
def node_backend(node_backend_process: NodeProcess) -> Iterator[NodeProcess]:
    """The module's Node backend, restarted if an earlier test killed it."""
    if not node_backend_process.alive():
        node_backend_process.stop()
        node_backend_process.start()
    yield node_backend_process


async def node_client(node: NodeProcess, **command: Any) -> dict[str, Any]:
    """Have the Node ``ws`` client run ``command`` (see tests/node/client.js)."""
    assert node.alive(), f"the Node client died:\n{node.errors()}"
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    async with stream:
        await stream.send_all(json.dumps(command).encode() + b"\n")
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    assert data, f"the Node client answered nothing:\n{node.errors()}"
    result: dict[str, Any] = json.loads(data)
    return result


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start(nursery: trio.Nursery, node_backend: NodeProcess, **gateway: Any) -> wsgate.Gateway:
    """A gateway: /node to the Node backend, /nowhere to a port nobody listens on."""
    config = make_config(
        [
            {"name": "node", "path": "node", "service_url": f"ws://127.0.0.1:{node_backend.port}"},
            {
                "name": "nowhere",
                "path": "nowhere",
                "service_url": f"ws://127.0.0.1:{unused_port()}",
            },
        ],
        **gateway,
    )
    gw: wsgate.Gateway = await nursery.start(wsgate.Gateway(config).run)
    return gw


async def echo_once(port: int, target: str = "/node/echo") -> None:
    client = await RawClient.connect(port, target)
    assert client.response is not None and client.response.status == 101
    await client.send_text("still here")
    [frame] = await client.receive_frames(1)
    assert frame.payload == "still here"
    await client.close()
    assert (await client.receive_close())[0] == 1000
    await client.aclose()


# -- a Node backend ----------------------------------------------------------------


async def test_a_node_backend_refusing_with_socket_end_survives_and_serves_the_next_client(
    nursery: trio.Nursery, node_backend: NodeProcess
) -> None:
    gw = await start(nursery, node_backend)
    port = gw.addresses[0][1]
    for _ in range(3):
        client = await RawClient.connect(port, "/node/reject")
        assert client.response is not None
        assert client.response.status == 403
        assert client.response.body == b"forbidden by the node backend\n"
        await client.aclose()
        # The refusal must not have killed it: the next client is served.
        await echo_once(port)
    assert node_backend.alive(), f"the Node backend died:\n{node_backend.errors()}"
    assert "ECONNRESET" not in node_backend.errors()


async def test_a_node_backend_that_keeps_its_refused_socket_open_is_closed_gracefully(
    nursery: trio.Nursery, node_backend: NodeProcess
) -> None:
    # Its 401 has a Content-Length and it never ends the socket: the gateway
    # relays the 401, sends its FIN and waits a bounded time for the backend's.
    gw = await start(nursery, node_backend)
    port = gw.addresses[0][1]
    client = await RawClient.connect(port, "/node/reject-keepalive")
    assert client.response is not None and client.response.status == 401
    assert client.response.body == b"token required\n"
    await client.aclose()
    await echo_once(port)
    assert node_backend.alive(), f"the Node backend died:\n{node_backend.errors()}"


# -- a Node client (and the Node backend) --------------------------------------------


async def test_a_node_client_relays_text_binary_and_a_subprotocol_through_to_a_node_backend(
    nursery: trio.Nursery, node_backend: NodeProcess, node_client_process: NodeProcess
) -> None:
    gw = await start(nursery, node_backend)
    result = await node_client(
        node_client_process,
        url=f"{gw.url}/node/room/1?x=1",
        protocols=["chat.v1", "chat.v2"],
        send=[{"text": "héllo"}, {"binary": 300_000}, {"binary": 0}, {"text": "whoami"}],
    )
    assert result["opened"] is True, result
    assert result["protocol"] == "chat.v2"
    assert result["received"][:3] == [
        "héllo",
        {"binary": 300_000, "pattern": True},
        {"binary": 0, "pattern": True},
    ]
    assert json.loads(result["received"][3]) == {"path": "/room/1?x=1", "protocol": "chat.v2"}
    assert (result["close_code"], result["close_reason"]) == (1000, "done")


async def test_a_node_backend_close_code_and_reason_reach_the_node_client(
    nursery: trio.Nursery, node_backend: NodeProcess, node_client_process: NodeProcess
) -> None:
    gw = await start(nursery, node_backend)
    result = await node_client(
        node_client_process, url=f"{gw.url}/node", send=[{"text": "close:4001:asked to"}]
    )
    assert result["opened"] is True, result
    assert (result["close_code"], result["close_reason"]) == (4001, "asked to")


async def test_a_drain_closes_a_node_client_with_1001(
    nursery: trio.Nursery, node_backend: NodeProcess, node_client_process: NodeProcess
) -> None:
    gw = await start(nursery, node_backend)
    results: list[dict[str, Any]] = []

    async def hold() -> None:
        results.append(
            await node_client(node_client_process, url=f"{gw.url}/node", wait_close=True)
        )

    nursery.start_soon(hold)
    await wait_until(lambda: len(gw.pairs) == 1)
    await gw.drain(timeout=5)
    await wait_until(lambda: bool(results))
    assert results[0]["opened"] is True
    assert results[0]["close_code"] == 1001


@pytest.mark.parametrize(
    ("target", "status", "body"),
    [
        ("/no-such-api", 404, '{"statusCode": 404, "message": "no API at this path"}'),
        ("/node/reject", 403, "forbidden by the node backend\n"),
        ("/node/reject-keepalive", 401, "token required\n"),
        ("/nowhere", 502, None),
    ],
)
async def test_a_node_client_reads_the_whole_refusal(
    nursery: trio.Nursery,
    node_backend: NodeProcess,
    node_client_process: NodeProcess,
    target: str,
    status: int,
    body: str | None,
) -> None:
    gw = await start(nursery, node_backend)
    result = await node_client(node_client_process, url=f"{gw.url}{target}")
    assert result.get("error") is None, result  # an ECONNRESET would land here
    assert result["status"] == status
    if body is None:
        assert json.loads(result["body"])["statusCode"] == status
    else:
        assert result["body"] == body
    assert result["headers"]["connection"] == "close"
    assert node_backend.alive(), f"the Node backend died:\n{node_backend.errors()}"


# -- raw sockets: what a refusing backend sees ---------------------------------------


def refusal(status: int, body: bytes, *, close: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status} Refused\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    )
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


async def in_front_of(nursery: trio.Nursery, handler: Any) -> wsgate.Gateway:
    """A gateway whose one API (``/echo``) relays to a raw backend run by ``handler``."""
    backend = await nursery.start(RawBackend(handler).serve)
    config = make_config([{"name": "echo", "path": "echo", "service_url": backend.url}])
    gateway: wsgate.Gateway = await nursery.start(wsgate.Gateway(config).run)
    return gateway


@pytest.mark.parametrize("backend_closes", [True, False], ids=["ends-first", "keeps-alive"])
async def test_a_backend_sees_fin_not_rst_after_its_403(
    nursery: trio.Nursery, backend_closes: bool
) -> None:
    seen: list[str] = []

    async def refuse(request: BackendRequest, stream: trio.SocketStream, _: bytes) -> None:
        await stream.send_all(refusal(403, b"no entry", close=backend_closes))
        if backend_closes:  # as Node's socket.end(): our FIN goes with the answer
            await stream.send_eof()
        try:
            with trio.fail_after(5):
                data = await stream.receive_some(65536)
            seen.append("fin" if data == b"" else f"data {data!r}")
        except trio.BrokenResourceError as exc:
            seen.append(f"reset ({exc.__cause__!r})")

    gw = await in_front_of(nursery, refuse)
    client = await RawClient.connect(gw.addresses[0][1])
    assert client.response is not None
    assert (client.response.status, client.response.body) == (403, b"no entry")
    await client.aclose()
    await wait_until(lambda: bool(seen))
    assert seen == ["fin"]


async def test_a_wss_backend_gets_close_notify_not_rst_after_its_403(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    seen: list[str] = []

    async def refuse(stream: trio.SSLStream[trio.SocketStream]) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(65536)
        await stream.send_all(refusal(403, b"no entry", close=False))
        try:
            with trio.fail_after(5):
                data = await stream.receive_some(65536)
            seen.append("close_notify" if data == b"" else f"data {data!r}")
        except trio.BrokenResourceError as exc:  # a reset, or a TCP end without close_notify
            seen.append(f"broken ({exc.__cause__!r})")

    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, refuse, 0, context, host="127.0.0.1")
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    config = make_config(
        [
            {
                "name": "echo",
                "path": "echo",
                "service_url": f"wss://127.0.0.1:{port}",
                "backend_ca_file": str(ca_file),
            }
        ]
    )
    gw = await nursery.start(wsgate.Gateway(config).run)
    client = await RawClient.connect(gw.addresses[0][1])
    assert client.response is not None
    assert (client.response.status, client.response.body) == (403, b"no entry")
    await client.aclose()
    await wait_until(lambda: bool(seen))
    assert seen == ["close_notify"]


async def test_a_backend_whose_answer_is_not_http_is_reset(nursery: trio.Nursery) -> None:
    seen: list[str] = []

    async def babble(request: BackendRequest, stream: trio.SocketStream, _: bytes) -> None:
        await stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        try:
            with trio.fail_after(5):
                data = await stream.receive_some(65536)
            seen.append("fin" if data == b"" else f"data {data!r}")
        except trio.BrokenResourceError:
            seen.append("reset")

    gw = await in_front_of(nursery, babble)
    client = await RawClient.connect(gw.addresses[0][1])
    assert client.response is not None and client.response.status == 502
    await client.aclose()
    await wait_until(lambda: bool(seen))
    assert seen == ["reset"]


async def test_a_backend_accepted_for_a_client_that_reset_meanwhile_gets_1001_and_fin(
    nursery: trio.Nursery,
) -> None:
    asked = trio.Event()
    client_gone = trio.Event()
    seen: list[Any] = []

    async def accept_late(request: BackendRequest, stream: trio.SocketStream, _: bytes) -> None:
        asked.set()
        await client_gone.wait()
        await stream.send_all(accept_response(request))
        frames = server_frames()
        try:
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    frames.receive_bytes(chunk)
            seen.extend((f.opcode.name, f.payload) for f in frames.received_frames())
            seen.append("fin")
        except trio.BrokenResourceError:
            seen.append("reset")

    gw = await in_front_of(nursery, accept_late)
    with socket.socket() as sock:
        sock.connect(gw.addresses[0])
        sock.sendall(
            b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await asked.wait()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client_gone.set()
    await wait_until(lambda: bool(seen))
    assert seen[-1] == "fin", seen
    assert seen[:-1] == [("CLOSE", (1001, "client connection lost without a close frame"))]


# -- raw sockets: what a client sees of the gateway's own refusals -------------------


async def test_a_refusal_reaches_a_client_that_sent_more_and_reads_late(
    nursery: trio.Nursery, node_backend: NodeProcess
) -> None:
    # The request is followed by 256 KiB of frames the client sends before reading
    # anything. The gateway reads (and drops) them while it waits for the client's
    # end: closing with them unread would reset the connection and could destroy
    # the 404 before the client reads it.
    gw = await start(nursery, node_backend, close_timeout=0.2)
    frame = b"\x82\xfe\x40\x00\x00\x00\x00\x00" + bytes(0x4000)  # masked, 16 KiB
    with socket.socket() as sock:
        sock.connect(gw.addresses[0])
        sock.sendall(
            b"GET /no-such-api HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n" + frame * 16
        )
        await trio.sleep(1)  # the gateway has given up waiting for our end by now
        sock.setblocking(False)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        data = bytearray()
        while chunk := await stream.receive_some(65536):  # a reset would raise here
            data += chunk
    assert data.startswith(b"HTTP/1.1 404 ")
    assert data.endswith(b'{"statusCode": 404, "message": "no API at this path"}')


async def test_a_client_that_leaves_without_a_request_gets_a_fin(
    nursery: trio.Nursery, node_backend: NodeProcess
) -> None:
    gw = await start(nursery, node_backend)
    client = await trio.open_tcp_stream(*gw.addresses[0])
    async with client:
        await client.send_eof()  # half-closed: nothing more to say, still reading
        with trio.fail_after(5):
            assert await client.receive_some(65536) == b""  # not a reset


# -- raw sockets: a pair's side that ends its stream without a close frame ------------


async def test_a_backend_that_half_closes_without_a_close_frame_gets_a_fin(
    nursery: trio.Nursery,
) -> None:
    # The backend says nothing more (FIN, no close frame) but still reads. The
    # client is told (1011, as for a vanished backend); the backend gets our
    # FIN, not a reset: its end was orderly, and it may still be reading.
    seen: list[str] = []

    async def half_close(request: BackendRequest, stream: trio.SocketStream, _: bytes) -> None:
        await stream.send_all(accept_response(request))
        await stream.send_eof()
        try:
            with trio.fail_after(5):
                while await stream.receive_some(65536):
                    pass
            seen.append("fin")
        except trio.BrokenResourceError:
            seen.append("reset")

    gw = await in_front_of(nursery, half_close)
    client = await RawClient.connect(gw.addresses[0][1])
    try:
        with trio.fail_after(5):
            code, _reason = await client.receive_close()
    finally:
        await client.aclose()
    assert code == 1011
    await wait_until(lambda: bool(seen))
    assert seen == ["fin"]


async def test_a_client_that_half_closes_without_a_close_frame_gets_a_fin(
    nursery: trio.Nursery,
) -> None:
    # The mirror case: the client's FIN without a close frame ends the pair
    # (the backend gets 1001), and the client, which may still be reading,
    # gets our FIN rather than a reset.
    frames: list[Any] = []

    async def record(request: BackendRequest, stream: trio.SocketStream, _: bytes) -> None:
        await stream.send_all(accept_response(request))
        proto = server_frames()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                proto.receive_bytes(chunk)
        frames.extend((f.opcode.name, f.payload) for f in proto.received_frames())

    gw = await in_front_of(nursery, record)
    client = await RawClient.connect(gw.addresses[0][1])
    stream = client.stream
    assert isinstance(stream, trio.SocketStream)
    await stream.send_eof()
    try:
        with trio.fail_after(5):
            while await stream.receive_some(65536):  # a reset would raise here
                pass
    finally:
        await stream.aclose()
    await wait_until(lambda: bool(frames))
    assert frames == [("CLOSE", (1001, "client connection lost without a close frame"))]
