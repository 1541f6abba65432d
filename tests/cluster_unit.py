"""One unit in its own process, for the cross-process tests of tests/test_cluster_store.py.

``python -m tests.cluster_unit URL MODE ...`` counts against the Redis at URL
through :class:`~wsgate.cluster.store.RedisStore` and prints one JSON line:

* ``hits N CALLS PERIOD``: N concurrent sliding-log hits; prints how many were admitted;
* ``quota N CALLS PERIOD``: the same through the fixed window;
* ``hold N MAX TTL``: take up to N leases of a MAX-slot counter, print how many,
  then keep them (renewing) until killed.
"""

from __future__ import annotations

import json
import sys

import trio

from wsgate.cluster.redis import RedisClient
from wsgate.cluster.settings import ClusterConfig
from wsgate.cluster.store import RedisStore

POLICY = object()
NAMES = {id(POLICY): "test:0:unit"}


async def main(url: str, mode: str, count: int, limit: int, period: float) -> None:
    ttl = period if mode == "hold" else 15.0
    config = ClusterConfig(redis_url=url, timeout=5.0, lease_ttl=ttl)
    store = RedisStore(RedisClient(config), NAMES)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        admitted = 0

        async def one() -> None:
            nonlocal admitted
            if mode == "hits":
                wait = await store.sliding_log(POLICY, "k", limit, period)
            else:
                wait = await store.fixed_window(POLICY, "k", limit, None, period)
            admitted += not wait

        if mode == "hold":
            for _ in range(count):
                admitted += await store.acquire(POLICY, "k", limit) is not None
            print(json.dumps({"admitted": admitted}), flush=True)
            await trio.sleep_forever()
        async with trio.open_nursery() as hits:
            for _ in range(count):
                hits.start_soon(one)
        print(json.dumps({"admitted": admitted}), flush=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    url, mode, count, limit, period = sys.argv[1:6]
    trio.run(main, url, mode, int(count), int(limit), float(period))
