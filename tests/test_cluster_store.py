"""The counter stores against a real redis-server: semantics, atomicity, leases, faults.

Exactness is checked the way it fails in practice: many Trio tasks in one
unit, and several units in separate processes, hitting one counter at once.
Timing is only ever bounded from above, with wide margins (the machine is busy).
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import structlog.testing
import trio

from wsgate.cluster.redis import RedisClient
from wsgate.cluster.resp import RespConnection
from wsgate.cluster.settings import ClusterConfig
from wsgate.cluster.store import CounterStore, MemoryStore, RedisStore
from wsgate.errors import ClusterUnavailable

from . import helpers
from .redis_server import RedisServer, free_port

POLICY = object()
NAMES = {id(POLICY): "test:0:unit"}  # the name tests/cluster_unit.py uses too


async def eventually(check: Callable[[], Awaitable[Any]], interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns a true value (the caller bounds the wait)."""
    while not (result := await check()):  # noqa: ASYNC110
        await trio.sleep(interval)
    return result


async def start_store(nursery: trio.Nursery, url: str, **settings: float | str) -> RedisStore:
    config = ClusterConfig(redis_url=url, **settings)  # type: ignore[arg-type]
    store = RedisStore(RedisClient(config), NAMES)
    started: RedisStore = await nursery.start(store.run)
    return started


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest, nursery: trio.Nursery
) -> AsyncIterator[CounterStore]:
    """The same semantics from both stores."""
    if request.param == "memory":
        yield MemoryStore({})
    else:
        url = request.getfixturevalue("redis_url")
        yield await start_store(nursery, url, timeout=5.0)


async def test_sliding_log_admits_calls_then_says_how_long_to_wait(store: CounterStore) -> None:
    assert [await store.sliding_log(POLICY, "a", 3, 60) for _ in range(3)] == [0, 0, 0]
    wait = await store.sliding_log(POLICY, "a", 3, 60)
    assert 59 < wait <= 60
    assert await store.sliding_log(POLICY, "b", 3, 60) == 0  # another key, its own log


async def test_sliding_log_window_slides(store: CounterStore) -> None:
    assert await store.sliding_log(POLICY, "a", 1, 0.3) == 0
    assert await store.sliding_log(POLICY, "a", 1, 0.3) > 0
    await trio.sleep(0.4)
    assert await store.sliding_log(POLICY, "a", 1, 0.3) == 0


async def test_fixed_window_counts_calls_and_bytes(store: CounterStore) -> None:
    assert await store.fixed_window(POLICY, "a", 2, None, 60) == 0
    assert await store.fixed_window(POLICY, "a", 2, None, 60) == 0
    assert 59 < await store.fixed_window(POLICY, "a", 2, None, 60) <= 60
    # Bytes: a window whose bandwidth is spent refuses the next call.
    assert await store.fixed_window(POLICY, "b", None, 100, 60) == 0
    store.charge_bytes(POLICY, "b", 150, 60)
    with trio.fail_after(5):  # the Redis store charges in the background
        await eventually(lambda: store.fixed_window(POLICY, "b", None, 100, 60))


async def test_fixed_window_renews(store: CounterStore) -> None:
    assert await store.fixed_window(POLICY, "a", 1, None, 0.3) == 0
    assert await store.fixed_window(POLICY, "a", 1, None, 0.3) > 0
    await trio.sleep(0.4)
    assert await store.fixed_window(POLICY, "a", 1, None, 0.3) == 0


async def test_slots_are_taken_and_given_back(store: CounterStore) -> None:
    first = await store.acquire(POLICY, "a", 2)
    second = await store.acquire(POLICY, "a", 2)
    assert first is not None and second is not None
    assert await store.acquire(POLICY, "a", 2) is None
    assert await store.acquire(POLICY, "b", 2) is not None
    first()
    first()  # idempotent: the slot is given back once
    with trio.fail_after(5):  # the Redis store releases in the background
        third = await eventually(lambda: store.acquire(POLICY, "a", 2))
    assert await store.acquire(POLICY, "a", 2) is None
    second()
    third()


