"""Child processes that are always killed, and /proc accounting of CPU time and memory.

Every process the benchmark starts goes through :func:`spawn`: it runs in its
own session (so Ctrl-C reaches only the orchestrator, which then kills it) and
gets ``PR_SET_PDEATHSIG`` so that it dies with the orchestrator even if the
orchestrator itself is killed with SIGKILL. :func:`kill_all` ends every process
group started, SIGTERM first and SIGKILL after a short grace period.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_children: list[subprocess.Popen[Any]] = []


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def echo_backend(cwd: Path) -> tuple[subprocess.Popen[Any], int]:
    """Start the echo backend (``benchmarks.backend``) on a free port: the process and its port."""
    backend = spawn(
        [sys.executable, "-m", "benchmarks.backend"], stdout=subprocess.PIPE, cwd=str(cwd)
    )
    return backend, int(read_line(backend, "READY "))


def run_trio_relay(
    serve: Callable[[int, int], Awaitable[None]], description: str | None, argv: list[str] | None
) -> int:
    """Run a Trio reference relay's ``serve(port, backend_port)`` from its command line."""
    import trio  # only the Trio relays need it

    args = relay_args(description, argv)
    try:
        trio.run(serve, args.port, args.backend_port)
    except KeyboardInterrupt:
        pass
    return 0


def relay_args(description: str | None, argv: list[str] | None) -> argparse.Namespace:
    """A reference relay's command line (``--port``, ``--backend-port``), set up to run here.

    The relay dies with its parent and may open as many files as the hard limit allows.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backend-port", type=int, required=True)
    args = parser.parse_args(argv)
    die_with_parent()
    raise_nofile()
    return args


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def hard_nofile() -> int:
    """The hard RLIMIT_NOFILE (what a child can raise its soft limit to)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def _child_setup() -> None:
    die_with_parent()
    raise_nofile()


def spawn(
    cmd: Sequence[str],
    *,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.Popen[Any]:
    """Start ``cmd`` in its own session; it is killed by :func:`kill_all` (or our death)."""
    proc = subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_child_setup,  # the orchestrator starts no threads
    )
    _children.append(proc)
    return proc


def kill(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while its group (nginx's worker) lives on.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    if proc in _children:
        _children.remove(proc)


def kill_all() -> None:
    """Kill every process started with :func:`spawn` that is still registered."""
    for proc in list(reversed(_children)):
        kill(proc, grace=2.0)


def system_busy_seconds() -> float:
    """CPU-seconds all cores have spent running processes since boot (from /proc/stat).

    Interrupt and softirq time are left out: on loopback they are mostly the
    benchmark's own packets, and no process is charged for them.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + steal) / CLK_TCK


def wait_for_quiet(limit: float, threshold: float = 25.0, sample: float = 1.0) -> float:
    """Wait up to ``limit`` seconds for the machine's CPU use to drop below ``threshold``
    percent of one core; return the last reading (other sessions may share the machine)."""
    deadline = time.monotonic() + limit
    while True:
        before = system_busy_seconds()
        time.sleep(sample)
        busy = (system_busy_seconds() - before) * 100.0 / sample
        if busy < threshold or time.monotonic() + sample > deadline:
            return busy


def wait_for_quiet_step(limit: float, own: Iterable[int], threshold: float = 30.0) -> float:
    """Like :func:`wait_for_quiet`, with the CPU of ``own`` processes (idle ones) left out."""
    pids = list(own)
    deadline = time.monotonic() + limit
    while True:
        busy0, ours0 = system_busy_seconds(), cpu_seconds(pids)
        time.sleep(0.2)
        busy = (system_busy_seconds() - busy0 - (cpu_seconds(pids) - ours0)) * 100.0 / 0.2
        if busy < threshold or time.monotonic() + 0.2 > deadline:
            return busy


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 15.0) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections (RuntimeError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def read_line(proc: subprocess.Popen[Any], prefix: str, timeout: float = 15.0) -> str:
    """Read ``proc``'s stdout until a line starting with ``prefix``; return the rest of it."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
    raise RuntimeError(f"{proc.args!r} did not print {prefix!r} within {timeout:g} s")


# -- /proc accounting ------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        text = f.read().decode(errors="replace")
    # The command name may hold spaces and parentheses: split after the last ')'.
    return text[text.rfind(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (by scanning /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo and len(tree) < 10_000:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, ()))
    return tree


def cpu_split(pids: Iterable[int]) -> tuple[float, float]:
    """(user, system) CPU seconds consumed so far by ``pids`` (all their threads)."""
    user = system = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        user += int(fields[11])  # utime, field 14
        system += int(fields[12])  # stime, field 15
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds consumed so far by ``pids`` (all their threads)."""
    return sum(cpu_split(pids))


def rss_bytes(pids: Iterable[int]) -> int:
    """Resident set size of ``pids``, added up."""
    total = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        total += int(fields[21]) * PAGE_SIZE  # rss, field 24
    return total
