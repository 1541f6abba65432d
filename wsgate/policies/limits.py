"""Rate limits, quotas, concurrency and message-rate limits.

The counting is done by small synchronous classes that take the time ``now``
explicitly (so tests need no clock), wrapped by the policies:

=====================  =====================  ==========================================
policy                 counter                semantics
=====================  =====================  ==========================================
rate-limit(-by-key)    :class:`SlidingLog`    at most ``calls`` handshakes in any
                                              ``renewal_period`` (exact sliding window);
                                              429 + Retry-After
quota(-by-key)         :class:`FixedWindow`   ``calls`` handshakes and/or ``bandwidth``
                                              bytes per window; 403 + Retry-After
limit-concurrency      :class:`Slots`         ``max_count`` open connections; 429
message-rate-limit     :class:`TokenBucket`   messages/bytes per second on one pair;
                                              delay the sender or close with 1008
=====================  =====================  ==========================================

The policies count through the context's counter store
(:mod:`wsgate.cluster.store`): in this process by default, where handshake
counters use ``trio.current_time()`` (monotonic: they restart with the
gateway, and a wall-clock change does not move them); with a ``[cluster]``
table, in Redis, on its clock, shared by every unit (docs/cluster.md). When
Redis does not answer in time, ``on_unavailable`` ("closed": 503 with
Retry-After; "open": admit uncounted) applies, set on the policy or else on
the table.

Memory is bounded. A sliding log keeps at most ``calls`` timestamps per key, a
window two integers per key, and both keep at most ``max_keys`` keys
(:data:`MAX_KEYS`): keys whose window has emptied are dropped as soon as they
reach the front of the least-recently-used order (checked on every access),
and past ``max_keys`` the least recently used key is forgotten even if still
counting (it starts afresh). Client-chosen key values longer than
:data:`MAX_KEY_LENGTH` are kept as their SHA-256. Concurrency slots exist only
while a connection holds them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar, Literal

import attrs

from ..cluster.settings import on_unavailable
from ..cluster.store import CounterStore, MemoryStore
from ..counters import MAX_KEYS, FixedWindow, SlidingLog, Slots
from ..errors import ClusterUnavailable, HandshakeRejected
from ..policy import HandshakeContext, MessageLimiter, PairStats
from ..validate import KeyedValueError, key_spec, number, one_of, optional
from .registry import register

__all__ = [
    "MAX_KEYS",
    "MAX_KEY_LENGTH",
    "FixedWindow",
    "LimitConcurrency",
    "MessageRateLimit",
    "Quota",
    "QuotaByKey",
    "RateLimit",
    "RateLimitByKey",
    "SlidingLog",
    "Slots",
    "TokenBucket",
]

#: Longer counter-key values are stored as their SHA-256.
MAX_KEY_LENGTH = 128


# --- the per-connection message limiter --------------------------------------------------


@attrs.define
class _Bucket:
    rate: float
    capacity: float
    tokens: float


class TokenBucket:
    """A :class:`~wsgate.policy.MessageLimiter`: messages and/or bytes per second.

    Each bucket starts full (``burst`` messages, ``burst_bytes`` bytes) and
    refills at its rate up to its capacity. Traffic is charged after it was
    relayed and may drive a bucket into debt; while any bucket is in debt,
    :meth:`charge` returns the seconds until it is paid off (``delay``), or
    None (``close``).
    """

    def __init__(
        self,
        *,
        messages_per_second: float | None = None,
        bytes_per_second: float | None = None,
        burst: float | None = None,
        burst_bytes: float | None = None,
        close_on_exceed: bool = False,
    ) -> None:
        self.close_on_exceed = close_on_exceed
        self._messages: _Bucket | None = None
        self._bytes: _Bucket | None = None
        if messages_per_second is not None:
            size = burst if burst is not None else max(1.0, messages_per_second)
            self._messages = _Bucket(messages_per_second, size, size)
        if bytes_per_second is not None:
            size = burst_bytes if burst_bytes is not None else bytes_per_second
            self._bytes = _Bucket(bytes_per_second, size, size)
        self._last: float | None = None

    def charge(self, messages: int, nbytes: int, now: float) -> float | None:
        elapsed = 0.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        delay = 0.0
        for bucket, cost in ((self._messages, messages), (self._bytes, nbytes)):
            if bucket is None:
                continue
            bucket.tokens = min(bucket.capacity, bucket.tokens + elapsed * bucket.rate) - cost
            if bucket.tokens < 0:
                delay = max(delay, -bucket.tokens / bucket.rate)
        if delay > 0 and self.close_on_exceed:
            return None
        return delay


@attrs.frozen
class _Both:
    """Two limiters on one pair (say message-rate-limit at global and API scope)."""

    first: MessageLimiter
    second: MessageLimiter

    def charge(self, messages: int, nbytes: int, now: float) -> float | None:
        a = self.first.charge(messages, nbytes, now)
        b = self.second.charge(messages, nbytes, now)
        return None if a is None or b is None else max(a, b)


# --- validators -------------------------------------------------------------------------


_positive_int = number(1, integer=True)
_positive = number(0, inclusive=False)


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def _subscription_or_ip(ctx: HandshakeContext) -> str:
    """rate-limit and quota count per subscription; anonymous callers per IP."""
    subscription = ctx.key("subscription")
    return f"subscription:{subscription}" if subscription else f"ip:{ctx.request.client_ip}"


def _by_key(ctx: HandshakeContext, spec: str) -> str:
    """The counter key; requests where it has no value share one counter ("").

    Client-chosen values (a header) can be long: past :data:`MAX_KEY_LENGTH`
    characters a key is kept as its SHA-256, so each key costs little memory.
    """
    key = ctx.key(spec) or ""
    if len(key) > MAX_KEY_LENGTH:
        return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return key


def _store(ctx: HandshakeContext) -> CounterStore:
    """The context's counter store; a context built by hand counts in its ``states``."""
    store: CounterStore | None = ctx.counter_store
    if store is None:
        store = ctx.counter_store = MemoryStore(ctx.states)
    return store