async def test_many_tasks_at_once_admit_exactly_calls(
    redis_url: str, nursery: trio.Nursery
) -> None:
    store = await start_store(nursery, redis_url, timeout=5.0)
    results: list[float] = []
    leases: list[object] = []

    async def hit() -> None:
        results.append(await store.sliding_log(POLICY, "k", 17, 60))
        results.append(await store.fixed_window(POLICY, "q", 17, None, 60))
        leases.append(await store.acquire(POLICY, "c", 17))

    async with trio.open_nursery() as tasks:
        for _ in range(60):
            tasks.start_soon(hit)
    assert results.count(0) == 34  # 17 of each
    assert sum(lease is not None for lease in leases) == 17


async def unit(url: str, *args: object) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.cluster_unit", url, *map(str, args)], stdout=-1
    )


async def admitted(process: trio.Process) -> int:
    assert process.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await process.stdout.receive_some(4096)
        assert chunk, "the unit ended without a result"
        line += chunk
    count: int = json.loads(line)["admitted"]
    return count


@pytest.mark.deadline(60)
@pytest.mark.parametrize("mode", ["hits", "quota"])
async def test_three_processes_admit_exactly_calls(redis_url: str, mode: str) -> None:
    units = [await unit(redis_url, mode, 30, 40, 60) for _ in range(3)]
    try:
        counts = [await admitted(process) for process in units]
        assert sum(counts) == 40, counts
    finally:
        for process in units:
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
            await process.wait()


@pytest.mark.deadline(60)
async def test_a_killed_unit_loses_its_leases_within_lease_ttl(
    redis_url: str, nursery: trio.Nursery
) -> None:
    ttl = 2.0
    holder = await unit(redis_url, "hold", 3, 3, ttl)
    try:
        assert await admitted(holder) == 3
        store = await start_store(nursery, redis_url, timeout=5.0, lease_ttl=ttl)
        # Held and renewed: past several lease_ttl no slot comes free.
        await trio.sleep(ttl * 1.5)
        assert await store.acquire(POLICY, "k", 3) is None
        holder.kill()
        await holder.wait()
        killed = trio.current_time()
        with trio.fail_after(ttl + 5):  # generous: the bound checked is lease_ttl (+1 s)
            await eventually(lambda: store.acquire(POLICY, "k", 3))
        assert trio.current_time() - killed <= ttl + 1
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()


async def available(store: RedisStore) -> bool:
    return store.client.available


async def zcard(server: RedisServer, expected: int) -> bool:
    """Whether the test counter's lease set holds ``expected`` leases."""
    return server.call("ZCARD", "wsgate:conc:test:0:unit:k") == f":{expected}\r\n".encode()


async def test_checks_one_at_a_time_reuse_one_connection(
    redis_url: str, nursery: trio.Nursery
) -> None:
    # A connection per check would add a TCP handshake (and Redis's accept) to each.
    store = await start_store(nursery, redis_url, timeout=5.0)
    assert await store.sliding_log(POLICY, "k", 1000, 60) == 0
    info = await RespConnection.open(redis_url)
    try:
        before = await _connections_received(info)
        for _ in range(50):
            assert await store.sliding_log(POLICY, "k", 1000, 60) == 0
        assert await _connections_received(info) == before
    finally:
        await info.aclose()


async def _connections_received(conn: RespConnection) -> int:
    stats = await conn.call("INFO", "stats")
    [value] = [line.split(":")[1] for line in stats.split() if "total_connections_received" in line]
    return int(value)


# --- faults: this test's own Redis, stopped, paused, restarted ------------------------------


