"""[cluster] through running gateways: several units share one real Redis.

Units are separate Gateway objects on their own ports (one process), or
``wsgate serve --workers 2`` processes. Fault tests stop or pause their own
redis-server. Timing is bounded from above only, with wide margins.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

import wsgate
from wsgate.cluster.names import counter_names
from wsgate.config import parse_config
from wsgate.errors import ConfigError
from wsgate.metrics import GatewayMetrics

from .helpers import RawClient, Response
from .redis_server import RedisServer, free_port
from .test_workers import running


def config(
    backend_url: str, redis_url: str, policies: list[dict[str, Any]], **cluster: Any
) -> dict[str, Any]:
    return {
        "gateway": {"listen": "127.0.0.1:0"},
        # A generous timeout unless a test is about it: a busy machine is no outage.
        "cluster": {"redis_url": redis_url, "timeout": 5.0, **cluster},
        "apis": [
            {"name": "echo", "path": "echo", "service_url": backend_url, "policies": policies}
        ],
    }


class Codes:
    """An Observer keeping the response codes of one unit's handshakes."""

    def __init__(self) -> None:
        self.codes: list[int] = []

    def handshake(self, record: Any) -> None:
        self.codes.append(record["response_code"])

    def disconnect(self, pair: Any, record: Any) -> None:
        pass


async def units(
    nursery: trio.Nursery, document: dict[str, Any], count: int, observers: Any = ()
) -> list[int]:
    """Start ``count`` gateways, each from its own parse of ``document``; their ports.

    ``observers`` holds one observer per unit, if given.
    """
    ports = []
    for index in range(count):
        observer = [observers[index]] if observers else []
        gateway = wsgate.Gateway(parse_config(document), observers=observer)
        await nursery.start(gateway.run)
        ports.append(gateway.addresses[0][1])
    return ports


def answered_within(handshakes: list[dict[str, Any]], timeout: float) -> int:
    """Assert every handshake was answered within ``timeout`` + 100 ms; how many waited
    for Redis (took ``timeout`` or more).

    Timed by the gateway itself: its handshake record's ``total_time`` runs from
    accepting the connection to answering it (the 503, or the 101 under "open").
    """
    assert handshakes
    seconds = [record["total_time"] / 1000 for record in handshakes]
    assert max(seconds) < timeout + 0.1, seconds
    return sum(s >= timeout for s in seconds)


async def handshake(port: int, headers: Any = None, target: str = "/echo") -> Response:
    client = await RawClient.connect(port, target, headers)
    await client.aclose()
    assert client.response is not None
    return client.response


RATE = {"policy": "rate-limit", "calls": 3, "renewal_period": 60}


async def test_two_units_share_one_rate_limit(
    nursery: trio.Nursery, echo_url: str, redis_url: str, redis_server: RedisServer
) -> None:
    ports = await units(nursery, config(echo_url, redis_url, [RATE]), 2)
    responses = [await handshake(ports[i % 2]) for i in range(12)]
    assert [r.status for r in responses] == [101] * 3 + [429] * 9
    assert all(59 <= int(r.header("retry-after") or 0) <= 60 for r in responses[3:])
    # One key per policy place and counter key; it expires with its window.
    ttl = redis_server.call("PTTL", "wsgate:rate:api:echo:0:rate-limit:ip:127.0.0.1")
    assert 0 < int(ttl.strip()[1:]) <= 60_000


async def test_parallel_bursts_on_three_units_admit_exactly_calls_per_key(
    nursery: trio.Nursery, echo_url: str, redis_url: str
) -> None:
    policies = [
        {
            "policy": "rate-limit-by-key",
            "calls": 5,
            "renewal_period": 60,
            "counter_key": "header:x-t",
        },
        {"policy": "quota-by-key", "calls": 4, "renewal_period": 60, "counter_key": "header:x-q"},
    ]
    ports = await units(nursery, config(echo_url, redis_url, policies), 3)
    statuses: dict[str, list[int]] = {"a": [], "b": [], "q": []}

    async def one(i: int, tenant: str, quota: str) -> None:
        response = await handshake(ports[i % 3], [("X-T", tenant), ("X-Q", quota)])
        statuses[tenant if quota == "shared" else "q"].append(response.status)

    async with trio.open_nursery() as burst:
        for i in range(12):
            burst.start_soon(one, i, "a", "shared")
            burst.start_soon(one, i, "b", f"own-{i}")
    # Tenant a: 5 by its rate limit, of which the shared quota (4) admits 4.
    assert sorted(statuses["a"]) == [101] * 4 + [403] + [429] * 7
    # Tenant b: 5 by its rate limit, each with a quota of its own.
    assert sorted(statuses["q"]) == [101] * 5 + [429] * 7