def _unavailable(policy: Any, ctx: HandshakeContext) -> None:
    """Redis did not answer: refuse with 503 ("closed") or admit uncounted ("open")."""
    mode = policy.on_unavailable or getattr(ctx.counter_store, "on_unavailable", "closed")
    if mode == "open":
        # The handshake's own log record says so; the outage is logged once by the client.
        ctx.log_fields["cluster_unavailable"] = policy.policy_name
        return
    raise HandshakeRejected(
        503,
        "Limits cannot be checked right now. Try again in 1 seconds.",
        reason="ClusterUnavailable",
        headers=[("Retry-After", "1")],
        source=policy.policy_name,
    )


# --- rate limits ------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class _RateLimitBase:
    policy_name: ClassVar[str]

    #: Counts across handshakes: with --workers N it needs [cluster] to be exact.
    counts_handshakes: ClassVar[bool] = True

    calls: int = attrs.field(validator=_positive_int)
    renewal_period: float = attrs.field(validator=_positive)
    on_unavailable: str | None = attrs.field(default=None, validator=on_unavailable)

    def _counter_key(self, ctx: HandshakeContext) -> str:
        raise NotImplementedError

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        store = _store(ctx)
        try:
            wait = await store.sliding_log(
                self, self._counter_key(ctx), self.calls, self.renewal_period
            )
        except ClusterUnavailable:
            return _unavailable(self, ctx)
        if wait:
            retry = _retry_after(wait)
            raise HandshakeRejected(
                429,
                f"Rate limit is exceeded. Try again in {retry} seconds.",
                reason="RateLimitExceeded",
                headers=[("Retry-After", retry)],
                source=self.policy_name,
            )


@register("rate-limit")
@attrs.frozen(kw_only=True)
class RateLimit(_RateLimitBase):
    """``calls`` handshakes per ``renewal_period`` seconds per subscription
    (per caller IP for handshakes without one)."""

    def _counter_key(self, ctx: HandshakeContext) -> str:
        return _subscription_or_ip(ctx)


@register("rate-limit-by-key")
@attrs.frozen(kw_only=True)
class RateLimitByKey(_RateLimitBase):
    """``calls`` handshakes per ``renewal_period`` seconds per ``counter_key``."""

    counter_key: str = attrs.field(validator=key_spec)

    def _counter_key(self, ctx: HandshakeContext) -> str:
        return _by_key(ctx, self.counter_key)


