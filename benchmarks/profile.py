"""Profile wsgate under load: ``python -m benchmarks.profile [--scenario 100x32x1] [--handshakes]``.

Starts the echo backend, ``wsgate serve`` and the load generator, drives the
scenario (or handshake loops) for ``--seconds``, and prints where the
gateway's CPU goes. Two profilers:

* ``--profiler cprofile`` (default): the gateway runs under cProfile with
  ``time.process_time`` as its clock, so time spent preempted by other
  processes is not charged (robust on a shared machine); it also gives exact
  call counts per echoed message. Its own overhead inflates call-heavy code.
* ``--profiler py-spy``: sampling (``pip install py-spy``; needs ptrace), low
  overhead, but wall-clock: a process preempted right after ``send`` woke its
  peer is seen "in send". Use it on a quiet machine. ``--native`` adds C frames.

The raw profile is written to ``--out`` (default benchmarks/results/profile-wsgate.*).
"""

from __future__ import annotations

import argparse
import io
import pstats
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from . import procs
from .loadgen import LoadGenerator, split
from .run import RESULTS, _scenario_arg
from .targets import ROOT, Wsgate, WsgateJWT


def cprofile_runner(entry: str) -> str:
    """A ``python -c`` script: ``entry``'s ``main(sys.argv[2:])`` under cProfile.

    The clock is ``time.process_time`` (preempted time is not charged); the
    stats go to ``sys.argv[1]`` when ``main`` returns or raises.
    """
    return f"""
import cProfile, sys, time
from {entry} import main
profile = cProfile.Profile(time.process_time)
profile.enable()
try:
    main(sys.argv[2:])
finally:
    profile.disable()
    profile.dump_stats(sys.argv[1])
"""


class ProfiledWsgate(Wsgate):
    """wsgate started under cProfile (CPU-time clock); the stats are dumped on SIGTERM."""

    name = "wsgate-profiled"

    def __init__(self, workdir: Path, backend_port: int, stats_path: Path) -> None:
        super().__init__(workdir, backend_port)
        self.stats_path = stats_path

    def start(self) -> None:
        self.port = procs.free_port()
        config = self.workdir / "profiled.toml"
        config.write_text(self.config_text())
        log = open(self.workdir / "profiled.log", "ab")  # noqa: SIM115 - child owns it
        try:
            self.proc = procs.spawn(
                [
                    *(sys.executable, "-c", cprofile_runner("wsgate.cli"), str(self.stats_path)),
                    *("serve", "--config", str(config)),
                ],
                stdout=log,
                stderr=log,
                cwd=str(ROOT),
            )
        finally:
            log.close()
        procs.wait_port(self.port, self.proc)


class ProfiledWsgateJWT(WsgateJWT, ProfiledWsgate):
    """The same, with wsgate-jwt's validate-jwt policy (its start() mints the token)."""


