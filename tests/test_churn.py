"""Churn (issue 6): thousands of pairs opened and closed leave nothing behind.

An in-process gateway (so that its tasks can be counted) relays ``PAIRS`` pairs,
``CONCURRENCY`` at a time, to an in-process echo backend. Every pair sends
sequence-numbered messages (whole and fragmented) and checks each echo, in
order, byte for byte; the backend checks the order of what it received. Pairs
end every way a pair can end: client close, backend close, client reset,
backend reset. Afterwards the process must be back where it started: the same
number of Trio tasks (a walk of the task tree from the root task) and of file
descriptors (/proc/self/fd), and RSS within ``RSS_GROWTH_KIB`` of the baseline.

It runs for both relay engines. ``make test`` runs 2,000 pairs per engine
(about 12 s each on 2 cores); ``make soak`` runs it with ``WSGATE_CHURN_PAIRS=10000``.
"""

from __future__ import annotations

import collections
import gc
import os
import random
from collections.abc import Mapping
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

import wsgate
from benchmarks.soak import (
    BINARY,
    TEXT,
    Backend,
    Load,
    _end,
    connect,
    count_tasks,
    fd_count,
    payload_for,
    raise_nofile,
    rss_kib,
)
from wsgate.relay import Pair

from .helpers import make_config, wait_until

PAIRS = int(os.environ.get("WSGATE_CHURN_PAIRS", "2000"))
CONCURRENCY = 100
MESSAGES = 4
RSS_GROWTH_KIB = 8 * 1024
ENDINGS = {
    "client_close": ("client_closed", 70),
    "backend_close": ("backend_closed", 10),
    "client_abort": ("client_vanished", 10),
    "backend_abort": ("backend_vanished", 10),
}


class Tally:
    """A gateway observer counting handshake statuses and disconnect ends."""

    def __init__(self) -> None:
        self.codes: collections.Counter[int] = collections.Counter()
        self.ends: collections.Counter[str] = collections.Counter()

    def handshake(self, record: Mapping[str, Any]) -> None:
        self.codes[record["response_code"]] += 1

    def disconnect(self, pair: Pair, record: Mapping[str, Any]) -> None:
        self.ends[record["end"]] += 1


async def one_pair(port: int, sid: str, ending: str, load: Load) -> None:
    shake = await connect(port, f"/echo/{sid}")
    assert shake.conn is not None, (shake.status, shake.body)
    conn = shake.conn
    try:
        payloads = [payload_for(sid, seq, 16 + 40 * seq) for seq in range(MESSAGES)]
        frames = b"".join(
            conn.message_frames(TEXT if seq % 2 else BINARY, payload, 1 + seq % 3)
            for seq, payload in enumerate(payloads)
        )
        await conn.send(frames)
        load.messages_sent += MESSAGES
        for payload in payloads:
            event = await conn.next_event()
            if (event.kind, event.payload) != ("message", payload):
                load.problem(f"{sid}: expected {payload!r}, got {event.kind} {event.payload!r}")
                return
            load.messages_checked += 1
        await _end(conn, sid, ending, load)
    finally:
        if conn.stream.socket.fileno() != -1:
            conn.abort()


async def churn(port: int, count: int, prefix: str, rng: random.Random) -> Load:
    """``count`` pairs, ``CONCURRENCY`` at a time (workers, so the test's own memory stays flat)."""
    load = Load()
    names = list(ENDINGS)
    weights = [weight for _, weight in ENDINGS.values()]
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            with trio.fail_after(10):
                await one_pair(port, f"{prefix}{i}", rng.choices(names, weights)[0], load)

    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(worker)
    return load


@pytest.mark.deadline(max(60, PAIRS // 40))
@pytest.mark.parametrize("engine", ["tasks", "reactor"])
async def test_churn_leaves_no_tasks_fds_or_memory_behind(
    nursery: trio.Nursery, engine: str
) -> None:
    raise_nofile(4 * CONCURRENCY + 1000)
    rng = random.Random(6)
    alarms: list[dict[str, Any]] = []
    with capture_logs() as logs:
        backend: Backend = await nursery.start(Backend().serve)
        tally = Tally()
        config = make_config(
            [{"name": "echo", "path": "echo", "service_url": backend.url}],
            max_connections=CONCURRENCY + 10,
            close_timeout=2,
            relay_engine=engine,
        )
        gw: wsgate.Gateway = await nursery.start(wsgate.Gateway(config, observers=[tally]).run)
        port = gw.addresses[0][1]

        def sift() -> None:
            # The captured records are the test's memory, not the gateway's: keep
            # only what is at warning level or above, so that RSS measures the gateway.
            alarms.extend(r for r in logs if r["log_level"] not in ("info", "debug"))
            logs.clear()

        async def sift_forever() -> None:
            while True:
                sift()
                await trio.sleep(0.1)

        nursery.start_soon(sift_forever)

        async def settled() -> None:
            with trio.fail_after(10):
                await wait_until(lambda: gw.stats().active_pairs == 0 and backend.open == 0)
                await wait_until(lambda: gw.stats().handshakes_in_progress == 0)
            for _ in range(3):  # let finishing tasks exit
                await trio.sleep(0.05)
            sift()
            gc.collect()

        warm = await churn(port, 300, "warm", rng)
        assert not warm.problems
        await settled()
        tasks, fds, rss = count_tasks(), fd_count(), rss_kib()

        load = await churn(port, PAIRS, "p", rng)
        await settled()
        with trio.fail_after(5):  # tasks of pairs just closed may still be unwinding
            await wait_until(lambda: count_tasks() <= tasks, interval=0.05)
        tasks_after, fds_after, rss_after = count_tasks(), fd_count(), rss_kib()

    assert not load.problems, load.problems[:5]
    assert not backend.stats.problems, backend.stats.problems[:5]
    assert load.messages_checked == load.messages_sent == PAIRS * MESSAGES
    assert tasks_after == tasks
    assert fds_after == fds
    assert rss_after - rss < RSS_GROWTH_KIB, f"RSS grew {(rss_after - rss) / 1024:.1f} MiB"
    # Every pair ended the way its client or backend ended it, and nothing else happened.
    assert sum(load.endings.values()) == PAIRS
    expected: collections.Counter[str] = collections.Counter()
    for ending, count in (warm.endings + load.endings).items():
        expected[ENDINGS[ending][0]] += count
    assert tally.ends == expected
    assert tally.codes == {101: PAIRS + 300}
    # 1000/4000: clean closes; 1001: the gateway's after a client reset; -1: it reset itself.
    assert set(backend.stats.by_session.values()) <= {1000, 4000, 1001, -1}
    resets = [s for s in load.aborted_sessions if backend.stats.by_session.get(s) != 1001]
    assert not resets, f"backends that did not get 1001 after a client reset: {resets[:5]}"
    assert not alarms, alarms[:5]