async def test_limit_concurrency_across_units(
    nursery: trio.Nursery, echo_url: str, redis_url: str
) -> None:
    policy = {"policy": "limit-concurrency", "max_count": 2}
    ports = await units(nursery, config(echo_url, redis_url, [policy]), 2)
    first = await RawClient.connect(ports[0])
    second = await RawClient.connect(ports[1])
    assert first.response and first.response.status == 101
    assert second.response and second.response.status == 101
    assert (await handshake(ports[0])).status == 429
    assert (await handshake(ports[1])).status == 429
    await first.close()
    await first.receive_close()
    await first.aclose()
    with trio.fail_after(10):
        while (response := await handshake(ports[1])).status != 101:
            assert response.status == 429
            await trio.sleep(0.05)  # the lease goes back when the pair's end is processed
    await second.aclose()


@pytest.mark.parametrize(
    ("table", "policy", "expected"),
    [
        ("closed", None, 503),
        ("open", None, 101),
        ("closed", "open", 101),
        ("open", "closed", 503),
    ],
)
async def test_paused_redis_is_answered_within_timeout(
    nursery: trio.Nursery,
    echo_url: str,
    own_redis: RedisServer,
    table: str,
    policy: str | None,
    expected: int,
) -> None:
    timeout = 0.3
    rate = {**RATE, **({"on_unavailable": policy} if policy else {})}
    document = config(echo_url, own_redis.url, [rate], timeout=timeout, on_unavailable=table)
    [port] = await units(nursery, document, 1)
    assert (await handshake(port)).status == 101
    own_redis.pause()
    try:
        with capture_logs() as logs:
            for _ in range(4):
                started = trio.current_time()
                response = await handshake(port)
                # Only a guard against a hang: seen from the client, the time also holds
                # connecting, this process's other tasks and a busy machine.
                assert trio.current_time() - started < timeout + 1.0
                assert response.status == expected
                if expected == 503:
                    assert response.header("retry-after") == "1"
                await trio.sleep(0.2)  # the last falls after PROBE_INTERVAL: a probe
    finally:
        own_redis.resume()
    events = [record["event"] for record in logs]
    assert events.count("cluster_redis_unavailable") == 1
    handshakes = [record for record in logs if record["event"] == "handshake"]
    assert answered_within(handshakes, timeout) >= 2  # the first, and the probe
    if expected == 503:
        assert {r["last_error_reason"] for r in handshakes} == {"ClusterUnavailable"}
    else:
        assert {r.get("cluster_unavailable") for r in handshakes} == {"rate-limit"}


async def test_redis_gone_then_back(
    nursery: trio.Nursery, echo_url: str, own_redis: RedisServer
) -> None:
    timeout = 0.5
    document = config(echo_url, own_redis.url, [RATE], timeout=timeout)
    [port] = await units(nursery, document, 1)
    assert (await handshake(port)).status == 101
    own_redis.kill()
    with capture_logs() as logs:
        started = trio.current_time()
        assert (await handshake(port)).status == 503
        assert trio.current_time() - started < timeout + 1.0  # the hang guard
        own_redis.start()  # empty: the window starts again
        with trio.fail_after(10):
            while (response := await handshake(port)).status == 503:  # noqa: ASYNC110
                await trio.sleep(0.1)  # until the next probe reaches it
    assert response.status == 101
    # Refused connections fail at once; every handshake of the outage was answered in time.
    answered_within([r for r in logs if r["event"] == "handshake"], timeout)
    assert [(await handshake(port)).status for _ in range(3)] == [101, 101, 429]


async def test_redis_errors_are_counted_in_the_metrics(
    nursery: trio.Nursery, echo_url: str, own_redis: RedisServer
) -> None:
    metrics = GatewayMetrics()
    document = config(echo_url, own_redis.url, [RATE], timeout=0.3)
    gateway = wsgate.Gateway(parse_config(document), observers=[metrics])
    metrics.attach(gateway)
    await nursery.start(gateway.run)
    port = gateway.addresses[0][1]
    assert (await handshake(port)).status == 101
    assert b"wsgate_cluster_redis_errors_total 0.0" in metrics.exposition()
    own_redis.kill()
    assert (await handshake(port)).status == 503
    assert b"wsgate_cluster_redis_errors_total 1.0" in metrics.exposition()


