"""Where wsgate's CPU goes beyond the shape's floor: ``python -m benchmarks.floor_profile``.

Runs ``benchmarks.trio_floor`` and ``wsgate serve`` in turn under cProfile (on
the CPU-time clock), drives ``--handshakes`` handshakes one after another
through each (connect, one 32 B echo, close: ``benchmarks.icount``'s driver),
and prints, per area of code, the profiled time per handshake of each and
the share of wsgate's extra over the floor. cProfile's own cost per call
inflates call-heavy code, so read the shares, not the times; instruction
counts (``benchmarks.icount``) are the absolute figures.
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from . import procs
from .icount import drive_handshakes
from .profile import cprofile_runner
from .targets import ROOT, Wsgate

#: Areas of code, tried in order: (name, substrings of a profiled function's file).
AREAS: list[tuple[str, tuple[str, ...]]] = [
    (
        "Trio: scheduling, cancel scopes, spawns",
        ("trio/", "contextlib", "outcome/", "methods trio.", "methods outcome."),
    ),
    (
        "request parsing and validation",
        ("wsgate/handshake.py", "wsgate/policies", "httptools", "base64", "wsgate/clientaddr"),
    ),
    ("the two log records", ("structlog", "json/", "wsgate/logs.py", "uuid")),
    (
        "frame scanning, pair state, the close",
        ("wsgate/relay.py", "wsgate/frames.py", "wsgate/pairstate.py", "wsgate/closing.py"),
    ),
    (
        "handshake orchestration, socket layer",
        (
            *("wsgate/gateway.py", "wsgate/backend.py", "wsgate/errors.py", "wsgate/netio.py"),
            "benchmarks/trio_floor.py",  # the floor's own accept, connect and pumps
            "socket.py",
        ),
    ),
    ("builtins and system calls", ("~",)),
]


def area(filename: str) -> str:
    """The area of :data:`AREAS` a profiled function's file belongs to."""
    for name, parts in AREAS:
        if any(part == filename if part == "~" else part in filename for part in parts):
            return name
    return "other"


def per_area(stats_file: Path, handshakes: int) -> dict[str, float]:
    """Profiled own time per handshake, in microseconds, by area."""
    totals: collections.Counter[str] = collections.Counter()
    stats = pstats.Stats(str(stats_file)).stats  # type: ignore[attr-defined]
    for (filename, _line, _name), (_cc, _nc, own, _cum, _callers) in stats.items():
        totals[area(filename)] += own / handshakes * 1e6
    return dict(totals)


def _profile(command: list[str], port: int | None, handshakes: int) -> None:
    """Run ``command`` (the floor when ``port`` is None: it prints its port) and drive it."""
    proc = procs.spawn(
        command,
        # wsgate logs a record per handshake to stdout, which nobody reads here.
        stdout=subprocess.PIPE if port is None else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(ROOT),
    )
    try:
        if port is None:
            port, stop = int(procs.read_line(proc, "READY ")), signal.SIGINT
        else:
            procs.wait_port(port, proc, timeout=30)
            stop = signal.SIGTERM  # a drain
        drive_handshakes(port, handshakes, 32)
        os.killpg(proc.pid, stop)  # either ends cleanly and dumps its stats
        proc.wait(timeout=60)
    finally:
        procs.kill(proc)


def render(floor: dict[str, float], wsgate: dict[str, float]) -> str:
    """The markdown table: each area's time in both, and its share of wsgate's extra."""
    extra = sum(wsgate.values()) - sum(floor.values())
    names = sorted(set(floor) | set(wsgate), key=lambda n: -(wsgate.get(n, 0) - floor.get(n, 0)))
    lines = [
        "| area | trio-floor us | wsgate us | share of wsgate's extra |",
        "|:---|---:|---:|---:|",
    ]
    for name in names:
        f, w = floor.get(name, 0.0), wsgate.get(name, 0.0)
        lines.append(f"| {name} | {f:,.0f} | {w:,.0f} | {(w - f) / extra:.0%} |")
    lines.append(f"| all | {sum(floor.values()):,.0f} | {sum(wsgate.values()):,.0f} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``--handshakes N`` (default 1000)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--handshakes", type=int, default=1000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wsgate-floor-") as tmp:
        work = Path(tmp)
        _backend, backend_port = procs.echo_backend(ROOT)
        try:
            floor_stats, wsgate_stats = work / "floor.prof", work / "wsgate.prof"
            _profile(
                [
                    *(sys.executable, "-c", cprofile_runner("benchmarks.trio_floor")),
                    *(str(floor_stats), "--backend-port", str(backend_port)),
                ],
                None,
                args.handshakes,
            )
            gateway = Wsgate(work, backend_port)
            gateway.port = procs.free_port()
            config = work / "wsgate.toml"
            config.write_text(gateway.config_text())
            _profile(
                [
                    *(sys.executable, "-c", cprofile_runner("wsgate.cli"), str(wsgate_stats)),
                    *("serve", "--config", str(config)),
                ],
                gateway.port,
                args.handshakes,
            )
            print(
                render(
                    per_area(floor_stats, args.handshakes), per_area(wsgate_stats, args.handshakes)
                ),
                end="",
            )
        finally:
            procs.kill_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
