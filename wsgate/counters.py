"""In-memory counters of the limits policies: pure, synchronous, time passed in.

:class:`SlidingLog` (rate-limit), :class:`FixedWindow` (quota) and
:class:`Slots` (limit-concurrency) are what one process counts with: the
policies reach them through :class:`~wsgate.cluster.store.MemoryStore`, the
default counter store. With ``[cluster]`` the same semantics run as Lua
scripts in Redis instead (:mod:`wsgate.cluster.scripts`). A leaf module: the
store and the policies both build on it, and it imports neither.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["MAX_KEYS", "FixedWindow", "SlidingLog", "Slots", "Usage"]

#: Most keys one rate-limit or quota policy remembers at a time.
MAX_KEYS = 10_000


class SlidingLog:
    """At most ``calls`` events per key in any window of ``period`` seconds.

    An exact sliding log: each admitted event's time is kept until it is
    ``period`` old (so at most ``calls`` per key). An event at time ``t``
    counts while ``now < t + period``.
    """

    def __init__(self, calls: int, period: float, *, max_keys: int = MAX_KEYS) -> None:
        self.calls, self.period, self.max_keys = calls, period, max_keys
        self._logs: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._logs)

    def hit(self, key: str, now: float) -> float:
        """Count an event for ``key`` if the window has room: 0.0 if admitted,
        else the seconds until the oldest counted event leaves the window."""
        self._prune(now)
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = deque()
            _cap(self._logs, self.max_keys)
        else:
            self._logs.move_to_end(key)
        horizon = now - self.period
        while log and log[0] <= horizon:
            log.popleft()
        if len(log) < self.calls:
            log.append(now)
            return 0.0
        return log[0] + self.period - now

    def _prune(self, now: float) -> None:
        horizon = now - self.period
        while self._logs:
            key, log = next(iter(self._logs.items()))
            if log and log[-1] > horizon:
                return
            del self._logs[key]


@attrs.define
class Usage:
    """What one key used in its current window."""

    start: float
    calls: int = 0
    bytes: int = 0


class FixedWindow:
    """Calls and/or bytes per key per fixed window of ``period`` seconds.

    A key's window opens at its first use and lasts ``period``; usage arriving
    after it ends opens the next one. A limit of None is not enforced.
    """

    def __init__(
        self,
        calls: int | None,
        nbytes: int | None,
        period: float,
        *,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.calls, self.nbytes, self.period, self.max_keys = calls, nbytes, period, max_keys
        self._usage: OrderedDict[str, Usage] = OrderedDict()

    def __len__(self) -> int:
        return len(self._usage)

    def usage(self, key: str, now: float) -> Usage:
        """The current window of ``key`` (opened now if it had none)."""
        self._prune(now)
        usage = self._usage.get(key)
        if usage is None or now >= usage.start + self.period:
            usage = self._usage[key] = Usage(now)
            _cap(self._usage, self.max_keys)
        self._usage.move_to_end(key)
        return usage

    def call(self, key: str, now: float) -> float:
        """Count one call: 0.0 if within quota, else seconds until the window renews."""
        usage = self.usage(key, now)
        spent = (self.calls is not None and usage.calls >= self.calls) or (
            self.nbytes is not None and usage.bytes >= self.nbytes
        )
        if spent:
            return usage.start + self.period - now
        usage.calls += 1
        return 0.0

    def add_bytes(self, key: str, nbytes: int, now: float) -> None:
        """Charge ``nbytes`` to the window of ``key`` current at ``now``."""
        self.usage(key, now).bytes += nbytes

    def _prune(self, now: float) -> None:
        while self._usage:
            key, usage = next(iter(self._usage.items()))
            if now < usage.start + self.period:
                return
            del self._usage[key]


def _cap(table: OrderedDict[str, Any], max_keys: int) -> None:
    while len(table) > max_keys:
        table.popitem(last=False)


class Slots:
    """At most ``max_count`` holders per key; a key exists only while held."""

    def __init__(self, max_count: int) -> None:
        self.max_count = max_count
        self._held: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._held)

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def acquire(self, key: str) -> Callable[[], None] | None:
        """Take a slot: a release function (idempotent), or None when all are taken."""
        count = self._held.get(key, 0)
        if count >= self.max_count:
            return None
        self._held[key] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._held[key] - 1
            if left:
                self._held[key] = left
            else:
                del self._held[key]

        return release