@pytest.mark.deadline(90)
async def test_two_workers_with_cluster_admit_exactly_3_of_12(
    echo_url: str, redis_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        f'[gateway]\nlisten = "127.0.0.1:0"\n\n[cluster]\nredis_url = "{redis_url}"\n'
        "timeout = 5.0\n\n"
        f'[[apis]]\nname = "echo"\npath = "echo"\nservice_url = "{echo_url}"\n'
        'policies = [{ policy = "rate-limit", calls = 3, renewal_period = 60 }]\n'
    )
    async with running("serve", "--config", str(path), "--workers", "2") as (process, lines):
        address = (await lines.until(lambda r: r["event"] == "workers_started"))["address"]
        port = int(address.rsplit(":", 1)[1])
        for worker in (0, 1):
            await lines.until(
                lambda r, w=worker: r["event"] == "gateway_started" and r.get("worker") == w
            )
        statuses = [(await handshake(port)).status for _ in range(12)]
        assert sorted(statuses) == [101] * 3 + [429] * 9, statuses
        await lines.until(lambda _: sum(r["event"] == "handshake" for r in lines.seen) >= 12)
        served = {r.get("worker") for r in lines.seen if r["event"] == "handshake"}
        assert served == {0, 1}, "both workers counted (SO_REUSEPORT spreads the 12)"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0


