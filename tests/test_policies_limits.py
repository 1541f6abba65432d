"""Rate limits, quotas, concurrency and message-rate limits.

The counters are pure: each test gives them the time. The policies read
``trio.current_time()``, so their tests run on the autojump clock.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio

from wsgate.config import ApiConfig
from wsgate.errors import HandshakeRejected
from wsgate.handshake import ClientRequest
from wsgate.policies.limits import (
    FixedWindow,
    LimitConcurrency,
    MessageRateLimit,
    Quota,
    QuotaByKey,
    RateLimit,
    RateLimitByKey,
    SlidingLog,
    Slots,
    TokenBucket,
)
from wsgate.policies.registry import POLICIES
from wsgate.policy import HandshakeContext, PairStats

API = ApiConfig(name="chat", path="chat", service_url="ws://127.0.0.1:9/")


def make_ctx(
    states: dict[int, Any],
    *,
    headers: list[tuple[str, str]] | None = None,
    ip: str = "192.0.2.1",
    subscription: str | None = None,
    api: ApiConfig = API,
) -> HandshakeContext:
    request = ClientRequest("GET", "/chat", [(k.lower(), v) for k, v in headers or []], ip)
    return HandshakeContext(
        request=request,
        api=api,
        backend=api.backend,
        rest="",
        query="",
        headers=[],
        states=states,
        subscription=None if subscription is None else SimpleNamespace(id=subscription),
    )


async def refused(policy: Any, ctx: HandshakeContext) -> HandshakeRejected:
    with pytest.raises(HandshakeRejected) as info:
        await policy.on_handshake(ctx)
    assert info.value.source == policy.policy_name
    return info.value


def retry_after(exc: HandshakeRejected) -> str:
    return dict(exc.headers)["Retry-After"]


def close(ctx: HandshakeContext, stats: PairStats | None = None) -> None:
    """What the gateway does when the connection ends."""
    for fn in ctx.cleanups:
        fn(stats or PairStats())


def test_registered_names() -> None:
    classes: list[tuple[str, Any]] = [
        ("rate-limit", RateLimit),
        ("rate-limit-by-key", RateLimitByKey),
        ("quota", Quota),
        ("quota-by-key", QuotaByKey),
        ("limit-concurrency", LimitConcurrency),
        ("message-rate-limit", MessageRateLimit),
    ]
    for name, cls in classes:
        assert cls.policy_name == name
        assert POLICIES[name] is cls


# --- sliding log ------------------------------------------------------------------------


def test_sliding_log_window() -> None:
    log = SlidingLog(3, 10.0)
    assert [log.hit("k", t) for t in (0.0, 1.0, 2.0)] == [0.0, 0.0, 0.0]
    assert log.hit("k", 3.0) == 7.0  # the call at 0 frees up at 10
    assert log.hit("k", 9.5) == 0.5  # refused calls do not count
    assert log.hit("k", 10.0) == 0.0  # 0 left the window exactly at 10
    assert log.hit("k", 10.5) == pytest.approx(0.5)  # now 1, 2, 10: next free at 11
    assert log.hit("other", 10.5) == 0.0  # keys are independent
    assert log.hit("k", 12.0) == 0.0  # 1 and 2 have left: 10, 12


def test_sliding_log_is_a_true_sliding_window() -> None:
    """No double burst across a boundary, unlike a fixed window."""
    log = SlidingLog(2, 10.0)
    assert log.hit("k", 9.0) == 0.0
    assert log.hit("k", 9.9) == 0.0
    assert log.hit("k", 10.1) == pytest.approx(8.9)
    assert log.hit("k", 19.0) == 0.0


def test_sliding_log_drops_idle_keys() -> None:
    log = SlidingLog(5, 10.0)
    for i in range(100):
        log.hit(f"k{i}", i * 0.01)
    assert len(log) == 100
    log.hit("late", 20.0)  # everyone else's window is empty by now
    assert len(log) == 1


def test_sliding_log_key_bound() -> None:
    log = SlidingLog(1, 100.0, max_keys=3)
    for i in range(5):
        assert log.hit(f"k{i}", float(i)) == 0.0
        assert len(log) <= 3
    assert log.hit("k4", 5.0) > 0  # still counted
    assert log.hit("k0", 5.0) == 0.0  # least recently used: forgotten, starts afresh


# --- fixed window -----------------------------------------------------------------------


def test_fixed_window_calls() -> None:
    window = FixedWindow(2, None, 60.0)
    assert window.call("k", 5.0) == 0.0  # the window opens at 5
    assert window.call("k", 6.0) == 0.0
    assert window.call("k", 20.0) == 45.0  # renews at 65
    assert window.call("k", 64.0) == 1.0
    assert window.call("k", 65.0) == 0.0  # a new window
    assert window.usage("k", 65.0).calls == 1


def test_fixed_window_bandwidth() -> None:
    window = FixedWindow(None, 100, 60.0)
    assert window.call("k", 0.0) == 0.0
    window.add_bytes("k", 99, 1.0)
    assert window.call("k", 2.0) == 0.0  # 99 < 100: not spent yet
    window.add_bytes("k", 1, 3.0)
    assert window.call("k", 4.0) == 56.0
    window.add_bytes("k", 500, 70.0)  # charged to the window open at 70
    assert window.call("k", 71.0) == 59.0


def test_fixed_window_drops_idle_keys_and_is_bounded() -> None:
    window = FixedWindow(10, None, 10.0, max_keys=50)
    for i in range(200):
        window.call(f"k{i}", 0.0)
        assert len(window) <= 50
    window.call("late", 10.0)
    assert len(window) == 1


# --- slots and token bucket -------------------------------------------------------------


def test_slots_release_once_and_drop_empty_keys() -> None:
    slots = Slots(2)
    first, second = slots.acquire("a"), slots.acquire("a")
    assert first is not None and second is not None
    assert slots.acquire("a") is None
    assert slots.acquire("b") is not None
    first()
    first()  # idempotent
    assert slots.held("a") == 1
    third = slots.acquire("a")
    assert third is not None and slots.acquire("a") is None
    second()
    third()
    assert slots.held("a") == 0 and len(slots) == 1  # only "b" remains


def test_token_bucket_messages() -> None:
    bucket = TokenBucket(messages_per_second=2, burst=2)
    assert bucket.charge(1, 0, 0.0) == 0.0
    assert bucket.charge(1, 0, 0.0) == 0.0
    assert bucket.charge(1, 0, 0.0) == 0.5  # one message in debt at 2/s
    assert bucket.charge(1, 0, 0.5) == 0.5  # the delay paid the debt; this one is new debt
    assert bucket.charge(0, 0, 100.0) == 0.0
    # a long pause refills only up to the burst
    assert [bucket.charge(1, 0, 100.0) for _ in range(3)] == [0.0, 0.0, 0.5]


def test_token_bucket_bytes_and_both() -> None:
    bucket = TokenBucket(bytes_per_second=100, burst_bytes=100)
    assert bucket.charge(1, 300, 0.0) == 2.0  # 200 bytes in debt at 100 B/s
    both = TokenBucket(messages_per_second=10, bytes_per_second=1000)
    assert both.charge(1, 1000, 0.0) == 0.0  # defaults: one second's worth of each
    assert both.charge(1, 500, 0.0) == 0.5  # the slower bucket decides
    assert both.charge(20, 0, 0.5) == 1.0  # 8 + 5 refilled, capped at 10, minus 20


def test_token_bucket_close() -> None:
    bucket = TokenBucket(messages_per_second=1, burst=3, close_on_exceed=True)
    assert [bucket.charge(1, 10, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.charge(1, 10, 0.5) is None


# --- rate-limit policies ----------------------------------------------------------------


async def test_rate_limit_429_and_retry_after(autojump_clock: Any) -> None:
    policy = RateLimit(calls=2, renewal_period=10)
    states: dict[int, Any] = {}
    await policy.on_handshake(make_ctx(states))
    await trio.sleep(0.5)
    await policy.on_handshake(make_ctx(states))
    await trio.sleep(0.7)
    exc = await refused(policy, make_ctx(states))
    assert (exc.status, exc.reason, retry_after(exc)) == (429, "RateLimitExceeded", "9")  # 8.8
    assert "9 seconds" in exc.message
    await trio.sleep(8.8)
    await policy.on_handshake(make_ctx(states))


async def test_rate_limit_per_subscription_else_ip(autojump_clock: Any) -> None:
    policy = RateLimit(calls=1, renewal_period=60)
    states: dict[int, Any] = {}
    await policy.on_handshake(make_ctx(states, subscription="s1"))
    await policy.on_handshake(make_ctx(states, subscription="s2"))
    await refused(policy, make_ctx(states, subscription="s1", ip="198.51.100.9"))
    # without a subscription: per caller IP
    await policy.on_handshake(make_ctx(states, ip="198.51.100.1"))
    await policy.on_handshake(make_ctx(states, ip="198.51.100.2"))
    exc = await refused(policy, make_ctx(states, ip="198.51.100.1"))
    assert retry_after(exc) == "60"


async def test_rate_limit_by_key(autojump_clock: Any) -> None:
    policy = RateLimitByKey(calls=1, renewal_period=5, counter_key="header:X-Tenant")
    states: dict[int, Any] = {}
    await policy.on_handshake(make_ctx(states, headers=[("X-Tenant", "acme")]))
    await policy.on_handshake(make_ctx(states, headers=[("X-Tenant", "initech")]))
    await refused(policy, make_ctx(states, headers=[("X-Tenant", "acme")], ip="203.0.113.1"))
    # callers without the header share one counter
    await policy.on_handshake(make_ctx(states))
    await refused(policy, make_ctx(states, ip="203.0.113.2"))


async def test_long_key_values_are_hashed(autojump_clock: Any) -> None:
    policy = RateLimitByKey(calls=1, renewal_period=5, counter_key="header:X-Tenant")
    states: dict[int, Any] = {}
    long_value = "t" * 10_000
    await policy.on_handshake(make_ctx(states, headers=[("X-Tenant", long_value)]))
    await refused(policy, make_ctx(states, headers=[("X-Tenant", long_value)]))
    await policy.on_handshake(make_ctx(states, headers=[("X-Tenant", long_value + "u")]))
    [(_, log)] = states.values()
    assert all(len(key) <= 128 for key in log._logs)


async def test_each_policy_instance_counts_alone(autojump_clock: Any) -> None:
    states: dict[int, Any] = {}
    first, second = RateLimit(calls=1, renewal_period=5), RateLimit(calls=1, renewal_period=5)
    await first.on_handshake(make_ctx(states))
    await second.on_handshake(make_ctx(states))


# --- quotas -----------------------------------------------------------------------------


@pytest.mark.deadline(10_000)  # virtual seconds (autojump clock)
async def test_quota_calls_403(autojump_clock: Any) -> None:
    policy = Quota(calls=2, renewal_period=3600)
    states: dict[int, Any] = {}
    await policy.on_handshake(make_ctx(states, subscription="s"))
    await trio.sleep(100)
    await policy.on_handshake(make_ctx(states, subscription="s"))
    exc = await refused(policy, make_ctx(states, subscription="s"))
    assert (exc.status, exc.reason, retry_after(exc)) == (403, "QuotaExceeded", "3500")
    await policy.on_handshake(make_ctx(states, subscription="other"))
    await trio.sleep(3500)
    await policy.on_handshake(make_ctx(states, subscription="s"))


@pytest.mark.deadline(10_000)
async def test_quota_bandwidth_counts_relayed_bytes_at_close(autojump_clock: Any) -> None:
    policy = QuotaByKey(bandwidth=1000, renewal_period=60, counter_key="ip")
    states: dict[int, Any] = {}
    first = make_ctx(states)
    await policy.on_handshake(first)
    second = make_ctx(states)
    await policy.on_handshake(second)  # nothing relayed yet
    await trio.sleep(10)
    close(first, PairStats(bytes_from_client=400, bytes_from_backend=300))
    await policy.on_handshake(make_ctx(states))  # 700 < 1000
    close(second, PairStats(bytes_from_client=100, bytes_from_backend=200))
    exc = await refused(policy, make_ctx(states))  # 1000 spent
    assert (exc.status, retry_after(exc)) == (403, "50")
    await policy.on_handshake(make_ctx(states, ip="192.0.2.99"))  # another key
    await trio.sleep(50)
    await policy.on_handshake(make_ctx(states))


async def test_quota_calls_and_bandwidth_together(autojump_clock: Any) -> None:
    policy = Quota(calls=5, bandwidth=10, renewal_period=60)
    states: dict[int, Any] = {}
    ctx = make_ctx(states)
    await policy.on_handshake(ctx)
    close(ctx, PairStats(bytes_from_client=10))
    assert (await refused(policy, make_ctx(states))).reason == "QuotaExceeded"
    calls_only = Quota(calls=5, renewal_period=60)
    ctx = make_ctx(states)
    await calls_only.on_handshake(ctx)
    assert ctx.cleanups == []  # nothing to charge at close


# --- concurrency ------------------------------------------------------------------------


async def test_limit_concurrency_holds_a_slot_until_close() -> None:
    policy = LimitConcurrency(max_count=2)  # per API by default
    states: dict[int, Any] = {}
    first, second = make_ctx(states), make_ctx(states, ip="192.0.2.2")
    await policy.on_handshake(first)
    await policy.on_handshake(second)
    exc = await refused(policy, make_ctx(states))
    assert (exc.status, exc.reason) == (429, "ConcurrencyLimitExceeded")
    other_api = ApiConfig(name="feed", path="feed", service_url="ws://127.0.0.1:9/")
    await policy.on_handshake(make_ctx(states, api=other_api))
    close(first)
    third = make_ctx(states)
    await policy.on_handshake(third)
    close(second)
    close(third)
    assert len(next(iter(states.values()))[1]) == 1  # only feed's slot is still held


async def test_limit_concurrency_by_claim() -> None:
    policy = LimitConcurrency(max_count=1, counter_key="claim:sub")
    states: dict[int, Any] = {}
    alice = make_ctx(states)
    alice.claims = {"sub": "alice"}
    await policy.on_handshake(alice)
    bob = make_ctx(states)
    bob.claims = {"sub": "bob"}
    await policy.on_handshake(bob)
    again = make_ctx(states)
    again.claims = {"sub": "alice"}
    await refused(policy, again)


# --- message-rate-limit -----------------------------------------------------------------


async def test_message_rate_limit_installs_one_limiter_per_connection() -> None:
    policy = MessageRateLimit(messages_per_second=1, burst=1)
    states: dict[int, Any] = {}
    a, b = make_ctx(states), make_ctx(states)
    await policy.on_handshake(a)
    await policy.on_handshake(b)
    assert a.message_limiter is not None and b.message_limiter is not None
    assert a.message_limiter is not b.message_limiter
    assert a.message_limiter.charge(1, 10, 0.0) == 0.0
    assert a.message_limiter.charge(1, 10, 0.0) == 1.0  # delay (the default)
    assert b.message_limiter.charge(1, 10, 0.0) == 0.0  # its own bucket


async def test_message_rate_limit_close_and_stacking() -> None:
    states: dict[int, Any] = {}
    ctx = make_ctx(states)
    await MessageRateLimit(bytes_per_second=100, on_exceed="delay").on_handshake(ctx)
    await MessageRateLimit(messages_per_second=2, burst=2, on_exceed="close").on_handshake(ctx)
    limiter = ctx.message_limiter
    assert limiter is not None
    assert limiter.charge(1, 150, 0.0) == 0.5  # bytes: 50 in debt -> delay
    assert limiter.charge(1, 0, 0.0) == 0.5  # still delayed; the message bucket is empty
    assert limiter.charge(1, 0, 0.0) is None  # a third message at once: close wins


# --- config validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "fields", "message"),
    [
        (RateLimit, {"calls": 0, "renewal_period": 10}, "calls: must be >= 1, got 0"),
        (RateLimit, {"calls": True, "renewal_period": 10}, "calls"),
        (RateLimit, {"calls": 1.5, "renewal_period": 10}, "calls"),
        (RateLimit, {"calls": 1, "renewal_period": 0}, "renewal_period: must be > 0, got 0"),
        (RateLimit, {"calls": 1, "renewal_period": float("inf")}, "renewal_period"),
        (
            RateLimitByKey,
            {"calls": 1, "renewal_period": 1, "counter_key": "cookie:x"},
            "invalid key",
        ),
        (
            RateLimitByKey,
            {"calls": 1, "renewal_period": 1, "counter_key": "header:"},
            "invalid key",
        ),
        (Quota, {"renewal_period": 10}, "calls, bandwidth or both"),
        (Quota, {"bandwidth": -5, "renewal_period": 10}, "bandwidth"),
        (QuotaByKey, {"calls": 1, "renewal_period": 10, "counter_key": "eval:1"}, "invalid key"),
        (LimitConcurrency, {"max_count": 0}, "max_count"),
        (MessageRateLimit, {}, "messages_per_second, bytes_per_second or both"),
        (MessageRateLimit, {"messages_per_second": 1, "on_exceed": "drop"}, "on_exceed"),
        (MessageRateLimit, {"bytes_per_second": 10, "burst": 5}, "burst"),
        (MessageRateLimit, {"messages_per_second": 10, "burst_bytes": 5}, "burst_bytes"),
        (MessageRateLimit, {"messages_per_second": -1}, "messages_per_second"),
    ],
)
def test_config_errors(cls: Any, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**fields)


def test_config_defaults() -> None:
    assert LimitConcurrency(max_count=3).counter_key == "api"
    assert MessageRateLimit(messages_per_second=5).on_exceed == "delay"
    assert Quota(calls=1, renewal_period=1).bandwidth is None