def summarize_collapsed(collapsed: str, top: int = 25) -> str:
    """Self and total sample shares per function from py-spy's collapsed stacks."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [f for f in stack.split(";") if f]
        if frames:
            self_counts[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            total_counts[frame] += count
    if not samples:
        return "no samples"
    lines = [f"{samples} samples", "", "self%   function (file)"]
    for frame, count in self_counts.most_common(top):
        lines.append(f"{100 * count / samples:5.1f}   {frame}")
    lines += ["", "total%  function (file)"]
    for frame, count in total_counts.most_common(top):
        lines.append(f"{100 * count / samples:5.1f}   {frame}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (to/module.py)": line numbers would
    # split one function into many entries.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    return f"{name} ({'/'.join(parts[-2:]) if len(parts) >= 2 else path})"


def summarize_pstats(path: Path, per: int, top: int = 30) -> str:
    """cProfile's top functions by own time, with calls and CPU per message."""
    out = io.StringIO()
    st = pstats.Stats(str(path), stream=out)
    total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    lines = [
        f"{total:.2f} CPU-seconds profiled, {per:,} messages: "
        f"{total * 1e6 / max(per, 1):.1f} us each",
        "",
        "self%   own us/msg  calls/msg  cum us/msg  function",
    ]
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in rows[:top]:
        where = "/".join(Path(file).parts[-2:]) if file != "~" else "builtin"
        lines.append(
            f"{100 * tottime / total:5.1f}   {tottime * 1e6 / max(per, 1):10.2f}"
            f"  {ncalls / max(per, 1):9.2f}  {cumtime * 1e6 / max(per, 1):10.2f}"
            f"  {func} ({where}:{line})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    p.add_argument("--scenario", type=_scenario_arg, default=(100, 32, 1))
    p.add_argument("--handshakes", action="store_true", help="profile handshake loops instead")
    p.add_argument(
        "--jwt", action="store_true", help="the API runs validate-jwt (wsgate-jwt's config)"
    )
    p.add_argument(
        "--engine", choices=("tasks", "reactor"), default="tasks", help="[gateway] relay_engine"
    )
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--profiler", choices=("cprofile", "py-spy"), default="cprofile")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--native", action="store_true", help="py-spy: include C frames")
    p.add_argument("--out", type=Path, help="where to keep the raw profile")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.profiler == "py-spy" and not Path(spy).exists():
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 1
    suffix = "prof" if args.profiler == "cprofile" else "txt"
    out: Path = args.out or RESULTS / f"profile-wsgate.{suffix}"
    workdir = Path(tempfile.mkdtemp(prefix="wsgate-profile-"))
    gen = None
    try:
        _backend, port = procs.echo_backend(ROOT)
        stats_path = workdir / "wsgate.prof"
        gateway: Wsgate
        if args.profiler == "cprofile":
            gateway = (ProfiledWsgateJWT if args.jwt else ProfiledWsgate)(workdir, port, stats_path)
        else:
            gateway = (WsgateJWT if args.jwt else Wsgate)(workdir, port)
        if args.engine != "tasks":
            gateway.engine = args.engine
        gateway.start()
        assert gateway.proc is not None
        gen = LoadGenerator(args.processes)
        conns, size, depth = args.scenario
        if args.handshakes:
            command = "handshakes"
            specs = [
                {"url": gateway.url, "concurrency": 16, "headers": gateway.headers}
                for _ in range(args.processes)
            ]
            what = "handshakes"
        else:
            command = "load"
            specs = [
                {"url": gateway.url, "connections": n, "size": size, "depth": depth}
                for n in split(conns, args.processes)
            ]
            what = f"{conns} x {size} B, depth {depth}"
        spy_cmd = [
            spy,
            "record",
            "--pid",
            str(gateway.proc.pid),
            "--duration",
            str(max(1, int(args.seconds))),
            "--rate",
            str(args.rate),
            "--format",
            "raw",
            "--output",
            str(workdir / "raw.txt"),
            "--nonblocking",
            *(["--native"] if args.native else []),
        ]
        spied: list[subprocess.Popen[bytes]] = []

        def window(edge: str) -> None:
            if edge == "from" and args.profiler == "py-spy":
                spied.append(procs.spawn(spy_cmd))

        # cProfile sees the whole run: no warm-up, so every profiled message is counted.
        warmup = 1.0 if args.profiler == "py-spy" else 0.0
        _, results = gen.run(command, specs, warmup=warmup, duration=args.seconds, window=window)
        messages = sum(r["messages"] for r in results)
        print(f"wsgate, {what}: {messages / args.seconds:,.0f}/s while profiled (slower than bare)")
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.profiler == "py-spy":
            spied[0].wait(30)
            raw = workdir / "raw.txt"
            collapsed = raw.read_text() if raw.exists() else ""
            out.write_text(collapsed)
            print(summarize_collapsed(collapsed))
        else:
            gateway.stop()  # SIGTERM: wsgate drains and the runner dumps its stats
            # Connection set-up and close are in the profile too (small next to the load).
            print(summarize_pstats(stats_path, messages))
            shutil.copyfile(stats_path, out)
        print(f"\nraw profile written to {out}", file=sys.stderr)
    finally:
        if gen is not None:
            gen.close()
        procs.kill_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
