"""The soak test: ``make soak`` / ``python -m benchmarks.soak --duration 300``.

A real ``wsgate serve`` process (its own process, measured through /proc) runs
for a set time under mixed load generated from this process:

* churning sessions (connect, talk, end) from many concurrent workers, and a few
  resident sessions that stay connected the whole time;
* small and large messages, text and binary, fragmented messages, pings, and
  large messages that the backend originates;
* every way a session can end: the client closes, the backend closes, either
  side resets its TCP connection, either side breaks the framing rules;
* a flood (``--flood``, 1 GiB by default): the backend sends that much to a
  client that reads nothing for a while, then everything is read and checked.

Every message carries its session and sequence number; the backend checks the
order of what the client sent, the client checks every echo byte for byte and
in order. The run fails (exit status 1) on any lost, reordered or corrupted
message, any gateway log line at warning level or above, any disconnect the
scenario did not cause (the gateway's ``disconnect`` records are tallied
against what the sessions did), or growth of the gateway's RSS, descriptors
or Trio tasks between the idle gateway before the load and after it.
A one-page summary is printed either way.

The building blocks (a lean raw WebSocket client, the echo-and-command backend,
/proc accounting, a gateway child process) are also used by the test suite
(``tests/test_faults.py``, ``tests/test_churn.py``, ``tests/test_secrets.py``).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import signal
import socket
import ssl
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from wsproto.utilities import generate_accept_token

from wsgate.frames import xor_mask

# -- frames ------------------------------------------------------------------------------

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

#: One fixed key: it is a nonce, not a secret, and a fixed one saves hashing per connect.
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = generate_accept_token(KEY.encode()).decode()


def build_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, masked: bool) -> bytes:
    """One frame; ``masked`` for frames a client sends (a fresh random key each time)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if masked else 0
    if n < 126:
        header = bytes((b0, mbit | n))
    elif n < 65536:
        header = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return header + payload
    key = os.urandom(4)
    return header + key + xor_mask(payload, key)


def close_payload(code: int | None, reason: str = "") -> bytes:
    return b"" if code is None else code.to_bytes(2, "big") + reason.encode()


