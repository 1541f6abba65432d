"""The load generator: worker processes, one event loop each (uvloop when installed), picows.

The orchestrator keeps a :class:`LoadGenerator` of N worker processes
(multiprocessing, ``spawn``) and sends each a command over a pipe. Every
command runs in two phases so that all workers start together and the
orchestrator can read CPU counters exactly at the edges of the measured window:

1. set-up (open connections, ...), then the worker answers ``("ready", info)``;
2. the orchestrator sends ``("go", timing)`` with absolute ``time.monotonic()``
   instants (CLOCK_MONOTONIC is system-wide); the worker runs, then answers
   ``("result", figures)``.

Load is a closed loop: each connection keeps ``depth`` messages outstanding;
each message carries its sequence number in its first 8 bytes; each echo is
checked for length and sequence (a mismatch is an error) and its round-trip
time recorded. Only echoes that arrive inside ``[measure_from, measure_to)``
are counted; the time before is the warm-up. Latencies are appended to an
array (cheap) and returned as ``{microseconds: count}``, which the
orchestrator records into an HDR histogram.

picows reads and parses; the client frames are built here, masked with one
random key per connection (a message then costs an 8-byte XOR, not a pass
over its payload), and the messages that answer the echoes of one read leave
in one write: at depth 16 the generator makes one system call per read, as
the backend does.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import signal
import ssl
import struct
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from .backend import frame_header
from .procs import die_with_parent, raise_nofile

SEQ = struct.Struct("<Q")
#: Smallest message: it must hold the sequence number.
MIN_SIZE = SEQ.size
MAX_FRAME = 16 * 1024 * 1024
CONNECT_TIMEOUT = 20.0
#: After the window, outstanding echoes have this long to arrive (else: errors).
DRAIN_TIMEOUT = 5.0
CLOSE_TIMEOUT = 10.0
#: Connections opened at once per worker.
OPEN_CONCURRENCY = 100
#: A worker waits at most this long for its next command, then exits.
IDLE_EXIT = 1800.0

_BINARY = WSMsgType.BINARY
_CLOSE = WSMsgType.CLOSE
_CONTINUATION = WSMsgType.CONTINUATION


class RunState:
    """What the connections of one worker share during a command."""

    __slots__ = (
        "connect_failed",
        "disconnected",
        "drained",
        "draining",
        "examples",
        "latencies",
        "mismatched",
        "recording",
        "sending",
        "unexpected",
    )

    def __init__(self) -> None:
        self.sending = False
        self.recording = False
        self.latencies = array("q")  # microseconds, one per echo in the window
        self.mismatched = 0  # wrong length or sequence number
        self.unexpected = 0  # an echo of nothing we sent
        self.disconnected = 0  # the connection ended while we still used it
        self.connect_failed = 0
        self.examples: list[str] = []  # the first few distinct failures, for the report
        # After the window: connections still awaiting echoes, and the event of none left.
        self.draining = 0
        self.drained: asyncio.Event | None = None

    def failed(self, exc: BaseException, step: str = "") -> None:
        self.connect_failed += 1
        text = f"{step + ': ' if step else ''}{type(exc).__name__}: {exc}"[:200]
        if len(self.examples) < 3 and text not in self.examples:
            self.examples.append(text)

    def client_drained(self) -> None:
        self.draining -= 1
        if self.draining <= 0 and self.drained is not None:
            self.drained.set()

    def errors(self, unanswered: int = 0) -> dict[str, int]:
        return {
            "connect_failed": self.connect_failed,
            "mismatched": self.mismatched,
            "unexpected": self.unexpected,
            "disconnected": self.disconnected,
            "unanswered": unanswered,
        }


class Client(WSListener):
    """One connection of the closed loop."""

    def __init__(self, state: RunState, size: int, depth: int) -> None:
        self.state = state
        self.size = size
        self.depth = depth
        # The frame is header + masked sequence number + masked filler, with one
        # masking key per connection: only the sequence number changes.
        mask = os.urandom(4)
        self.header = frame_header(0x2, True, size, mask)
        self.mask64 = int.from_bytes(mask * 2, "little")
        body_len = size - MIN_SIZE  # the filler starts 8 bytes in: aligned on the key
        keys = (mask * (body_len // 4 + 1))[:body_len]
        self.tail = (
            int.from_bytes(b"x" * body_len, "little") ^ int.from_bytes(keys, "little")
        ).to_bytes(body_len, "little")
        self.out = bytearray()
        self.next_seq = 0
        self.expect = 0
        self.sent_at: deque[int] = deque()
        self.transport: WSTransport | None = None
        self.closing = False
        self.gone = False
        #: Set on the next echo (for one-echo uses: handshakes, idle pairs).
        self.echoed: asyncio.Future[None] | None = None
        # A fragmented echo in progress: its length so far and sequence number.
        self._frag_len = -1
        self._frag_seq = -1

    # picows callbacks -----------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is _BINARY and frame.fin and self._frag_len < 0:
            data = frame.get_payload_as_memoryview()
            self._echoed(len(data), SEQ.unpack_from(data)[0] if len(data) >= MIN_SIZE else -1)
        elif msg_type is _CLOSE:
            if not self.closing:
                self.state.disconnected += 1
                self.closing = True
                transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif msg_type is _BINARY or msg_type is _CONTINUATION:
            data = frame.get_payload_as_memoryview()
            if self._frag_len < 0:  # first fragment
                self._frag_len = 0
                self._frag_seq = SEQ.unpack_from(data)[0] if len(data) >= MIN_SIZE else -1
            self._frag_len += len(data)
            if frame.fin:
                length, seq = self._frag_len, self._frag_seq
                self._frag_len = -1
                self._echoed(length, seq)
        elif msg_type is WSMsgType.TEXT:
            self.state.mismatched += 1
        if self.out and frame.last_in_buffer:
            self.flush()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.gone = True
        state = self.state
        if not self.closing:
            state.disconnected += 1
        if self.sent_at and not state.sending and state.drained is not None:
            state.client_drained()  # its echoes will never come
        if self.echoed is not None and not self.echoed.done():
            self.echoed.set_exception(ConnectionError("disconnected"))

    # the loop ---------------------------------------------------------------------
    def queue_one(self) -> None:
        """Add the next message to the pending write."""
        out = self.out
        out += self.header
        out += SEQ.pack(self.next_seq ^ self.mask64)
        out += self.tail
        self.next_seq += 1
        self.sent_at.append(time.perf_counter_ns())

    def flush(self) -> None:
        data, self.out = self.out, bytearray()
        if self.transport is not None and not self.gone:
            self.transport.underlying_transport.write(data)

    def send_one(self) -> None:
        self.queue_one()
        self.flush()

    def start(self) -> None:
        for _ in range(self.depth):
            self.queue_one()
        self.flush()

    def _echoed(self, length: int, seq: int) -> None:
        now = time.perf_counter_ns()
        state = self.state
        if not self.sent_at:
            state.unexpected += 1
            return
        sent = self.sent_at.popleft()
        if length != self.size or seq != self.expect:
            state.mismatched += 1
        self.expect += 1
        if state.recording:
            state.latencies.append((now - sent) // 1000)
        if state.sending and not self.closing:
            self.queue_one()  # written when the last frame of this read is handled
        elif not self.sent_at and state.drained is not None:
            state.client_drained()
        if self.echoed is not None and not self.echoed.done():
            self.echoed.set_result(None)

    def close(self) -> None:
        self.closing = True
        self.out = bytearray()
        if self.transport is not None and not self.gone:
            # 1000: picows' default close code is 0, which no endpoint may send
            # (RFC 6455 7.4.2); the gateway rightly refused it with 1002.
            self.transport.send_close(WSCloseCode.OK)
            self.transport.disconnect()


# -- commands ----------------------------------------------------------------------


async def _pipe_recv(conn: Connection, timeout: float) -> Any:
    """Await the next message on ``conn`` without blocking the event loop."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(conn.fileno(), readable.set)
    try:
        deadline = loop.time() + timeout
        while not conn.poll():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("no word from the orchestrator")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(readable.wait(), remaining)
            readable.clear()
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv()