async def test_paused_redis_times_out_within_timeout_and_logs_once(
    own_redis: RedisServer, nursery: trio.Nursery
) -> None:
    timeout = 0.3
    store = await start_store(nursery, own_redis.url, timeout=timeout)
    assert await store.sliding_log(POLICY, "k", 100, 60) == 0
    own_redis.pause()
    try:
        with structlog.testing.capture_logs() as logs:
            took = []
            for _ in range(5):
                started = trio.current_time()
                with pytest.raises(ClusterUnavailable):
                    await store.sliding_log(POLICY, "k", 100, 60)
                took.append(trio.current_time() - started)
                await trio.sleep(0.2)  # later ones fall after PROBE_INTERVAL: probes
            # Timed around the call itself (no client, no handshake): timeout + 100 ms.
            assert max(took) < timeout + 0.1, took
            assert sum(t >= timeout for t in took) >= 2, took  # the first, and a probe
            assert store.client.errors >= 1
            assert not store.client.available
    finally:
        own_redis.resume()
    events = [record["event"] for record in logs]
    assert events.count("cluster_redis_unavailable") == 1  # once per outage
    with structlog.testing.capture_logs() as logs:
        with trio.fail_after(5):
            while True:
                try:
                    assert await store.sliding_log(POLICY, "k", 100, 60) == 0
                    break
                except ClusterUnavailable:
                    await trio.sleep(0.1)  # the next probe gets through
    assert [r["event"] for r in logs] == ["cluster_redis_recovered"]
    assert store.client.available


async def test_stopped_redis_fails_fast_and_reconnects_after_restart(
    own_redis: RedisServer, nursery: trio.Nursery
) -> None:
    timeout = 0.5
    store = await start_store(nursery, own_redis.url, timeout=timeout)
    assert await store.sliding_log(POLICY, "k", 2, 60) == 0
    own_redis.kill()
    for _ in range(3):
        started = trio.current_time()
        with pytest.raises(ClusterUnavailable):
            await store.sliding_log(POLICY, "k", 2, 60)
        assert trio.current_time() - started < timeout + 0.1  # refused: at once
    own_redis.start()  # same port, empty (and without the scripts loaded)
    with trio.fail_after(10):
        while True:
            try:
                wait = await store.sliding_log(POLICY, "k", 2, 60)
                break
            except ClusterUnavailable:
                await trio.sleep(0.1)
    assert wait == 0
    assert store.client.available


async def test_held_leases_come_back_after_redis_lost_them(
    own_redis: RedisServer, nursery: trio.Nursery
) -> None:
    ttl = 1.5
    store = await start_store(nursery, own_redis.url, timeout=0.5, lease_ttl=ttl)
    release = await store.acquire(POLICY, "k", 1)
    assert release is not None
    own_redis.kill()
    own_redis.start()  # empty: the lease is gone from Redis, but the pair is still open
    with trio.fail_after(ttl + 10):  # the keeper re-asserts what it holds
        await eventually(lambda: zcard(own_redis, 1))
        # Redis ran the renewal; the keeper may not have read its answer (which ends
        # the outage) yet, and until then a check fails at once.
        await eventually(lambda: available(store))
    assert await store.acquire(POLICY, "k", 1) is None
    release()
    with trio.fail_after(5):
        again = await eventually(lambda: store.acquire(POLICY, "k", 1))
    again()


async def test_a_release_that_fails_is_retried(
    own_redis: RedisServer, nursery: trio.Nursery
) -> None:
    store = await start_store(nursery, own_redis.url, timeout=0.3, lease_ttl=30)
    release = await store.acquire(POLICY, "k", 1)
    assert release is not None
    own_redis.pause()
    release()  # cannot reach Redis now
    await trio.sleep(0.5)
    own_redis.resume()
    with trio.fail_after(10):
        await eventually(lambda: zcard(own_redis, 0))


async def test_the_redis_password_is_never_logged(nursery: trio.Nursery) -> None:
    password = "redis-secret-0123456789"
    helpers.SUITE_SECRETS.add(password)
    url = f"redis://:{password}@127.0.0.1:{free_port()}/0"  # nothing listens there
    store = await start_store(nursery, url, timeout=0.5)
    with structlog.testing.capture_logs() as logs, pytest.raises(ClusterUnavailable):
        await store.sliding_log(POLICY, "k", 1, 60)
    [record] = [r for r in logs if r["event"] == "cluster_redis_unavailable"]
    assert record["redis"] == f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}"
    assert password not in repr(logs) and password not in repr(store.client.config)