@dataclass(slots=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes


class FrameParser:
    """Incremental frame parser; ``masked`` says what the peer must send."""

    def __init__(self, *, masked: bool) -> None:
        self.masked = masked
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if bool(b1 & 0x80) != self.masked:
                raise ValueError(f"frame mask bit is {bool(b1 & 0x80)}, expected {self.masked}")
            length = b1 & 0x7F
            head = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = pos + 10
            key = b""
            if self.masked:
                key = bytes(buf[head : head + 4])
                head += 4
            end = head + length
            if end > n:
                break
            payload = bytes(buf[head:end])
            if self.masked:
                payload = xor_mask(payload, key)
            frames.append(Frame(bool(b0 & 0x80), b0 & 0x0F, payload))
            pos = end
        if pos:
            del buf[:pos]
        return frames


# -- connections -------------------------------------------------------------------------

PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(slots=True)
class Event:
    """What :meth:`Conn.next_event` returns: a whole message, a control frame, or the end."""

    kind: str  # "message", "ping", "pong", "close", "eof"
    opcode: int = 0
    payload: bytes = b""
    frames: int = 0  # frames the message came in
    code: int | None = None  # close code
    reason: str = ""


class Conn:
    """One side of a WebSocket connection over a trio stream, message by message."""

    def __init__(self, stream: trio.abc.Stream, *, client: bool, pending: bytes = b"") -> None:
        self.stream = stream
        self.client = client
        self.parser = FrameParser(masked=not client)
        self.frames: collections.deque[Frame] = collections.deque(self.parser.feed(pending))
        self.bytes_in = len(pending)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_frame(self, opcode: int, payload: bytes = b"", *, fin: bool = True) -> None:
        await self.stream.send_all(build_frame(opcode, payload, fin=fin, masked=self.client))

    def message_frames(self, opcode: int, payload: bytes, fragments: int = 1) -> bytes:
        """The frames of one message split into ``fragments`` (bytes ready to send)."""
        fragments = max(1, fragments)
        step = -(-len(payload) // fragments) or 1
        bounds = [min(i * step, len(payload)) for i in range(fragments)] + [len(payload)]
        out = bytearray()
        for i in range(fragments):
            out += build_frame(
                opcode if i == 0 else CONT,
                payload[bounds[i] : bounds[i + 1]],
                fin=i == fragments - 1,
                masked=self.client,
            )
        return bytes(out)

    async def close(self, code: int | None = 1000, reason: str = "") -> None:
        await self.send_frame(CLOSE, close_payload(code, reason))

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(256 * 1024)
        if not data:
            return False
        self.bytes_in += len(data)
        self.frames.extend(self.parser.feed(data))
        return True

    async def next_frame(self) -> Frame | None:
        """The next frame; None at end of stream (or on a reset)."""
        while not self.frames:
            try:
                if not await self._fill():
                    return None
            except PEER_GONE:
                return None
        return self.frames.popleft()

    async def next_event(self) -> Event:
        """The next whole data message (fragments joined), control frame, or the end."""
        parts: list[bytes] = []
        opcode = 0
        while True:
            frame = await self.next_frame()
            if frame is None:
                return Event("eof")
            if frame.opcode == CLOSE:
                code = int.from_bytes(frame.payload[:2], "big") if len(frame.payload) >= 2 else None
                return Event("close", CLOSE, frame.payload, 1, code, frame.payload[2:].decode())
            if frame.opcode == PING:
                return Event("ping", PING, frame.payload, 1)
            if frame.opcode == PONG:
                return Event("pong", PONG, frame.payload, 1)
            if frame.opcode != CONT:
                if parts:
                    raise ValueError("new message before the previous one finished")
                opcode = frame.opcode
            elif not parts:
                raise ValueError("continuation frame without a message")
            parts.append(frame.payload)
            if frame.fin:
                return Event("message", opcode, b"".join(parts), len(parts))

    async def read_to_eof(self, timeout: float) -> bool:
        """Drop whatever arrives until end of stream; False if it did not end in time."""
        with trio.move_on_after(timeout):
            while True:
                try:
                    if not await self._fill():
                        return True
                except PEER_GONE:
                    return True
                self.frames.clear()
        return False

    def abort(self) -> None:
        """Reset the TCP connection (SO_LINGER 0)."""
        reset(self.stream)

    async def aclose(self) -> None:
        await self.stream.aclose()


def reset(stream: trio.abc.Stream) -> None:
    """Close ``stream`` at once with a TCP reset (under TLS too: no close_notify)."""
    sock = socket_of(stream)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType:
    """The TCP socket under ``stream`` (a SocketStream, or an SSLStream over one)."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream)
    return stream.socket


#: Set by ``soak --tls``: sessions then connect with wss://, trusting this context.
CLIENT_TLS: ssl.SSLContext | None = None


def upgrade_request(
    target: str, headers: Sequence[tuple[str, str]] = (), host: str = "soak.test"
) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Handshake:
    status: int
    head: bytes  # the response head (status line and headers)
    body: bytes  # a refusal's body (empty for 101)
    conn: Conn | None  # the open connection after a 101


async def read_head(stream: trio.abc.Stream, limit: int = 65536) -> tuple[bytes, bytes]:
    """An HTTP head (up to the blank line) and the bytes read after it."""
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError(f"connection ended before a complete HTTP head: {bytes(data)!r}")
        data += chunk
        if len(data) > limit:
            raise ValueError("HTTP head too large")
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    return head, rest


async def connect(
    port: int,
    target: str = "/echo",
    headers: Sequence[tuple[str, str]] = (),
    *,
    request: bytes | None = None,
    host: str = "127.0.0.1",
) -> Handshake:
    """Open a WebSocket through the gateway; a refusal's body is read to its end."""
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if CLIENT_TLS is not None:
        stream = trio.SSLStream(stream, CLIENT_TLS, server_hostname=host)
    try:
        await stream.send_all(request or upgrade_request(target, headers))
        head, rest = await read_head(stream)
        status = int(head.split(b" ", 2)[1])
        if status == 101:
            accept = [
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")[1:]
                if line.lower().startswith(b"sec-websocket-accept:")
            ]
            if accept != [ACCEPT.encode()]:
                raise ValueError(f"bad Sec-WebSocket-Accept in {head!r}")
            return Handshake(101, head, b"", Conn(stream, client=True, pending=rest))
        body = bytearray(rest)
        with trio.move_on_after(5):
            try:
                while chunk := await stream.receive_some(65536):
                    body += chunk
            except PEER_GONE:
                pass
        await stream.aclose()
        return Handshake(status, head, bytes(body), None)
    except BaseException:
        reset(stream)
        raise


# -- /proc accounting --------------------------------------------------------------------


def rss_kib(pid: int | None = None) -> int:
    """VmRSS of ``pid`` (this process by default), in KiB."""
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fd_count(pid: int | None = None) -> int:
    """Open file descriptors of ``pid`` (this process by default)."""
    return len(os.listdir(f"/proc/{pid or 'self'}/fd"))


def raise_nofile(want: int | None = None) -> int:
    """Raise this process's soft RLIMIT_NOFILE (to ``want`` or the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else min(max(soft, want), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def count_tasks() -> int:
    """Every task of the current trio run (a walk of the task tree from the root)."""
    seen = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        seen += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return seen


# -- the backend ---------------------------------------------------------------------------


@dataclass
class BackendStats:
    connections: int = 0
    messages: int = 0
    bytes: int = 0
    #: Close codes the backend received, by code (None: a close frame without one).
    closes: collections.Counter[int | None] = field(default_factory=collections.Counter)
    #: Connections that ended without a close frame (EOF or reset).
    vanished: int = 0
    #: Close codes received per session id (the first path segment after the API).
    by_session: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def payload_for(session: str, seq: int, size: int, fill: bytes = b".") -> bytes:
    """A message that names its session and sequence number, padded to ``size`` bytes."""
    prefix = f"{session} {seq} ".encode()
    return prefix + fill * max(0, size - len(prefix))


class Backend:
    """An echo backend with commands, on raw sockets.

    Data frames are echoed as they came (so fragments come back as fragments);
    pings get pongs; a close frame is answered and the connection closed. A
    text message starting with ``!`` is a command instead: ``!close CODE``,
    ``!abort`` (TCP reset), ``!garbage`` (a masked frame: a protocol error),
    ``!big SEQ SIZE`` (a binary message of SIZE bytes, see :func:`payload_for`),
    ``!flood COUNT SIZE`` (COUNT binary frames of SIZE bytes, as fast as it can).
    The first path segment of the request target names the session: the
    backend checks each session's sequence numbers arrive in order.
    """

    def __init__(self) -> None:
        self.stats = BackendStats()
        self.port = 0
        self.flood_sent = 0  # bytes of flood frames sent so far (all connections)
        self.open = 0

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.open += 1
        try:
            await self._session(stream)
        except PEER_GONE:
            pass
        except Exception as exc:  # a bug here must fail the run, not stop the server
            self.stats.problems.append(f"backend failed: {exc!r}")
        finally:
            self.open -= 1
            if stream.socket.fileno() != -1:
                await trio.aclose_forcefully(stream)

    async def _session(self, stream: trio.SocketStream) -> None:
        stats = self.stats
        head, rest = await read_head(stream)
        lines = head.decode("latin-1").split("\r\n")
        target = lines[0].split(" ")[1]
        key = next(
            (
                v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:])
                if k.strip().lower() == "sec-websocket-key"
            ),
            "",
        )
        session = target.lstrip("/").split("/")[0].split("?")[0]
        accept = generate_accept_token(key.encode()).decode()
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
        )
        stats.connections += 1
        conn = Conn(stream, client=False, pending=rest)
        expected_seq = 0
        message: list[bytes] = []
        while True:
            try:
                frame = await conn.next_frame()
            except ValueError as exc:
                stats.problems.append(f"session {session}: backend got a bad frame: {exc}")
                conn.abort()
                return
            if frame is None:
                stats.vanished += 1
                stats.by_session.setdefault(session, -1)
                return
            op = frame.opcode
            if op == CLOSE:
                code = int.from_bytes(frame.payload[:2], "big") if len(frame.payload) >= 2 else None
                stats.closes[code] += 1
                stats.by_session[session] = code
                try:
                    await conn.send_frame(CLOSE, frame.payload[:2])
                except PEER_GONE:
                    pass
                await conn.read_to_eof(5)
                return
            if op == PING:
                await conn.send_frame(PONG, frame.payload)
                continue
            if op == PONG:
                continue
            if op == TEXT and frame.fin and frame.payload.startswith(b"!") and not message:
                words = frame.payload.decode().split()
                if words[0] == "!big":  # the client numbered it as one of its own messages
                    expected_seq = int(words[1]) + 1
                if await self._command(conn, session, words):
                    return
                continue
            stats.bytes += len(frame.payload)
            message.append(frame.payload)
            await conn.send_frame(op, frame.payload, fin=frame.fin)
            if frame.fin:
                whole = b"".join(message)
                message = []
                stats.messages += 1
                parts = whole[:64].split(b" ", 2)
                if len(parts) >= 2 and parts[0].decode(errors="replace") == session:
                    seq = int(parts[1])
                    if seq != expected_seq:
                        stats.problems.append(
                            f"session {session}: backend got seq {seq}, expected {expected_seq}"
                        )
                    expected_seq = seq + 1

    async def _await_close(self, conn: Conn, session: str, *, reply: bool) -> None:
        """Wait for the peer's close frame (recorded), answer it if ``reply``, await EOF."""
        event = await conn.next_event()
        while event.kind not in ("close", "eof"):
            event = await conn.next_event()
        self.stats.by_session[session] = event.code if event.kind == "close" else -1
        if event.kind == "close":
            self.stats.closes[event.code] += 1
            if reply:
                try:
                    await conn.send_frame(CLOSE, event.payload[:2])
                except PEER_GONE:
                    pass
        await conn.read_to_eof(5)

    async def _command(self, conn: Conn, session: str, words: list[str]) -> bool:
        """Run a command; True when the connection is over."""
        cmd = words[0]
        if cmd == "!close":
            await conn.close(int(words[1]), "backend closes")
            await self._await_close(conn, session, reply=False)
            return True
        if cmd == "!abort":
            conn.abort()
            return True
        if cmd == "!garbage":
            await conn.send(build_frame(TEXT, b"masked from a backend", masked=True))
            await self._await_close(conn, session, reply=True)
            return True
        if cmd == "!big":
            seq, size = int(words[1]), int(words[2])
            await conn.send_frame(BINARY, payload_for(session, seq, size, b"B"))
            return False
        if cmd == "!flood":
            count, size = int(words[1]), int(words[2])
            frame = build_frame(BINARY, b"F" * size, masked=False)
            for _ in range(count):
                await conn.send(frame)
                self.flood_sent += len(frame)
            return False
        self.stats.problems.append(f"session {session}: unknown command {words!r}")
        return False


#: The repository root: the gateway process runs there so that ``-m benchmarks.soak`` works.
REPO = str(Path(__file__).resolve().parent.parent)

# -- the gateway process -------------------------------------------------------------------


class GatewayProcess:
    """A ``wsgate serve`` child process whose output is read (and kept) as it comes.

    ``probe=True`` runs it through ``python -m benchmarks.soak gateway``, which is
    ``wsgate serve`` plus a Trio instrument that reports the live task count on
    stderr once a second (``SOAKPROBE {"tasks": N}``).
    """

    def __init__(
        self,
        config_text: str,
        *,
        probe: bool = False,
        keep_lines: int | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.config_text = config_text
        self.probe = probe
        self.keep_lines = keep_lines  # None: keep every stdout line
        self.preexec = preexec
        self.lines: list[str] = []  # stdout (JSON log lines), kept
        self.stderr = bytearray()
        self.records: collections.Counter[str] = collections.Counter()  # events seen
        self.ends: collections.Counter[str] = collections.Counter()  # disconnect "end"s
        self.handshake_codes: collections.Counter[int] = collections.Counter()
        self.alarms: list[str] = []  # lines at warning level or above
        self.tasks = -1
        self.port = 0
        self.admin_port = 0
        self.process: trio.Process | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="wsgate-soak-")
        self._started = trio.Event()
        self._exited = trio.Event()
        self._lock_nursery: trio.Nursery | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, nursery: trio.Nursery, timeout: float = 20.0) -> GatewayProcess:
        config = Path(self._dir.name) / "gateway.toml"
        config.write_text(self.config_text)
        args = (
            [sys.executable, "-m", "benchmarks.soak", "gateway", str(config)]
            if self.probe
            else [sys.executable, "-m", "wsgate", "serve", "--config", str(config)]
        )
        self.process = await trio.lowlevel.open_process(
            args,
            stdout=-1,
            stderr=-1,
            preexec_fn=self.preexec,
            cwd=REPO,
        )
        nursery.start_soon(self._read_stdout)
        nursery.start_soon(self._read_stderr)
        with trio.move_on_after(timeout):
            await self._started.wait()
        if not self._started.is_set():
            await self.kill()
            raise RuntimeError(
                f"the gateway did not start: {self.stderr.decode(errors='replace')[-3000:]}"
            )
        return self

    async def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        buffered = b""
        while True:
            try:
                chunk = await self.process.stdout.receive_some(1 << 16)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                chunk = b""
            if not chunk:
                self._exited.set()
                return
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for raw in lines:
                self._line(raw.decode(errors="replace"))

    def _line(self, line: str) -> None:
        if self.keep_lines is None or len(self.lines) < self.keep_lines:
            self.lines.append(line)
        try:
            record = json.loads(line)
        except ValueError:
            self.alarms.append(f"not a JSON line: {line[:300]}")
            return
        event = record.get("event", "")
        self.records[event] += 1
        if record.get("level") not in ("info", "debug", None):
            self.alarms.append(line[:1000])
        if event == "disconnect":
            self.ends[record.get("end", "?")] += 1
        elif event == "handshake":
            self.handshake_codes[record.get("response_code")] += 1
        elif event == "gateway_started":
            self.port = int(record["addresses"][0].rsplit(":", 1)[1])
            self._started.set()
        elif event == "admin_started":
            self.admin_port = int(record["url"].rsplit(":", 1)[1])

    async def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        buffered = b""
        while True:
            try:
                chunk = await self.process.stderr.receive_some(1 << 16)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            if not chunk:
                return
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for raw in lines:
                if raw.startswith(b"SOAKPROBE "):
                    self.tasks = json.loads(raw[10:])["tasks"]
                elif len(self.stderr) < 1 << 20:
                    self.stderr += raw + b"\n"

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def fds(self) -> int:
        return fd_count(self.pid)

    async def fresh_tasks(self) -> int:
        """The task count from a probe report made after this call (probe=True only)."""
        self.tasks = -1
        with trio.fail_after(5):
            while self.tasks < 0:  # noqa: ASYNC110 - the reader task sets it
                await trio.sleep(0.05)
        return self.tasks

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        with trio.move_on_after(5):
            await self._exited.wait()
        return code

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def aclose(self) -> None:
        await self.kill()
        for pipe in (self.process.stdout, self.process.stderr) if self.process else ():
            if pipe is not None:
                await pipe.aclose()
        self._dir.cleanup()


def gateway_config(
    apis: dict[str, str], *, api: dict[str, Any] | None = None, **gateway: Any
) -> str:
    """A TOML config on 127.0.0.1:0: ``apis`` maps names (= paths) to service URLs.

    ``api`` settings go into every API table, ``gateway`` ones into ``[gateway]``.
    """
    lines = ["[gateway]", 'listen = "127.0.0.1:0"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in gateway.items()]
    for name, url in apis.items():
        lines += ["", "[[apis]]", f'name = "{name}"', f'path = "{name}"', f'service_url = "{url}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in (api or {}).items()]
    return "\n".join(lines) + "\n"


class _TaskProbe(trio.abc.Instrument):
    """Counts live tasks; a thread reports the count on stderr twice a second."""

    def __init__(self) -> None:
        self.tasks = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.tasks += 1

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.tasks -= 1

    def report_forever(self) -> None:
        while True:
            os.write(2, b'SOAKPROBE {"tasks": %d}\n' % self.tasks)
            time.sleep(0.5)


def _serve_with_probe(config: str) -> int:
    """``wsgate serve --config CONFIG`` with a task-count instrument in its trio run."""
    import functools
    import threading

    import wsgate.cli

    probe = _TaskProbe()
    threading.Thread(target=probe.report_forever, daemon=True).start()
    trio.run = functools.partial(trio.run, instruments=[probe])  # type: ignore[assignment]
    return wsgate.cli.main(["serve", "--config", config])


# -- the load ------------------------------------------------------------------------------

#: How sessions end, and the gateway's disconnect ``end`` each must produce.
ENDINGS = {
    "client_close": "client_closed",
    "backend_close": "backend_closed",
    "client_abort": "client_vanished",
    "client_abort_midstream": "client_vanished",
    "backend_abort": "backend_vanished",
    "client_garbage": "client_protocol_error",
    "backend_garbage": "backend_protocol_error",
}
ENDING_WEIGHTS = {
    "client_close": 50,
    "backend_close": 15,
    "client_abort": 10,
    "client_abort_midstream": 5,
    "backend_abort": 10,
    "client_garbage": 5,
    "backend_garbage": 5,
}


@dataclass
class Load:
    """What the load generator did and saw."""

    sessions: int = 0
    refused: collections.Counter[int] = field(default_factory=collections.Counter)
    endings: collections.Counter[str] = field(default_factory=collections.Counter)
    messages_sent: int = 0
    messages_checked: int = 0
    fragmented: int = 0
    pings: int = 0
    big_from_backend: int = 0
    bytes_sent: int = 0
    bytes_checked: int = 0
    latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    aborted_sessions: list[str] = field(default_factory=list)  # expect 1001 at the backend

    def problem(self, text: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(text)


def _message(
    rng: random.Random, session: str, seq: int, large: float
) -> tuple[str, int, bytes, int]:
    """(kind, opcode, payload, fragments) of one random message."""
    roll = rng.random()
    if roll < large:
        size = rng.randint(64 * 1024, 1024 * 1024)
        return "large", BINARY, payload_for(session, seq, size, os.urandom(1)), 1
    if roll < 0.45:
        return "small", TEXT, payload_for(session, seq, rng.randint(0, 120), b"t"), 1
    if roll < 0.75:
        return "medium", BINARY, payload_for(session, seq, rng.randint(126, 16384), b"\x00"), 1
    size = rng.randint(20, 40000)
    return (
        "fragmented",
        rng.choice([TEXT, BINARY]),
        payload_for(session, seq, size, b"f"),
        rng.randint(2, 6),
    )


async def run_session(
    port: int,
    session: str,
    rng: random.Random,
    load: Load,
    *,
    messages: int,
    ending: str,
    large: float = 0.02,
    api: str = "echo",
    timeout: float = 30.0,
) -> None:
    """One session: connect, exchange ``messages`` checked messages, end as ``ending``."""
    with trio.move_on_after(timeout) as scope:
        await _session(port, session, rng, load, messages, ending, large, api)
    if scope.cancelled_caught:
        load.problem(f"session {session} ({ending}) did not finish within {timeout}s")


async def _session(
    port: int,
    session: str,
    rng: random.Random,
    load: Load,
    messages: int,
    ending: str,
    large: float,
    api: str,
) -> None:
    shake = await connect(port, f"/{api}/{session}")
    if shake.conn is None:
        load.refused[shake.status] += 1
        load.problem(f"session {session}: handshake answered {shake.status}: {shake.body[:200]!r}")
        return
    load.sessions += 1
    conn = shake.conn
    try:
        expected: collections.deque[tuple[str, bytes]] = collections.deque()
        seq = 0
        sent = 0
        while sent < messages:
            batch = rng.randint(1, 4)
            started = time.monotonic()
            out = bytearray()
            for _ in range(min(batch, messages - sent)):
                roll = rng.random()
                if roll < 0.05:
                    data = os.urandom(rng.randint(0, 125))
                    out += build_frame(PING, data, masked=True)
                    expected.append(("pong", data))
                    load.pings += 1
                elif roll < 0.08:
                    size = rng.randint(100_000, 2_000_000)
                    out += build_frame(TEXT, f"!big {seq} {size}".encode(), masked=True)
                    expected.append(("message", payload_for(session, seq, size, b"B")))
                    seq += 1
                    load.big_from_backend += 1
                else:
                    kind, opcode, payload, fragments = _message(rng, session, seq, large)
                    seq += 1
                    out += conn.message_frames(opcode, payload, fragments)
                    expected.append(("message", payload))
                    load.fragmented += kind == "fragmented"
                    load.bytes_sent += len(payload)
                load.messages_sent += 1
                sent += 1
            # Send while reading the echoes: a batch may be larger than the socket buffers.
            wrong: str | None = None
            async with trio.open_nursery() as sending:
                sending.start_soon(_send_quietly, conn, bytes(out))
                while expected:
                    kind, want = expected.popleft()
                    try:
                        event = await conn.next_event()
                    except ValueError as exc:
                        event = Event(f"invalid stream: {exc}")
                    if event.kind != kind or event.payload != want:
                        wrong = (
                            f"session {session}: expected {kind} {want[:40]!r} ({len(want)} "
                            f"bytes), got {event.kind} {event.code or ''} {event.payload[:40]!r} "
                            f"({len(event.payload)} bytes)"
                        )
                        sending.cancel_scope.cancel()
                        break
                    load.messages_checked += 1
                    load.bytes_checked += len(want)
            if wrong is not None:
                load.problem(wrong)
                return
            load.latencies.append(time.monotonic() - started)
        await _end(conn, session, ending, load)
    except PEER_GONE as exc:
        load.problem(f"session {session}: connection lost: {exc!r}")
    except ValueError as exc:
        load.problem(f"session {session}: {exc}")
    finally:
        if socket_of(conn.stream).fileno() != -1:
            conn.abort()


async def _send_quietly(conn: Conn, data: bytes) -> None:
    try:
        await conn.send(data)
    except PEER_GONE:
        pass  # the reader sees the end of the stream


async def _expect_close(conn: Conn, session: str, code: int, load: Load, *, reply: bool) -> bool:
    event = await conn.next_event()
    while event.kind in ("ping", "pong"):
        event = await conn.next_event()
    if event.kind != "close" or event.code != code:
        load.problem(f"session {session}: expected close {code}, got {event.kind} {event.code}")
        return False
    if reply:
        try:
            await conn.close(code)
        except PEER_GONE:
            pass
    if not await conn.read_to_eof(10):
        load.problem(f"session {session}: the gateway did not close the TCP connection")
        return False
    return True


async def _end(conn: Conn, session: str, ending: str, load: Load) -> None:
    ok = True
    if ending == "client_close":
        await conn.close(1000, "bye")
        ok = await _expect_close(conn, session, 1000, load, reply=False)
    elif ending == "backend_close":
        await conn.send_frame(TEXT, b"!close 4000")
        ok = await _expect_close(conn, session, 4000, load, reply=True)
    elif ending == "client_abort":
        load.aborted_sessions.append(session)
        conn.abort()
    elif ending == "client_abort_midstream":
        # Messages in flight both ways, and a large one perhaps cut in the middle.
        await conn.send(
            conn.message_frames(BINARY, payload_for("in-flight", 0, 300_000), 3)
            + conn.message_frames(TEXT, b"!big 1000001 500000")
        )
        conn.abort()
    elif ending == "backend_abort":
        await conn.send_frame(TEXT, b"!abort")
        ok = await _expect_close(conn, session, 1011, load, reply=True)
    elif ending == "client_garbage":
        await conn.send(build_frame(TEXT, b"unmasked from a client", masked=False))
        ok = await _expect_close(conn, session, 1002, load, reply=True)
    elif ending == "backend_garbage":
        await conn.send_frame(TEXT, b"!garbage")
        ok = await _expect_close(conn, session, 1002, load, reply=True)
    if ok:
        load.endings[ending] += 1


async def flood_check(
    port: int, backend: Backend, total: int, load: Load, stall: float
) -> dict[str, Any]:
    """A client that reads nothing while the backend sends ``total`` bytes; then reads it all.

    The bytes are counted raw, not parsed (parsing 1 GiB in Python takes longer
    than relaying it): every frame is the same 64 KiB of ``F`` with a 10-byte
    header holding no ``F``, so the counts of ``F`` and of other bytes check it.
    """
    size = 1 << 16
    count = max(1, total // size)
    frame = build_frame(BINARY, b"F" * size, masked=False)
    shake = await connect(port, "/echo/flood")
    assert shake.conn is not None, shake.status
    conn = shake.conn
    before = backend.flood_sent
    await conn.send_frame(TEXT, f"!flood {count} {size}".encode())
    await trio.sleep(stall)
    stalled_at = backend.flood_sent - before
    want = count * len(frame)
    got = fs = 0
    head = b""
    started = time.monotonic()
    while got < want:
        chunk = await conn.stream.receive_some(min(1 << 20, want - got))
        if not chunk:
            load.problem(f"flood: stream ended after {got} of {want} bytes")
            break
        if len(head) < len(frame):
            head += chunk[: len(frame) - len(head)]
        got += len(chunk)
        fs += chunk.count(b"F")
    elapsed = time.monotonic() - started
    if got != want or fs != count * size:
        load.problem(f"flood: read {got} bytes ({fs} payload), expected {want} ({count * size})")
    if head != frame:
        load.problem("flood: the first frame is not the one the backend sent")
    await conn.close(1000)
    await _expect_close(conn, "flood", 1000, load, reply=False)
    return {"stalled_at": stalled_at, "bytes": got, "read_seconds": elapsed}


# -- the soak run -------------------------------------------------------------------------

#: Sessions run before the idle measurement (they end with client closes).
WARM_UP_SESSIONS = 3


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    tasks: int


@dataclass
class Run:
    """Everything a soak run measured, for the verdict and the summary."""

    args: argparse.Namespace
    load: Load
    backend: Backend
    gw: GatewayProcess
    idle: Sample
    end: Sample
    samples: list[Sample]
    seconds: float
    flood: dict[str, Any]
    exit_status: int | None


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def soak(args: argparse.Namespace) -> int:
    """Run the soak; print the summary; 0 if it passed."""
    global CLIENT_TLS
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="wsgate-soak-tls-") as tls_dir:
        async with trio.open_nursery() as nursery:
            backend: Backend = await nursery.start(Backend().serve)
            config = gateway_config(
                {"echo": backend.url},
                # 2 MiB messages from the backend (!big); 64 KiB flood frames.
                api={"max_message_size": 4 << 20},
                max_connections=args.concurrency * 4 + 50,
                close_timeout=5,
                drain_timeout=10,
                relay_engine=args.engine,
            )
            if args.tls:
                config, CLIENT_TLS = _with_tls(config, Path(tls_dir))
            gw = GatewayProcess(config, probe=True, keep_lines=2000)
            await gw.start(nursery)
            try:
                run = await _load(args, backend, gw)
            finally:
                await gw.aclose()
                nursery.cancel_scope.cancel()
    failures = _verdict(run)
    print("\n".join(_summary(run, failures)), flush=True)
    return 1 if failures else 0


def _with_tls(config: str, directory: Path) -> tuple[str, ssl.SSLContext]:
    """``config`` with a ``[gateway.tls]`` table, and a client context that trusts it."""
    settings, client, _ = tls_certificate(directory)
    table = "\n[gateway.tls]\n" + "".join(f'{k} = "{v}"\n' for k, v in settings.items())
    return config + table, client


def tls_certificate(directory: Path) -> tuple[dict[str, str], ssl.SSLContext, Any]:
    """A fresh trustme certificate for 127.0.0.1 written to ``directory``.

    Returns the ``[gateway.tls]`` settings, a client context trusting the
    certificate, and its ``trustme.CA``.
    """
    import trustme  # a test dependency: only --tls and the tests need it

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key = directory / "chain.pem", directory / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return {"certificate": str(chain), "private_key": str(key)}, client, ca


def _sample(gw: GatewayProcess, started: float, tasks: int | None = None) -> Sample:
    return Sample(
        time.monotonic() - started, gw.rss_kib(), gw.fds(), gw.tasks if tasks is None else tasks
    )


async def _load(args: argparse.Namespace, backend: Backend, gw: GatewayProcess) -> Run:
    rng = random.Random(args.seed)
    load = Load()
    await _warm_up(gw.port, rng, load)
    await trio.sleep(1.0)
    started = time.monotonic()
    idle = _sample(gw, started, await gw.fresh_tasks())
    deadline = started + args.duration
    samples: list[Sample] = []
    flood: dict[str, Any] = {}

    async def sampler() -> None:
        while True:
            samples.append(_sample(gw, started))
            await trio.sleep(1.0)

    async def worker(w: int) -> None:
        wrng = random.Random(rng.random())
        n = 0
        names, weights = list(ENDING_WEIGHTS), list(ENDING_WEIGHTS.values())
        while time.monotonic() < deadline:
            ending = wrng.choices(names, weights)[0]
            messages = wrng.randint(0, 12)
            await run_session(gw.port, f"w{w}s{n}", wrng, load, messages=messages, ending=ending)
            n += 1

    async def resident(r: int) -> None:
        wrng = random.Random(rng.random())
        shake = await connect(gw.port, f"/echo/resident{r}")
        if shake.conn is None:
            load.problem(f"resident {r}: handshake answered {shake.status}")
            return
        conn = shake.conn
        seq = 0
        while time.monotonic() < deadline:
            payload = payload_for(f"resident{r}", seq, wrng.randint(10, 2000))
            await conn.send(conn.message_frames(BINARY, payload, wrng.choice([1, 1, 3])))
            event = await conn.next_event()
            if event.kind != "message" or event.payload != payload:
                load.problem(f"resident {r}: echo {seq} wrong: {event.kind}")
                conn.abort()
                return
            load.messages_checked += 1
            seq += 1
            await trio.sleep(wrng.uniform(0.05, 0.5))
        await _end(conn, f"resident{r}", "client_close", load)
        conn.abort()

    async def flooder() -> None:
        # The flood runs while the churn goes on around it.
        await trio.sleep(min(10.0, args.duration / 4))
        base = gw.rss_kib()
        peak = base

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, gw.rss_kib())
                await trio.sleep(0.1)

        async with trio.open_nursery() as watching:
            watching.start_soon(watch)
            flood.update(await flood_check(gw.port, backend, args.flood, load, stall=3.0))
            watching.cancel_scope.cancel()
        flood.update(rss_before_kib=base, rss_peak_kib=peak)

    async with trio.open_nursery() as sampling:
        sampling.start_soon(sampler)
        async with trio.open_nursery() as workers:
            for r in range(args.residents):
                workers.start_soon(resident, r)
            for w in range(args.concurrency):
                workers.start_soon(worker, w)
            if args.flood:
                workers.start_soon(flooder)
        sampling.cancel_scope.cancel()
    seconds = time.monotonic() - started
    # Idle again: everything the load opened must be gone.
    with trio.move_on_after(15):
        while backend.open or gw.fds() > idle.fds:  # noqa: ASYNC110 - state in another process
            await trio.sleep(0.2)
    await trio.sleep(1.0)
    end = _sample(gw, started, await gw.fresh_tasks())
    gw.signal(signal.SIGTERM)
    status: int | None = None
    with trio.move_on_after(20):
        status = await gw.wait()
    return Run(args, load, backend, gw, idle, end, samples, seconds, flood, status)


def _verdict(run: Run) -> list[str]:
    """Every way the run failed (an empty list: it passed)."""
    args, load, gw = run.args, run.load, run.gw
    failures = [*load.problems, *run.backend.stats.problems]
    failures += [f"gateway log: {line}" for line in gw.alarms[:50]]
    expected: collections.Counter[str] = collections.Counter()
    for ending, count in load.endings.items():
        expected[ENDINGS[ending]] += count
    expected["client_closed"] += WARM_UP_SESSIONS + bool(run.flood)
    if gw.ends != expected:
        failures.append(
            f"disconnects: the gateway logged {dict(gw.ends)}, the load caused {dict(expected)}"
        )
    refused = {code: n for code, n in gw.handshake_codes.items() if code != 101}
    if refused:
        failures.append(f"handshakes refused: {refused}")
    by_session = run.backend.stats.by_session
    missed = [s for s in load.aborted_sessions if by_session.get(s) != 1001]
    if missed:
        failures.append(f"client resets: {len(missed)} backends did not get 1001: {missed[:5]}")
    if run.end.fds != run.idle.fds:
        failures.append(f"descriptors: {run.idle.fds} idle before the load, {run.end.fds} after")
    if run.end.tasks != run.idle.tasks:
        failures.append(f"tasks: {run.idle.tasks} idle before the load, {run.end.tasks} after")
    growth = (run.end.rss_kib - _warm(run).rss_kib) / 1024
    if growth > args.max_rss_growth_mib:
        failures.append(
            f"RSS grew {growth:.1f} MiB after warm-up (limit {args.max_rss_growth_mib})"
        )
    if run.flood:
        flood_growth = (run.flood["rss_peak_kib"] - run.flood["rss_before_kib"]) / 1024
        if flood_growth > args.max_flood_rss_mib:
            failures.append(
                f"flood: gateway RSS grew {flood_growth:.1f} MiB (limit {args.max_flood_rss_mib})"
            )
    if run.exit_status is None:
        failures.append("the gateway did not exit within 20 s of SIGTERM")
    elif run.exit_status != 0:
        failures.append(f"the gateway exited {run.exit_status} after SIGTERM")
    return failures


def _warm(run: Run) -> Sample:
    """The first sample after warm-up (20% of the run, at most 30 s)."""
    after = min(30.0, run.args.duration * 0.2)
    return next((s for s in run.samples if s.t >= after), run.idle)


def _summary(run: Run, failures: list[str]) -> list[str]:
    args, load, gw, stats = run.args, run.load, run.gw, run.backend.stats
    lat = [t * 1000 for t in load.latencies]
    warm, mib = _warm(run), 1 / 1024
    peak = max([s.rss_kib for s in run.samples] or [run.end.rss_kib])
    lines = [
        "wsgate soak summary",
        "=" * 72,
        f"load         {run.seconds:.0f} s (asked {args.duration:.0f} s), {args.concurrency} "
        f"churning workers, {args.residents} resident sessions, {args.engine} engine, "
        f"{'wss' if args.tls else 'ws'} front end, "
        f"seed {args.seed}",
        f"sessions     {load.sessions} opened; ended: "
        + ", ".join(f"{k} {v}" for k, v in sorted(load.endings.items())),
        f"messages     {load.messages_sent} sent, {load.messages_checked} checked in order "
        f"({load.fragmented} fragmented, {load.pings} pings, "
        f"{load.big_from_backend} large from the backend)",
        f"bytes        {load.bytes_sent / 2**20:.1f} MiB sent, "
        f"{load.bytes_checked / 2**20:.1f} MiB checked byte for byte",
        f"round trips  per batch: p50 {_percentile(lat, 50):.1f} ms, "
        f"p99 {_percentile(lat, 99):.1f} ms, max {max(lat or [0]):.1f} ms",
        f"backend      {stats.connections} connections, {stats.messages} messages, "
        f"close codes received {dict(stats.closes)}",
        "disconnects  " + ", ".join(f"{k} {v}" for k, v in sorted(gw.ends.items())),
        f"handshakes   {dict(gw.handshake_codes)}",
        f"gateway RSS  idle {run.idle.rss_kib * mib:.1f} MiB, after warm-up "
        f"{warm.rss_kib * mib:.1f}, peak {peak * mib:.1f}, end {run.end.rss_kib * mib:.1f} "
        f"(growth {(run.end.rss_kib - warm.rss_kib) * mib:+.1f}, "
        f"limit {args.max_rss_growth_mib})",
        f"gateway fds  idle {run.idle.fds}, peak {max([s.fds for s in run.samples] or [0])}, "
        f"end {run.end.fds}",
        f"tasks        idle {run.idle.tasks}, peak {max([s.tasks for s in run.samples] or [0])}, "
        f"end {run.end.tasks}",
    ]
    if run.flood:
        f = run.flood
        lines.append(
            f"flood        {f['bytes'] / 2**20:.0f} MiB to a client reading nothing for 3 s "
            f"(backend got {f['stalled_at'] / 2**20:.1f} MiB out meanwhile); gateway RSS "
            f"{f['rss_before_kib'] * mib:.1f} -> peak {f['rss_peak_kib'] * mib:.1f} MiB "
            f"(limit +{args.max_flood_rss_mib}); read back in {f['read_seconds']:.1f} s"
        )
    lines += [f"SIGTERM      exit status {run.exit_status}", "-" * 72]
    if failures:
        lines.append(f"FAIL: {len(failures)} problem(s)")
        lines += [f"  - {f}" for f in failures[:40]]
    else:
        lines.append("PASS: nothing lost, reordered or corrupted; no unexpected errors; no growth")
    return lines


async def _warm_up(port: int, rng: random.Random, load: Load) -> None:
    """A few sessions so that lazily created state exists before the idle measurement."""
    scratch = Load()
    for i in range(3):
        await run_session(port, f"warm{i}", rng, scratch, messages=5, ending="client_close")
    load.problems += scratch.problems


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gateway"]:
        return _serve_with_probe(argv[1])
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--duration", type=float, default=300.0, help="seconds of load (default 300)"
    )
    parser.add_argument("--concurrency", type=int, default=40, help="churning workers (default 40)")
    parser.add_argument("--residents", type=int, default=5, help="long-lived sessions (default 5)")
    parser.add_argument(
        "--flood", type=int, default=1 << 30, help="bytes of the flood (default 1 GiB; 0: no flood)"
    )
    parser.add_argument(
        "--engine", choices=["tasks", "reactor"], default="tasks", help="relay_engine to soak"
    )
    parser.add_argument(
        "--tls", action="store_true", help="a wss:// front end (certificate from trustme)"
    )
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument(
        "--max-rss-growth-mib", type=float, default=16.0, help="after warm-up (default 16)"
    )
    parser.add_argument(
        "--max-flood-rss-mib", type=float, default=64.0, help="during the flood (default 64)"
    )
    args = parser.parse_args(argv)
    return trio.run(soak, args)


if __name__ == "__main__":
    sys.exit(main())
