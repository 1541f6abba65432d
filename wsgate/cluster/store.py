"""Where the counting policies count: in this process, or in Redis for every unit.

:class:`CounterStore` is what rate-limit(-by-key), quota(-by-key) and
limit-concurrency call. Two implementations:

* :class:`MemoryStore` (no ``[cluster]``): today's counters
  (:class:`~wsgate.counters.SlidingLog`, ``FixedWindow``, ``Slots``),
  one set per policy object in the gateway's state table; exact in one process.
* :class:`RedisStore` (``[cluster]``): one atomic Lua script per check
  (:mod:`.scripts`) on a :class:`~.redis.RedisClient`; exact across units.
  Concurrency slots are leases in a sorted set scored by expiry: a keeper task
  renews the leases of this unit's open pairs every ``lease_ttl / 3``
  seconds, a pair's end releases its lease, and a unit killed outright loses
  its slots within ``lease_ttl``.

Every Redis key is ``key_prefix`` + the policy's place in the config
(:func:`counter_names`: scope, position, policy name) + the counter key, so
each unit running the same config finds the same counter.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog
import trio

from ..counters import FixedWindow, SlidingLog, Slots
from ..errors import ClusterUnavailable
from . import scripts

if TYPE_CHECKING:
    from .redis import RedisClient

__all__ = ["CounterStore", "MemoryStore", "RedisStore"]

T = TypeVar("T")

#: Leases renewed or released per script call.
BATCH = 200

Release = Callable[[], None]


class CounterStore(Protocol):
    """The counting operations of the limits policies; ``policy`` names the counter.

    Times are seconds. The Redis store raises
    :class:`~wsgate.errors.ClusterUnavailable` when Redis does not answer in
    time; the memory store never does.
    """

    #: Whether the counts are shared by every unit (Redis) or this process's own.
    shared: bool

    async def sliding_log(self, policy: object, key: str, calls: int, period: float) -> float:
        """Count one event if the window has room: 0.0, else the seconds to wait."""
        ...

    async def fixed_window(
        self, policy: object, key: str, calls: int | None, nbytes: int | None, period: float
    ) -> float:
        """Count one call if the window's calls and bytes are not spent: 0.0, else
        the seconds until the window renews."""
        ...

    def charge_bytes(self, policy: object, key: str, nbytes: int, period: float) -> None:
        """Charge ``nbytes`` to the current window of ``key`` (in the background)."""
        ...

    async def acquire(self, policy: object, key: str, max_count: int) -> Release | None:
        """Take a slot: a release function (idempotent, synchronous), or None when full."""
        ...


class MemoryStore:
    """Counters in this process: one counter object per policy in ``states``.

    ``states`` is the gateway's policy-state table (``HandshakeContext.states``),
    which the gateway prunes when a policy leaves the configuration.
    """

    shared = False

    def __init__(self, states: MutableMapping[int, tuple[object, Any]]) -> None:
        self.states = states

    def _state(self, policy: object, factory: Callable[[], T]) -> T:
        entry = self.states.get(id(policy))
        if entry is None or entry[0] is not policy:
            entry = self.states[id(policy)] = (policy, factory())
        state: T = entry[1]
        return state

    async def sliding_log(self, policy: object, key: str, calls: int, period: float) -> float:
        log = self._state(policy, lambda: SlidingLog(calls, period))
        return log.hit(key, trio.current_time())

    async def fixed_window(
        self, policy: object, key: str, calls: int | None, nbytes: int | None, period: float
    ) -> float:
        window = self._state(policy, lambda: FixedWindow(calls, nbytes, period))
        return window.call(key, trio.current_time())

    def charge_bytes(self, policy: object, key: str, nbytes: int, period: float) -> None:
        window = self._state(policy, lambda: FixedWindow(None, None, period))
        window.add_bytes(key, nbytes, trio.current_time())

    async def acquire(self, policy: object, key: str, max_count: int) -> Release | None:
        slots = self._state(policy, lambda: Slots(max_count))
        return slots.acquire(key)


class RedisStore:
    """Counters in Redis, shared by every unit; run it with ``nursery.start(store.run)``.

    ``names`` maps ``id(policy)`` to its :func:`~wsgate.cluster.names.counter_names` name; a policy
    missing from it (built outside the config) is named by its settings.
    """

    shared = True

    def __init__(self, client: RedisClient, names: Mapping[int, str] | None = None) -> None:
        self.client = client
        self.names: Mapping[int, str] = dict(names or {})
        self.prefix = client.config.key_prefix
        #: What the policies do when Redis cannot answer (each may override it).
        self.on_unavailable = client.config.on_unavailable
        self.lease_ttl = client.config.lease_ttl
        self._unit = uuid.uuid4().hex  # this process's leases: "<unit>:<n>"
        self._leases = 0
        self._held: dict[str, str] = {}  # lease id -> key, renewed by the keeper
        self._releasing: dict[str, tuple[str, float]] = {}  # lease id -> (key, give up at)
        self._charges: list[tuple[str, int, float]] = []  # quota bytes to charge
        self._wake = trio.Event()
        self._log = structlog.get_logger("wsgate.cluster")

    @property
    def held(self) -> int:
        """Leases this unit holds (its open pairs under limit-concurrency)."""
        return len(self._held)

    def _key(self, kind: str, policy: object, key: str) -> str:
        name = self.names.get(id(policy))
        if name is None:
            digest = hashlib.sha256(repr(policy).encode()).hexdigest()[:16]
            name = f"unplaced:{getattr(policy, 'policy_name', '?')}:{digest}"
        return f"{self.prefix}{kind}:{name}:{key}"

    async def run(
        self, *, task_status: trio.TaskStatus[RedisStore] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the Redis client and the lease keeper until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.client.run)
            nursery.start_soon(self._keeper)
            task_status.started(self)

    async def sliding_log(self, policy: object, key: str, calls: int, period: float) -> float:
        wait = await self.client.script(
            scripts.SLIDING_LOG, [self._key("rate", policy, key)], [calls, _micros(period)]
        )
        return int(wait) / 1e6

    async def fixed_window(
        self, policy: object, key: str, calls: int | None, nbytes: int | None, period: float
    ) -> float:
        wait = await self.client.script(
            scripts.FIXED_WINDOW,
            [self._key("quota", policy, key)],
            [_limit(calls), _limit(nbytes), _micros(period), "call", 0],
        )
        return int(wait) / 1e6

    def charge_bytes(self, policy: object, key: str, nbytes: int, period: float) -> None:
        if nbytes > 0:
            # A pair's end hook is synchronous: the keeper sends the charge.
            self._charges.append((self._key("quota", policy, key), nbytes, period))
            self._wake.set()

    async def acquire(self, policy: object, key: str, max_count: int) -> Release | None:
        self._leases += 1
        lease = f"{self._unit}:{self._leases}"
        redis_key = self._key("conc", policy, key)
        try:
            taken = await self.client.script(
                scripts.ACQUIRE, [redis_key], [max_count, _millis(self.lease_ttl), lease]
            )
        except BaseException:
            # It may have been taken before the answer was lost: give it back.
            self._release(lease, redis_key)
            raise
        if not int(taken):
            return None
        self._held[lease] = redis_key
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._held.pop(lease, None)
                self._release(lease, redis_key)

        return release

    def _release(self, lease: str, redis_key: str) -> None:
        self._releasing[lease] = (redis_key, trio.current_time() + self.lease_ttl)
        self._wake.set()

    async def flush(self) -> None:
        """Send the releases still queued (at shutdown), each bounded by ``timeout``."""
        try:
            await self._send_releases()
        except ClusterUnavailable:
            pass  # they expire within lease_ttl
        await self._send_charges()

    async def _keeper(self) -> None:
        """Release ended leases at once; renew held ones every ``lease_ttl / 3``."""
        interval = self.lease_ttl / 3
        next_renewal = trio.current_time() + interval
        while True:
            with trio.move_on_at(next_renewal):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self._send_releases()
            except ClusterUnavailable:
                pass  # retried on the next round; logged by the client
            await self._send_charges()
            if trio.current_time() >= next_renewal:
                next_renewal = trio.current_time() + interval
                try:
                    await self._renew()
                except ClusterUnavailable:
                    # Soon again: a lease must not lapse because one heartbeat failed.
                    next_renewal = trio.current_time() + min(interval, 1.0)
            if self._releasing and not self.client.available:
                # Releases left for Redis to come back: try again soon, not at once.
                await trio.sleep(min(interval, 1.0))

    async def _send_releases(self) -> None:
        now = trio.current_time()
        for lease in [lease for lease, (_, until) in self._releasing.items() if until <= now]:
            del self._releasing[lease]  # expired in Redis by now anyway
        while self._releasing:
            batch = list(self._releasing.items())[:BATCH]
            await self.client.script(
                scripts.RELEASE, [key for _, (key, _) in batch], [lease for lease, _ in batch]
            )
            for lease, _ in batch:
                self._releasing.pop(lease, None)

    async def _send_charges(self) -> None:
        charges, self._charges = self._charges, []
        for redis_key, nbytes, period in charges:
            try:
                await self.client.script(
                    scripts.FIXED_WINDOW, [redis_key], [-1, -1, _micros(period), "bytes", nbytes]
                )
            except ClusterUnavailable:
                # Bytes are charged once, not retried: a retry might count them twice.
                self._log.warning("cluster_bytes_not_charged", key=redis_key, bytes=nbytes)

    async def _renew(self) -> None:
        held = list(self._held.items())
        for start in range(0, len(held), BATCH):
            batch = held[start : start + BATCH]
            await self.client.script(
                scripts.RENEW,
                [key for _, key in batch],
                [_millis(self.lease_ttl), *(lease for lease, _ in batch)],
            )


def _micros(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1_000_000))


def _millis(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _limit(value: int | None) -> int:
    return -1 if value is None else value
