"""Where a [cluster] check's time goes: the client's CPU, the wall time, Redis's own time.

``python -m benchmarks.cluster_calls [--calls N]`` starts a redis-server on a
free loopback port, runs N rate-limit checks one after another through
:class:`wsgate.cluster.store.RedisStore` (RESP on Trio, hiredis), and prints per call:
this process's CPU time, the wall time, and the time Redis itself spent in the
script (``INFO commandstats``). One check in flight at a time: no queueing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import tempfile
import time

import trio

from wsgate.cluster.redis import RedisClient
from wsgate.cluster.settings import ClusterConfig
from wsgate.cluster.store import RedisStore

from . import procs

POLICY = object()


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


async def measure(url: str, calls: int) -> tuple[float, float]:
    store = RedisStore(RedisClient(ClusterConfig(redis_url=url, timeout=5.0)), {id(POLICY): "b"})
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for _ in range(200):  # connect, load the script, warm up
            await store.sliding_log(POLICY, "k", 10**9, 60)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(calls):
            await store.sliding_log(POLICY, "k", 10**9, 60)
        result = (time.process_time() - cpu) / calls, (time.perf_counter() - wall) / calls
        nursery.cancel_scope.cancel()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
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
            cpu, wall = trio.run(measure, f"redis://127.0.0.1:{port}/0", args.calls)
            stats = re.search(r"cmdstat_evalsha:calls=(\d+),usec=(\d+)", _info(port))
        finally:
            procs.kill(server)
    assert stats is not None
    redis_us = int(stats[2]) / int(stats[1])
    print(f"{args.calls} sequential rate-limit checks through RedisStore (RESP, hiredis)")
    print(f"client CPU per check:   {cpu * 1e6:8.1f} us")
    print(f"wall time per check:    {wall * 1e6:8.1f} us")
    print(f"Redis time per script:  {redis_us:8.1f} us (INFO commandstats, evalsha)")


if __name__ == "__main__":
    main()