async def _await_go(conn: Connection, info: dict[str, Any]) -> dict[str, float]:
    conn.send(("ready", info))
    kind, timing = await _pipe_recv(conn, 600)
    if kind != "go":
        raise RuntimeError(f"expected 'go', got {kind!r}")
    timing_: dict[str, float] = timing
    return timing_


def _client_ssl(spec: dict[str, Any]) -> ssl.SSLContext | None:
    ca = spec.get("ca_pem")
    return ssl.create_default_context(cadata=ca) if ca else None


async def _connect(
    url: str,
    factory: Callable[[], Client],
    ctx: ssl.SSLContext | None,
    headers: list[tuple[str, str]] | None = None,
) -> tuple[WSTransport, Client]:
    transport, client = await asyncio.wait_for(
        ws_connect(
            factory,
            url,
            ssl_context=ctx,
            extra_headers=headers or None,
            max_frame_size=MAX_FRAME,
            websocket_handshake_timeout=CONNECT_TIMEOUT,
            enable_auto_ping=False,
        ),
        CONNECT_TIMEOUT,
    )
    return transport, client


async def _open_many(
    spec: dict[str, Any], state: RunState, *, echo_once: bool = False
) -> list[Client]:
    """Open ``spec['connections']`` connections (at most OPEN_CONCURRENCY at once)."""
    url, size, depth = spec["url"], spec.get("size", 32), spec.get("depth", 1)
    ctx = _client_ssl(spec)
    clients: list[Client] = []
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    loop = asyncio.get_running_loop()

    async def open_one() -> None:
        async with gate:
            try:
                _, client = await _connect(url, lambda: Client(state, size, depth), ctx)
                if echo_once:
                    client.echoed = loop.create_future()
                    client.send_one()
                    await asyncio.wait_for(client.echoed, CONNECT_TIMEOUT)
                    client.echoed = None
            except Exception as exc:
                state.failed(exc)
                return
            clients.append(client)

    await asyncio.gather(*(open_one() for _ in range(spec["connections"])))
    return clients


