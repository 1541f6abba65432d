"""Prometheus metrics after a known sequence of handshakes, messages and closes."""

from __future__ import annotations

from typing import Any

import trio
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from wsgate.metrics import GatewayMetrics

from .helpers import RawClient, make_config, wait_until
from .test_admin_harness import Admin, start_admin

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(admin: Admin) -> Samples:
    async with admin.client(token=None) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    return parse(response.text)


def messages(samples: Samples, source: str, kind: str, api: str = "echo") -> float:
    destination = "backend" if source == "client" else "client"
    return value(
        samples, "wsgate_messages_total", api=api, source=source, destination=destination, type=kind
    )


def nbytes(samples: Samples, source: str, api: str = "echo") -> float:
    destination = "backend" if source == "client" else "client"
    return value(samples, "wsgate_bytes_total", api=api, source=source, destination=destination)


async def test_metrics_after_a_known_sequence(nursery: trio.Nursery, echo_url: str) -> None:
    config = make_config(
        [{"name": "echo", "path": "echo", "service_url": echo_url}], max_connections=4
    )
    admin = await start_admin(nursery, config)
    first = await RawClient.connect(admin.port)
    second = await RawClient.connect(admin.port)
    refused = await RawClient.connect(admin.port, "/nowhere")
    await refused.aclose()

    # Frames from the client: text "a", text "bb", binary "ccc", ping "p" (7+8+9+7 bytes);
    # the echo backend answers each, and the ping with a pong (3+4+5+3 bytes).
    await first.send_text("a")
    await first.send_text("bb")
    await first.send_binary(b"ccc")
    await first.send(first.proto.ping(b"p"))
    assert len(await first.receive_frames(4)) == 4

    live = await scrape(admin)
    assert value(live, "wsgate_connection_attempts_total", api="echo", response_code="101") == 2
    assert value(live, "wsgate_connection_attempts_total", api="", response_code="404") == 1
    assert value(live, "wsgate_connections_active", api="echo") == 2
    assert value(live, "wsgate_capacity_ratio") == 0.5
    kinds = ("text", "binary", "ping", "pong")
    assert [messages(live, "client", kind) for kind in kinds] == [2, 1, 1, 0]
    assert [messages(live, "backend", kind) for kind in kinds] == [2, 1, 0, 1]
    assert (nbytes(live, "client"), nbytes(live, "backend")) == (31, 15)

    # The first pair ends: its counts move from the live sum to the folded totals.
    await first.close(1000, "done")
    assert await first.receive_close() == (1000, "done")
    await first.aclose()
    await wait_until(lambda: len(admin.gateway.pairs) == 1)
    await second.send_text("x")
    assert len(await second.receive_frames(1)) == 1

    after = await scrape(admin)
    assert value(after, "wsgate_connections_active", api="echo") == 1
    assert value(after, "wsgate_capacity_ratio") == 0.25
    assert messages(after, "client", "text") == 3  # 2 folded + 1 from the open pair
    assert messages(after, "backend", "text") == 3
    assert (messages(after, "client", "close"), messages(after, "backend", "close")) == (1, 1)
    assert nbytes(after, "client") == 31 + 12 + 7  # + the close frame (2+4+2+4 "done") + "x"
    assert value(after, "wsgate_closes_total", api="echo", closed_by="client", code="1000") == 1

    # Histograms: one observation per handshake; the backend's only when one was reached.
    count = "wsgate_handshake_duration_seconds_count"
    assert value(after, count, api="echo") == 2 and value(after, count, api="") == 1
    assert value(after, "wsgate_backend_handshake_duration_seconds_count", api="echo") == 2
    assert value(after, "wsgate_backend_handshake_duration_seconds_count", api="") == 0
    assert value(after, "wsgate_handshake_duration_seconds_bucket", api="echo", le="+Inf") == 2
    assert 0 < value(after, "wsgate_handshake_duration_seconds_sum", api="echo") < 10
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in after.items()
        if name == "wsgate_handshake_duration_seconds_bucket" and dict(labels)["api"] == "echo"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative

    assert admin.gateway.terminate(next(iter(admin.gateway.pairs)), "bye")
    assert await second.receive_close() == (1008, "bye")
    await second.aclose()
    await wait_until(lambda: not admin.gateway.pairs)
    final = await scrape(admin)
    assert value(final, "wsgate_closes_total", api="echo", closed_by="gateway", code="1008") == 1
    assert value(final, "wsgate_connections_active", api="echo") == 0
    for key, number in after.items():  # counters never go down
        if key[0].endswith(("_total", "_count", "_bucket")):
            assert final.get(key, 0) >= number, key


async def test_folding_never_counts_a_pair_twice(nursery: trio.Nursery, echo_url: str) -> None:
    config = make_config([{"name": "echo", "path": "echo", "service_url": echo_url}])
    admin = await start_admin(nursery, config)
    client = await RawClient.connect(admin.port)
    await client.send_text("once")
    await client.receive_frames(1)
    pair = next(iter(admin.gateway.pairs.values()))
    record: dict[str, Any] = {"closed_by": "client", "close_code": 1000}
    admin.metrics.disconnect(pair, record)  # as if a scrape fell between fold and removal
    admin.metrics.disconnect(pair, record)
    samples = parse(admin.metrics.exposition().decode())
    assert messages(samples, "client", "text") == 1
    assert value(samples, "wsgate_closes_total", api="echo", closed_by="client", code="1000") == 1
    await client.aclose()


def test_each_instance_has_its_own_registry() -> None:
    one, two = GatewayMetrics(), GatewayMetrics()
    one.handshake({"api_id": "a", "response_code": 101, "total_time": 1.0, "backend_time": 0.5})
    assert "wsgate_connection_attempts_total" in one.exposition().decode()
    assert 'api="a"' in one.exposition().decode()
    assert 'api="a"' not in two.exposition().decode()
    assert REGISTRY.get_sample_value("wsgate_connection_attempts_total") is None
    # Without a gateway attached only the folded and handshake metrics appear.
    assert "\nwsgate_capacity_ratio " not in two.exposition().decode()
