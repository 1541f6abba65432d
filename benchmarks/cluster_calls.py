"""Where a [cluster] check's time goes: the client's CPU, the wall time, Redis's own time.

``python -m benchmarks.cluster_calls [--calls N] [--gap MS]`` starts a
redis-server on a free loopback port, runs N rate-limit checks one after
another through :class:`wsgate.cluster.store.RedisStore` (RESP on Trio,
hiredis), and prints per call: this process's CPU time, the wall time (mean,
and its p50 / p99 / p99.9 / max, so a tail in the client shows), and the time
Redis itself spent in the script (``INFO commandstats``). One check in flight
at a time: no queueing.

``--gap MS`` sleeps that long between checks, as the benchmark's one-at-a-time
step does between handshakes (about 2 ms): both processes then sleep between
calls and wake with cold caches, which costs more than back-to-back calls.

``--compare`` runs the rate-limit script on two connections instead, one doing
its own socket I/O (what every call does) and one going through Trio's
``SocketStream.send_all`` / ``receive_some`` (the TLS path; every call before),
in a random order per pair of calls, so both see the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import shutil
import socket
import tempfile
import time

import trio

from wsgate.cluster import scripts
from wsgate.cluster.redis import RedisClient
from wsgate.cluster.resp import RespConnection
from wsgate.cluster.settings import ClusterConfig
from wsgate.cluster.store import RedisStore

from . import procs

POLICY = object()
QUANTILES = (0.5, 0.99, 0.999)


def _info(port: int) -> str:
    """``INFO commandstats``: a bulk reply, ``$LENGTH\\r\\n`` then that many bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"INFO commandstats\r\n")
        data = b""
        while b"\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n")
        while len(body) < int(head[1:]):
            body += sock.recv(65536)
        return body.decode()


def quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of an ascending list (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, calls: int, gap: float) -> tuple[float, list[float]]:
    """CPU seconds per check, and each check's wall seconds (in order)."""
    store = RedisStore(RedisClient(ClusterConfig(redis_url=url, timeout=5.0)), {id(POLICY): "b"})
    walls: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for _ in range(200):  # connect, load the script, warm up
            await store.sliding_log(POLICY, "k", 10**9, 60)
        cpu = 0.0
        for _ in range(calls):
            if gap:
                await trio.sleep(gap)
            began_cpu, began = time.process_time(), time.perf_counter()
            await store.sliding_log(POLICY, "k", 10**9, 60)
            walls.append(time.perf_counter() - began)
            cpu += time.process_time() - began_cpu
        nursery.cancel_scope.cancel()
    return cpu / calls, walls


async def compare(url: str, calls: int, gap: float) -> dict[str, tuple[float, list[float]]]:
    """Per path: CPU seconds per call and each call's wall seconds, calls alternating."""
    paths = {"own socket I/O": await RespConnection.open(url)}
    paths["SocketStream"] = await RespConnection.open(url)
    paths["SocketStream"]._fd = None  # as a TLS connection does: through the stream
    sha = hashlib.sha1(scripts.SLIDING_LOG.encode()).hexdigest()
    await paths["SocketStream"].call("SCRIPT", "LOAD", scripts.SLIDING_LOG)
    walls: dict[str, list[float]] = {name: [] for name in paths}
    cpu = dict.fromkeys(paths, 0.0)
    order, names = random.Random(17), list(paths)
    try:
        for index in range(200 + calls):  # the first 200: warm-up
            order.shuffle(names)
            for name in names:
                if gap:
                    await trio.sleep(gap)
                began_cpu, began = time.process_time(), time.perf_counter()
                await paths[name].call("EVALSHA", sha, 1, f"k:{name}", 10**9, 60_000_000)
                if index >= 200:
                    walls[name].append(time.perf_counter() - began)
                    cpu[name] += time.process_time() - began_cpu
    finally:
        for conn in paths.values():
            await conn.aclose()
    return {name: (cpu[name] / calls, walls[name]) for name in paths}


def _wall(walls: list[float]) -> str:
    ordered = sorted(walls)
    tail = " / ".join(f"{quantile(ordered, q) * 1e6:.0f}" for q in QUANTILES)
    return f"{sum(walls) / len(walls) * 1e6:6.1f} us mean, p50 / p99 / p99.9 {tail} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--gap", type=float, default=0.0, help="milliseconds between checks")
    parser.add_argument(
        "--compare", action="store_true", help="own socket I/O against SocketStream, alternating"
    )
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = procs.free_port()
    with tempfile.TemporaryDirectory() as workdir:
        server = procs.spawn(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir]
        )
        try:
            procs.wait_port(port, server, timeout=10)
            url = f"redis://127.0.0.1:{port}/0"
            if args.compare:
                paths = trio.run(compare, url, args.calls, args.gap / 1000)
            else:
                cpu, walls = trio.run(measure, url, args.calls, args.gap / 1000)
            stats = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", _info(port))
        finally:
            procs.kill(server)
    assert stats is not None
    redis_us = int(stats[2]) / int(stats[1])
    gap = f", {args.gap:g} ms apart" if args.gap else ", back to back"
    if args.compare:
        print(f"{args.calls} rate-limit scripts per path, alternating (random order){gap}")
        for name, (cpu, walls) in paths.items():
            print(f"{name + ':':16} CPU {cpu * 1e6:6.1f} us, wall {_wall(walls)}")
    else:
        print(f"{args.calls} sequential rate-limit checks through RedisStore (RESP, hiredis){gap}")
        print(f"client CPU per check:   {cpu * 1e6:8.1f} us")
        print(f"wall time per check:    {_wall(walls)} (max {max(walls) * 1e6:.0f})")
    print(f"Redis time per script:  {redis_us:8.1f} us (INFO commandstats, evalsha)")


if __name__ == "__main__":
    main()