def wsgate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process: it configures structlog, which must not leak into tests."""
    command = [sys.executable, "-m", "wsgate", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_workers_without_cluster_refuse_to_start_naming_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        '[[apis]]\nname = "echo"\npath = "echo"\nservice_url = "ws://127.0.0.1:9"\n'
        'policies = [{ policy = "check-header", name = "x" },'
        ' { policy = "limit-concurrency", max_count = 1 }]\n'
    )
    done = wsgate_cli("serve", "--config", str(path), "--workers", "2")
    assert done.returncode == 1
    err = done.stderr
    assert "'limit-concurrency' (apis[0].policies[1])" in err
    assert "[cluster]" in err and "--workers 1" in err
    assert "check-header" not in err


def test_check_validates_cluster_without_connecting(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    nobody = free_port()  # nothing listens there: check must not care
    path.write_text(f'[cluster]\nredis_url = "redis://127.0.0.1:{nobody}/0"\ntimeout = 0.1\n')
    done = wsgate_cli("check", str(path))
    assert done.returncode == 0
    assert "OK" in done.stdout
    path.write_text(
        '[cluster]\nredis_url = "http://:hunter2-secret@h/0"\ntimeout = 0\n'
        'on_unavailable = "maybe"\nlease_ttl = 0.1\nprefix = "x"\n'
    )
    done = wsgate_cli("check", str(path))
    assert done.returncode == 1
    err = done.stderr.splitlines()
    assert err == [
        f"{path}: cluster.redis_url: scheme must be redis, rediss or unix, got 'http'",
        f"{path}: cluster.timeout: must be > 0, got 0.0",
        f"{path}: cluster.on_unavailable: must be one of 'closed', 'open', got 'maybe'",
        f"{path}: cluster.lease_ttl: must be >= 1, got 0.1",
        f"{path}: cluster.prefix: unknown key (did you mean 'key_prefix'?)",
    ]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://", "URL has no host"),
        ("redis://h:99999/0", "invalid URL: Port out of range 0-65535"),
        ("redis://h/zero", "database must be a number (redis://host:6379/0), got 'zero'"),
        ("unix://", "a unix:// URL needs a socket path (unix:///run/redis.sock)"),
        ("127.0.0.1:6379", "expected a redis://, rediss:// or unix:// URL"),
        ("redis://h/0#x", "must not have a fragment ('#...')"),
        ("redis://h /0", "must not contain whitespace or control characters"),
    ],
)
def test_bad_redis_urls(url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"cluster": {"redis_url": url}})
    assert info.value.problems == [f"<config>: cluster.redis_url: {reason}"]


def test_redis_url_from_the_environment_and_never_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGATE_TEST_REDIS", "rediss://:pw-0123456789@cache.internal:6380/2")
    cfg = parse_config({"cluster": {"redis_url": {"env": "WSGATE_TEST_REDIS"}}})
    assert cfg.cluster is not None
    assert cfg.cluster.redis_url.startswith("rediss://")
    assert "pw-0123456789" not in repr(cfg)
    assert cfg.cluster.display_url == "rediss://:***@cache.internal:6380/2"
    for url in ("unix:///run/redis.sock?db=1", "redis://h:6379", "redis://user:pw@h/15"):
        assert parse_config({"cluster": {"redis_url": url}}).cluster is not None


def test_counter_names_are_stable_across_parses() -> None:
    document = {
        "gateway": {"policies": [RATE]},
        "products": [{"id": "gold", "policies": [{**RATE, "calls": 9}]}],
        "apis": [
            {
                "name": "echo",
                "path": "echo",
                "service_url": "ws://127.0.0.1:9",
                "products": ["gold"],
                "policies": [{"policy": "check-header", "name": "x"}, RATE],
            }
        ],
    }
    first, second = parse_config(document), parse_config(document)
    assert (
        sorted(counter_names(first).values())
        == sorted(counter_names(second).values())
        == [
            "api:echo:0:check-header",
            "api:echo:1:rate-limit",
            "global:0:rate-limit",
            "product:gold:0:rate-limit",
        ]
    )


async def wait_listening(port: int) -> None:
    """Until a proxy the test started accepts on ``port`` (at most 10 s)."""
    with trio.fail_after(10):
        while True:
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                return
            except OSError:
                await trio.sleep(0.05)


HAPROXY = os.environ.get("WSGATE_HAPROXY", "/usr/sbin/haproxy")


@pytest.mark.deadline(60)
async def test_a_client_through_haproxy_sees_the_shared_limit(
    nursery: trio.Nursery, echo_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Debian's haproxy round-robins over two units; the limit is the units' together."""
    assert shutil.which(HAPROXY), "haproxy not found: `make test` installs it as root"
    policy = {**RATE, "calls": 4}
    seen = [Codes(), Codes()]
    ports = await units(nursery, config(echo_url, redis_url, [policy]), 2, seen)
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n"
        "  timeout server 30s\n  timeout tunnel 1h\n"
        f"frontend ws\n  bind 127.0.0.1:{front}\n  default_backend units\n"
        "backend units\n  balance roundrobin\n"
        + "".join(f"  server unit{i} 127.0.0.1:{port}\n" for i, port in enumerate(ports))
    )
    process = await trio.lowlevel.open_process([HAPROXY, "-db", "-f", str(cfg)])
    try:
        await wait_listening(front)
        statuses = [(await handshake(front)).status for _ in range(10)]
        assert statuses == [101] * 4 + [429] * 6
        # Round robin: each unit answered half, and both admitted some of the four.
        assert [len(unit.codes) for unit in seen] == [5, 5]
        assert all(101 in unit.codes for unit in seen)
    finally:
        process.kill()
        await process.wait()


