"""Instructions per echoed message, counted by valgrind: ``python -m benchmarks.icount``.

CPU time per message (``make bench``'s ``proxy us/msg``) moves by 10 to 30%
from one process to the next on a shared 2-core machine: it depends on where
the scheduler puts the gateway, its backend and its load, and on what other
tenants do. That hides any difference smaller than that, such as issue 4's
"metrics cost at most 5%". Instructions executed do not depend on any of it.

For each target, ``wsgate serve`` runs under ``valgrind --tool=callgrind``
twice, relaying ``--messages`` and then three times as many echoes over the
same ``--connections``; the difference between the two runs' instruction
counts, divided by the difference in messages, is the cost of one echo (both
directions, frames scanned, logs and counters included). Start-up, handshakes
and shutdown cancel out. Valgrind slows the gateway about 50 times, so the
load is a small closed loop of plain sockets; every echo is checked.

Results go to ``benchmarks/results/icount.md`` and ``.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import selectors
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import procs
from .run import RESULTS
from .soak import tls_certificate
from .targets import (
    PATH,
    ROOT,
    Target,
    TrioFloor,
    Wsgate,
    WsgateMetrics,
    WsgateQuiet,
    WsgateReactor,
    WsgateReactorTLS,
    WsgateTLS,
)

#: ``trio-floor`` is the brief's per-connection shape with nothing of a gateway in it.
TARGETS: dict[str, type[Target]] = {
    t.name: t
    for t in (
        Wsgate,
        WsgateMetrics,
        WsgateReactor,
        WsgateQuiet,
        TrioFloor,
        WsgateTLS,
        WsgateReactorTLS,
    )
}


def _frame(payload: bytes) -> bytes:
    """A masked binary frame (mask key 0: the payload goes out as is)."""
    assert len(payload) < 126
    return bytes([0x82, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


def _handshake(port: int, tls: ssl.SSLContext | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("the gateway closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"handshake refused: {head.splitlines()[0]!r}")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def drive(port: int, connections: int, messages: int, size: int) -> None:
    """Echo ``messages`` messages of ``size`` bytes over ``connections``, closed loop."""
    socks = [_handshake(port) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    sent = 0
    waiting: dict[socket.socket, tuple[bytes, bytearray]] = {}

    def send(sock: socket.socket) -> None:
        nonlocal sent
        payload = sent.to_bytes(8, "big") + bytes(size - 8)
        sock.sendall(_frame(payload))
        sent += 1
        waiting[sock] = (bytes([0x82, len(payload)]) + payload, bytearray())

    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
        if sent < messages:
            send(sock)
    deadline = time.monotonic() + 600
    while waiting:
        if time.monotonic() > deadline:
            raise RuntimeError("echoes stopped coming back")
        for key, _ in selector.select(timeout=5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            expected, got = waiting[sock]
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the gateway closed a connection")
            got += chunk
            if len(got) < len(expected):
                continue
            if bytes(got) != expected:
                raise RuntimeError("an echo came back wrong")
            del waiting[sock]
            if sent < messages:
                send(sock)
    for sock in socks:
        sock.sendall(b"\x88\x82\0\0\0\0\x03\xe8")  # close 1000
        sock.close()


def drive_handshakes(
    port: int, handshakes: int, size: int, tls: ssl.SSLContext | None = None
) -> None:
    """``handshakes`` times in turn: connect, echo one message, close (1000), wait for the end.

    With ``tls``, over wss:// with a full TLS handshake each time (no resumption).
    """
    for i in range(handshakes):
        sock = _handshake(port, tls)
        payload = i.to_bytes(8, "big") + bytes(size - 8)
        sock.sendall(_frame(payload))
        expected = bytes([0x82, len(payload)]) + payload
        got = b""
        while len(got) < len(expected):
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("the gateway closed a connection")
            got += chunk
        if got != expected:
            raise RuntimeError("an echo came back wrong")
        sock.sendall(b"\x88\x82\0\0\0\0\x03\xe8")  # close 1000
        while sock.recv(65536):  # the close frame back, then the gateway's EOF
            pass
        sock.close()


def instructions(out_file: Path) -> int:
    """The total instruction count in a callgrind output file."""
    text = out_file.read_text()
    match = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no totals in {out_file}")
    return int(match.group(1))


def one_run(
    cls: type[Target],
    workdir: Path,
    backend_port: int,
    connections: int,
    messages: int,
    size: int,
) -> int:
    """Instructions the gateway executed for start-up, ``messages`` echoes and shutdown."""
    out_file = workdir / f"{cls.name}-{messages}.callgrind"
    tls_files, client_tls = None, None
    if cls.tls:
        settings, client_tls, _ca = tls_certificate(workdir)
        tls_files = {"cert": Path(settings["certificate"]), "key": Path(settings["private_key"])}
    target = cls(workdir, backend_port, tls_files)
    target.launcher = (
        "valgrind",
        "--tool=callgrind",
        "--quiet",
        f"--callgrind-out-file={out_file}",
    )
    target.start_timeout = 300.0
    target.start()
    assert target.proc is not None
    try:
        if connections == 0:
            drive_handshakes(target.port, messages, size, client_tls)
        elif client_tls is not None:
            raise RuntimeError(f"{cls.name}: TLS targets are counted with --handshakes only")
        else:
            drive(target.port, connections, messages, size)
        os.killpg(target.proc.pid, target.stop_signal)  # a graceful end: callgrind dumps
        target.proc.wait(timeout=300)
    finally:
        target.stop()
    return instructions(out_file)


def render(meta: dict[str, Any], results: dict[str, Any]) -> str:
    """The markdown report of one run (``meta`` and ``results`` as saved in its JSON)."""
    unit, plural = meta["unit"], {"echo": "echoes", "handshake": "handshakes"}[meta["unit"]]
    short, long_ = meta["counts"]
    names = list(results)
    load = (
        f"handshakes one after another (connect, one {meta['size']} B echo, close)"
        if unit == "handshake"
        else f"{meta['connections']} connections, {meta['size']} B messages, closed loop, depth 1"
    )
    repeats = max(len(results[name]["per_unit"]) for name in names)
    lines = [
        f"# Instructions per {unit} (valgrind callgrind)",
        "",
        f"- {load}; runs of {short:,} and {long_:,} {plural}, the difference divided by "
        f"{long_ - short:,}; {repeats} measurement(s) per target, median shown.",
        f"- Produced by `{meta['command']}`.",
        "",
        f"| target | instructions per {unit} | x {names[0]} | each measurement |",
        "|:---|---:|---:|:---|",
    ]
    base = results[names[0]]["median"]
    for name in names:
        median = results[name]["median"]
        each = ", ".join(f"{value:,.0f}" for value in results[name]["per_unit"])
        lines.append(f"| {name} | {median:,.0f} | {median / base:.3f}x | {each} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.icount", description=__doc__)
    parser.add_argument(
        "--targets",
        default="wsgate,wsgate-metrics",
        help=f"comma-separated, from: {', '.join(TARGETS)}",
    )
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument(
        "--handshakes",
        action="store_true",
        help="count per handshake instead: connect, one echo, close (--messages of them)",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=1000,
        help="echoes in the short run (the long run has 3 times as many)",
    )
    parser.add_argument("--size", type=int, default=32, help="payload bytes (8 to 125)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each target this many times; report the median",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    names = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = [name for name in names if name not in TARGETS]
    if unknown or not 8 <= args.size <= 125:
        parser.error(f"unknown target(s) {unknown}" if unknown else "--size must be 8 to 125")
    # Compile first: a run that writes .pyc files would count that work too.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "wsgate")], check=False)
    short, long_ = args.messages, 3 * args.messages
    connections = 0 if args.handshakes else args.connections
    unit = "handshake" if args.handshakes else "echo"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="wsgate-icount-") as tmp:
        workdir = Path(tmp)
        _backend, backend_port = procs.echo_backend(ROOT)
        try:
            for name in names:
                per_unit = []
                for _ in range(args.repeat):
                    low = one_run(
                        TARGETS[name], workdir, backend_port, connections, short, args.size
                    )
                    high = one_run(
                        TARGETS[name], workdir, backend_port, connections, long_, args.size
                    )
                    per_unit.append((high - low) / (long_ - short))
                    print(f"{name}: {low:,} instructions for {short:,}, {high:,} for {long_:,}")
                    print(f"{name}: {per_unit[-1]:,.0f} instructions per {unit}", flush=True)
                results[name] = {
                    "per_unit": per_unit,
                    "median": statistics.median(per_unit),
                }
        finally:
            procs.kill_all()
    command = " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "unit": unit,
        "connections": connections,
        "size": args.size,
        "counts": [short, long_],
        "command": f"python -m benchmarks.icount {command}".strip(),
    }
    report = render(meta, results)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "icount-handshakes" if args.handshakes else "icount"
    (args.out / f"{stem}.md").write_text(report)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