# --- quotas -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class _QuotaBase:
    policy_name: ClassVar[str]

    counts_handshakes: ClassVar[bool] = True

    calls: int | None = attrs.field(default=None, validator=optional(_positive_int))
    bandwidth: int | None = attrs.field(default=None, validator=optional(_positive_int))
    renewal_period: float = attrs.field(validator=_positive)
    on_unavailable: str | None = attrs.field(default=None, validator=on_unavailable)

    def __attrs_post_init__(self) -> None:
        if self.calls is None and self.bandwidth is None:
            raise ValueError("set calls, bandwidth or both")

    def _counter_key(self, ctx: HandshakeContext) -> str:
        raise NotImplementedError

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        store = _store(ctx)
        key = self._counter_key(ctx)
        try:
            wait = await store.fixed_window(
                self, key, self.calls, self.bandwidth, self.renewal_period
            )
        except ClusterUnavailable:
            return _unavailable(self, ctx)
        if wait:
            retry = _retry_after(wait)
            raise HandshakeRejected(
                403,
                f"Out of quota. Quota will be replenished in {retry} seconds.",
                reason="QuotaExceeded",
                headers=[("Retry-After", retry)],
                source=self.policy_name,
            )
        if self.bandwidth is not None:

            def charge(stats: PairStats) -> None:
                relayed = stats.bytes_from_client + stats.bytes_from_backend
                store.charge_bytes(self, key, relayed, self.renewal_period)

            ctx.on_close(charge)


@register("quota")
@attrs.frozen(kw_only=True)
class Quota(_QuotaBase):
    """``calls`` and/or ``bandwidth`` bytes per ``renewal_period`` per subscription
    (per caller IP for handshakes without one)."""

    def _counter_key(self, ctx: HandshakeContext) -> str:
        return _subscription_or_ip(ctx)


@register("quota-by-key")
@attrs.frozen(kw_only=True)
class QuotaByKey(_QuotaBase):
    """``calls`` and/or ``bandwidth`` bytes per ``renewal_period`` per ``counter_key``."""

    counter_key: str = attrs.field(validator=key_spec)

    def _counter_key(self, ctx: HandshakeContext) -> str:
        return _by_key(ctx, self.counter_key)


# --- concurrency ------------------------------------------------------------------------


@register("limit-concurrency")
@attrs.frozen(kw_only=True)
class LimitConcurrency:
    """At most ``max_count`` open connections per ``counter_key`` (default: per API)."""

    policy_name: ClassVar[str]
    counts_handshakes: ClassVar[bool] = True

    max_count: int = attrs.field(validator=_positive_int)
    counter_key: str = attrs.field(default="api", validator=key_spec)
    on_unavailable: str | None = attrs.field(default=None, validator=on_unavailable)

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        store = _store(ctx)
        try:
            release = await store.acquire(self, _by_key(ctx, self.counter_key), self.max_count)
        except ClusterUnavailable:
            return _unavailable(self, ctx)
        if release is None:
            raise HandshakeRejected(
                429,
                f"Too many concurrent connections (at most {self.max_count}).",
                reason="ConcurrencyLimitExceeded",
                source=self.policy_name,
            )
        ctx.on_close(lambda _stats: release())


# --- message rate -----------------------------------------------------------------------


@register("message-rate-limit")
@attrs.frozen(kw_only=True)
class MessageRateLimit:
    """Meter the client's messages on each pair with a :class:`TokenBucket`."""

    policy_name: ClassVar[str]

    messages_per_second: float | None = attrs.field(default=None, validator=optional(_positive))
    bytes_per_second: float | None = attrs.field(default=None, validator=optional(_positive))
    burst: float | None = attrs.field(default=None, validator=optional(_positive))
    burst_bytes: float | None = attrs.field(default=None, validator=optional(_positive))
    on_exceed: Literal["delay", "close"] = attrs.field(
        default="delay", validator=one_of("delay", "close")
    )

    def __attrs_post_init__(self) -> None:
        if self.messages_per_second is None and self.bytes_per_second is None:
            raise ValueError("set messages_per_second, bytes_per_second or both")
        if self.burst is not None and self.messages_per_second is None:
            raise KeyedValueError([("burst", "a burst of messages needs messages_per_second")])
        if self.burst_bytes is not None and self.bytes_per_second is None:
            raise KeyedValueError([("burst_bytes", "needs bytes_per_second")])

    def limiter(self) -> TokenBucket:
        """A fresh bucket for one connection."""
        return TokenBucket(
            messages_per_second=self.messages_per_second,
            bytes_per_second=self.bytes_per_second,
            burst=self.burst,
            burst_bytes=self.burst_bytes,
            close_on_exceed=self.on_exceed == "close",
        )

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        limiter: MessageLimiter = self.limiter()
        if ctx.message_limiter is not None:
            limiter = _Both(ctx.message_limiter, limiter)
        ctx.limit_messages(limiter)