async def _close_all(clients: list[Client]) -> None:
    for client in clients:
        client.close()
    transports = [c.transport for c in clients if c.transport is not None]
    if transports:
        waits = (t.wait_disconnected() for t in transports)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), CLOSE_TIMEOUT)
        for transport in transports:
            if not transport.is_disconnected:
                transport.disconnect(graceful=False)


def _later(loop: asyncio.AbstractEventLoop, at: float, callback: Callable[[], None]) -> None:
    loop.call_later(max(0.0, at - time.monotonic()), callback)


async def load(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """The closed loop over ``spec['connections']`` connections of this worker."""
    state = RunState()
    clients = await _open_many(spec, state) if spec["connections"] else []
    timing = await _await_go(conn, {"opened": len(clients)})
    loop = asyncio.get_running_loop()

    def start() -> None:
        state.sending = True
        for client in clients:
            client.start()

    def record() -> None:
        state.recording = True

    def stop() -> None:
        state.recording = False
        state.sending = False
        state.draining = sum(1 for c in clients if c.sent_at and not c.gone)
        state.drained = asyncio.Event()
        if state.draining == 0:
            state.drained.set()

    _later(loop, timing["start"], start)
    _later(loop, timing["measure_from"], record)
    _later(loop, timing["measure_to"], stop)
    await asyncio.sleep(max(0.0, timing["measure_to"] - time.monotonic()) + 0.01)
    if state.drained is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.drained.wait(), DRAIN_TIMEOUT)
    unanswered = sum(len(c.sent_at) for c in clients)
    await _close_all(clients)
    return {
        "opened": len(clients),
        "messages": len(state.latencies),
        "error_examples": state.examples,
        "latency_counts": dict(Counter(state.latencies)),
        "errors": state.errors(unanswered),
    }