@pytest.mark.deadline(60)
async def test_a_killed_unit_gives_its_concurrency_slots_back_within_lease_ttl(
    nursery: trio.Nursery, echo_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A `wsgate serve` unit holding both slots is SIGKILLed; another unit gets them back."""
    ttl = 2
    policy = {"policy": "limit-concurrency", "max_count": 2}
    document = config(echo_url, redis_url, [policy], lease_ttl=ttl)
    path = tmp_path / "gw.toml"
    path.write_text(
        f'[gateway]\nlisten = "127.0.0.1:0"\n\n[cluster]\nredis_url = "{redis_url}"\n'
        "timeout = 5.0\n"
        f'lease_ttl = {ttl}\n\n[[apis]]\nname = "echo"\npath = "echo"\n'
        f'service_url = "{echo_url}"\n'
        'policies = [{ policy = "limit-concurrency", max_count = 2 }]\n'
    )
    async with running("serve", "--config", str(path)) as (process, lines):
        started = await lines.until(lambda r: r["event"] == "gateway_started")
        killed_port = int(started["addresses"][0].rsplit(":", 1)[1])
        held = [await RawClient.connect(killed_port) for _ in range(2)]
        assert [c.response and c.response.status for c in held] == [101, 101]
        [port] = await units(nursery, document, 1)
        await trio.sleep(ttl * 1.5)  # renewed: still held past lease_ttl
        assert (await handshake(port)).status == 429
        process.kill()
        await process.wait()
        killed = trio.current_time()
        with trio.fail_after(ttl + 5):
            while (await handshake(port)).status != 101:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert trio.current_time() - killed <= ttl + 1
        for client in held:
            await client.aclose()


@pytest.mark.deadline(90)
async def test_three_separate_processes_admit_exactly_calls_between_them(
    echo_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Three `wsgate serve` processes on three ports, one Redis: each limit is exact.

    Handshakes go round-robin, then in a parallel burst: rate-limit (5), and
    quota-by-key (3 per tenant) for two tenants.
    """
    path = tmp_path / "gw.toml"
    path.write_text(
        f'[gateway]\nlisten = "127.0.0.1:0"\n\n[cluster]\nredis_url = "{redis_url}"\n'
        'timeout = 5.0\nkey_prefix = "three:"\n\n'
        f'[[apis]]\nname = "rate"\npath = "rate"\nservice_url = "{echo_url}"\n'
        'policies = [{ policy = "rate-limit", calls = 5, renewal_period = 60 }]\n\n'
        f'[[apis]]\nname = "quota"\npath = "quota"\nservice_url = "{echo_url}"\n'
        'policies = [{ policy = "quota-by-key", calls = 3, renewal_period = 60,'
        ' counter_key = "header:x-tenant" }]\n'
    )
    ports = []
    async with contextlib.AsyncExitStack() as units_:
        for _ in range(3):
            _, lines = await units_.enter_async_context(running("serve", "--config", str(path)))
            started = await lines.until(lambda r: r["event"] == "gateway_started")
            ports.append(int(started["addresses"][0].rsplit(":", 1)[1]))
        assert len(set(ports)) == 3
        rate = [(await handshake(ports[i % 3], target="/rate")).status for i in range(12)]
        assert sorted(rate) == [101] * 5 + [429] * 7, rate

        statuses: dict[str, list[int]] = {"a": [], "b": []}

        async def one(i: int, tenant: str) -> None:
            response = await handshake(ports[i % 3], [("X-Tenant", tenant)], target="/quota")
            statuses[tenant].append(response.status)

        async with trio.open_nursery() as burst:
            for i in range(9):
                burst.start_soon(one, i, "a")
                burst.start_soon(one, i, "b")
        for tenant in ("a", "b"):
            assert sorted(statuses[tenant]) == [101] * 3 + [403] * 6, (tenant, statuses)


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.mark.deadline(60)
async def test_a_client_through_nginx_sees_the_shared_limit(
    nursery: trio.Nursery, echo_url: str, redis_url: str, tmp_path: Path
) -> None:
    """docs/cluster.md's nginx configuration in front of two units: one shared limit."""
    assert os.path.exists(NGINX), "nginx not found: `make test` installs it as root"  # noqa: ASYNC240
    policy = {**RATE, "calls": 4}
    seen = [Codes(), Codes()]
    ports = await units(nursery, config(echo_url, redis_url, [policy]), 2, seen)
    front = free_port()
    (tmp_path / "tmp").mkdir()
    cfg = tmp_path / "nginx.conf"
    temp = "".join(
        f"{kind}_temp_path {tmp_path}/tmp/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # The documented upstream and location, with this test's ports and scratch paths.
    cfg.write_text(
        f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log error;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n  access_log off;\n{temp}"
        "  upstream wsgate {\n"
        + "".join(f"    server 127.0.0.1:{port};\n" for port in ports)
        + "  }\n"
        f"  server {{\n    listen 127.0.0.1:{front};\n    location / {{\n"
        "      proxy_pass http://wsgate;\n      proxy_http_version 1.1;\n"
        "      proxy_set_header Upgrade $http_upgrade;\n"
        '      proxy_set_header Connection "upgrade";\n'
        "      proxy_set_header Host $host;\n      proxy_read_timeout 1h;\n    }\n  }\n}\n"
    )
    process = await trio.lowlevel.open_process(
        [NGINX, "-p", str(tmp_path), "-c", str(cfg), "-e", str(tmp_path / "error.log")]
    )
    try:
        await wait_listening(front)
        statuses = [(await handshake(front)).status for _ in range(10)]
        assert statuses == [101] * 4 + [429] * 6
        # nginx round-robins too: both units took handshakes and admitted some.
        assert sum(len(unit.codes) for unit in seen) == 10
        assert all(101 in unit.codes for unit in seen)
    finally:
        process.kill()
        await process.wait()
