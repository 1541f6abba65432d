"""Where an idle pair's memory goes: ``python -m benchmarks.tracemem [--pairs 2000]``.

`make bench` weighs idle pairs by RSS; this says what they are made of. It runs
a gateway in this process under ``tracemalloc``, has the load generator open
``--pairs`` idle pairs through it to the echo backend (one echo each, then
held), and compares snapshots taken before and while they are held. Each
allocation is charged to the innermost wsgate line on its stack, so Trio's
tasks, frames and epoll waiters show up under the wsgate line that made them.
"""

from __future__ import annotations

import argparse
import gc
import linecache
import sys
import tracemalloc
from collections import Counter

import structlog
import trio

import wsgate

from . import procs
from .loadgen import LoadGenerator
from .targets import ROOT

_WARM_PAIRS = 10


Site = tuple[str, int]  # (file name, line number)


def _site(trace: tracemalloc.Traceback) -> Site:
    """The innermost wsgate frame of ``trace``, else its own innermost frame."""
    for frame in reversed(trace):  # most recent call last
        if "/wsgate/" in frame.filename:
            return frame.filename, frame.lineno
    return trace[-1].filename, trace[-1].lineno


def by_site(
    before: tracemalloc.Snapshot, held: tracemalloc.Snapshot, pairs: int
) -> tuple[float, list[tuple[Site, float]]]:
    """Traced bytes per pair, and per site, largest first."""
    sites: Counter[Site] = Counter()
    for stat in held.compare_to(before, "traceback"):
        sites[_site(stat.traceback)] += stat.size_diff
    total = sum(sites.values())
    return total / pairs, [(site, size / pairs) for site, size in sites.most_common()]


def measure(pairs: int, engine: str = "tasks") -> tuple[float, list[tuple[Site, float]]]:
    """Open ``pairs`` idle pairs through an in-process gateway; see :func:`by_site`."""
    backend, backend_port = procs.echo_backend(ROOT)
    gen = LoadGenerator(1)
    try:
        return trio.run(_measure, gen, backend_port, pairs, engine)
    finally:
        gen.close()
        procs.kill(backend)


async def _measure(
    gen: LoadGenerator, backend_port: int, pairs: int, engine: str
) -> tuple[float, list[tuple[Site, float]]]:
    config = wsgate.parse_config(
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "relay_engine": engine,
                "max_connections": pairs + _WARM_PAIRS,
            },
            "apis": [
                {
                    "name": "echo",
                    "path": "echo",
                    "service_url": f"ws://127.0.0.1:{backend_port}/echo",
                }
            ],
        }
    )
    snapshots: dict[str, tracemalloc.Snapshot] = {}

    def snapshot(edge: str) -> None:
        gc.collect()
        snapshots[edge] = tracemalloc.take_snapshot()

    def drive() -> None:
        url = f"{gw.url}/echo"
        # Warm up first: caches, the reactor, log buffers are not per pair.
        gen.run("idle", [{"url": url, "connections": _WARM_PAIRS}], warmup=0, duration=0)
        snapshot("before")
        gen.run("idle", [{"url": url, "connections": pairs}], warmup=0, duration=0, window=snapshot)

    async with trio.open_nursery() as nursery:
        gw = await nursery.start(wsgate.Gateway(config).run)
        tracemalloc.start(25)
        try:
            # A thread of its own: the generator's calls block, the gateway must run.
            await trio.to_thread.run_sync(drive, abandon_on_cancel=False)
        finally:
            tracemalloc.stop()
            nursery.cancel_scope.cancel()
    return by_site(snapshots["before"], snapshots["held"], pairs)


def render(per_pair: float, sites: list[tuple[Site, float]], pairs: int, top: int) -> str:
    """A plain-text table: bytes per pair, the site, and its source line."""
    lines = [f"{pairs:,} idle pairs: {per_pair:,.0f} traced bytes per pair", ""]
    lines.append(f"{'bytes/pair':>10}  {'site (innermost wsgate line)':34}  source")
    for (filename, lineno), size in sites[:top]:
        if "/wsgate/" in filename:
            name = "wsgate/" + filename.rsplit("/wsgate/", 1)[1]
        else:
            name = filename.rsplit("/", 1)[-1]
        source = linecache.getline(filename, lineno).strip()[:60]
        lines.append(f"{size:10,.0f}  {name + ':' + str(lineno):34}  {source}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--engine", choices=("tasks", "reactor"), default="tasks")
    p.add_argument("--top", type=int, default=25, help="sites to show")
    args = p.parse_args(argv)
    # Only warnings: a log line per handshake would be traced too.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    procs.raise_nofile()
    per_pair, sites = measure(args.pairs, args.engine)
    print(render(per_pair, sites, args.pairs, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