async def _one_cycle(url: str, state: RunState, size: int, ctx: Any, headers: list[Any]) -> bool:
    """Connect, echo one ``size`` B message, close; False (counted in ``state``) on a failure."""
    client: Client | None = None
    step = "connect"  # which step failed, for the report
    try:
        _, client = await _connect(url, lambda: Client(state, size, 1), ctx, headers)
        step = "echo"
        client.echoed = asyncio.get_running_loop().create_future()
        client.send_one()
        await asyncio.wait_for(client.echoed, CONNECT_TIMEOUT)
        step = "close"
        client.close()
        assert client.transport is not None
        await asyncio.wait_for(client.transport.wait_disconnected(), CLOSE_TIMEOUT)
    except Exception as exc:
        state.failed(exc, step)
        if client is not None and client.transport is not None:
            client.transport.disconnect(graceful=False)
        return False
    return True


async def handshakes(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """``spec['concurrency']`` loops of: connect, one echo, close; count whole cycles."""
    state = RunState()
    ctx = _client_ssl(spec)
    url, size = spec["url"], spec.get("size", 32)
    headers = [tuple(h) for h in spec.get("headers", [])]
    timing = await _await_go(conn, {"opened": 0})
    state.sending = False
    completed = array("q")

    async def cycle() -> None:
        await asyncio.sleep(max(0.0, timing["start"] - time.monotonic()))
        while time.monotonic() < timing["measure_to"]:
            began = time.perf_counter_ns()
            if not await _one_cycle(url, state, size, ctx, headers):
                await asyncio.sleep(0.01)
                continue
            now = time.monotonic()
            if timing["measure_from"] <= now < timing["measure_to"]:
                completed.append((time.perf_counter_ns() - began) // 1000)

    await asyncio.gather(*(cycle() for _ in range(spec["concurrency"])))
    return {
        "opened": 0,
        "messages": len(completed),
        "error_examples": state.examples,
        "latency_counts": dict(Counter(completed)),
        "errors": state.errors(),
    }


async def handshake_pairs(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """One loop over ``spec['urls']`` (two targets): each round runs one full cycle
    (connect, one echo, close) against every target, in a random order per round.

    Both targets are measured in the same instants, so a busy moment of the
    machine lands on both sides alike; running them one after the other would
    give each its own moments. A round with a failed cycle is not recorded (an
    error is counted). Returns one result per URL (none for a worker given no URLs).
    """
    urls: list[str] = spec["urls"]
    ctx = _client_ssl(spec)
    headers = [tuple(h) for h in spec.get("headers", [])]
    states = [RunState() for _ in urls]
    completed = [array("q") for _ in urls]
    order = random.Random(spec.get("seed", 0))
    timing = await _await_go(conn, {"opened": 0})

    async def one(index: int) -> int | None:
        """One cycle against ``urls[index]``: its microseconds, or None if it failed."""
        began = time.perf_counter_ns()
        if not await _one_cycle(urls[index], states[index], 32, ctx, headers):
            return None
        return (time.perf_counter_ns() - began) // 1000

    await asyncio.sleep(max(0.0, timing["start"] - time.monotonic()))
    indexes = list(range(len(urls)))
    while urls and time.monotonic() < timing["measure_to"]:
        order.shuffle(indexes)
        in_window = time.monotonic() >= timing["measure_from"]
        took = [(index, await one(index)) for index in indexes]
        if any(us is None for _, us in took):
            await asyncio.sleep(0.01)
            continue  # a pair is kept whole or not at all
        if in_window and time.monotonic() < timing["measure_to"]:
            for index, us in took:
                completed[index].append(us)  # type: ignore[arg-type]
    return {
        "by_url": [
            {
                "opened": 0,
                "messages": len(done),
                "error_examples": state.examples,
                "latency_counts": dict(Counter(done)),
                "errors": state.errors(),
            }
            for state, done in zip(states, completed, strict=True)
        ],
    }


async def idle(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """Open connections, echo once on each, hold them until 'go', then close them."""
    state = RunState()
    clients = await _open_many(spec, state, echo_once=True) if spec["connections"] else []
    info = {"opened": len(clients), "errors": state.errors(), "error_examples": state.examples}
    await _await_go(conn, info)
    alive = sum(1 for c in clients if not c.gone)
    await _close_all(clients)
    return {
        "opened": len(clients),
        "alive": alive,
        "messages": 0,
        "error_examples": state.examples,
        "latency_counts": {},
        "errors": state.errors(),
    }


COMMANDS = {
    "load": load,
    "handshakes": handshakes,
    "handshake_pairs": handshake_pairs,
    "idle": idle,
}


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def worker_main(conn: Connection) -> None:
    """A worker process: run commands from the orchestrator until 'stop'."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator handles Ctrl-C
    raise_nofile()
    while conn.poll(IDLE_EXIT):
        try:
            kind, spec = conn.recv()
        except EOFError:
            return
        if kind == "stop":
            return
        try:
            result = _run(COMMANDS[kind](conn, spec))
        except BaseException as exc:  # report, and stay available
            result = {"failed": f"{type(exc).__name__}: {exc}"}
        try:
            conn.send(("result", result))
        except (BrokenPipeError, OSError):
            return


# -- the orchestrator's side ---------------------------------------------------------


class LoadGenerator:
    """``processes`` worker processes driven in lock-step."""

    def __init__(self, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for index in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child,), name=f"loadgen-{index}")
            proc.daemon = True
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop", None))
        for proc in self.procs:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        for pipe in self.pipes:
            pipe.close()

    def _expect(self, kind: str, timeout: float) -> list[Any]:
        """One message of ``kind`` from every worker, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        answers: list[Any] = []
        for index, pipe in enumerate(self.pipes):
            remaining = deadline - time.monotonic()
            if not pipe.poll(max(0.0, remaining)):
                raise TimeoutError(f"load generator worker {index}: no {kind!r} in {timeout:g} s")
            got, payload = pipe.recv()
            if got == "result" and kind != "result":
                raise RuntimeError(f"load generator worker {index} failed: {payload}")
            if got != kind:
                raise RuntimeError(f"load generator worker {index}: expected {kind!r}, got {got!r}")
            answers.append(payload)
        return answers

    def run(
        self,
        command: str,
        specs: list[dict[str, Any]],
        *,
        warmup: float,
        duration: float,
        window: Callable[[str], None] | None = None,
        setup_timeout: float = 120.0,
    ) -> tuple[list[Any], list[Any]]:
        """Run ``command`` on every worker (one spec each); return (ready infos, results).

        ``window("from")`` and ``window("to")`` are called at the edges of the
        measured window (for CPU counters); for 'idle', ``window("held")`` is
        called while the connections are held open.
        """
        for pipe, spec in zip(self.pipes, specs, strict=True):
            pipe.send((command, spec))
        infos = self._expect("ready", setup_timeout)
        start = time.monotonic() + 0.05
        timing = {
            "start": start,
            "measure_from": start + warmup,
            "measure_to": start + warmup + duration,
        }
        if command == "idle" and window is not None:
            window("held")
        for pipe in self.pipes:
            pipe.send(("go", timing))
        if command != "idle" and window is not None:
            _sleep_until(timing["measure_from"])
            window("from")
            _sleep_until(timing["measure_to"])
            window("to")
        results = self._expect("result", warmup + duration + DRAIN_TIMEOUT + CLOSE_TIMEOUT + 60)
        for index, result in enumerate(results):
            if "failed" in result:
                raise RuntimeError(f"load generator worker {index} failed: {result['failed']}")
        return infos, results


def _sleep_until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as possible (earlier parts get the rest)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
