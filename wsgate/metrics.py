"""Prometheus metrics for a gateway, at no cost on the relay's hot path.

:class:`GatewayMetrics` is an :class:`~wsgate.gateway.Observer`: the gateway hands
it each handshake record and each finished pair. Message and byte totals are
never counted per frame by the metrics: the relay already counts them in plain
integers on each pair (its frame scanners), so a scrape adds the counts folded
in from pairs that have ended to a sum over the pairs still open. Nothing in the
relay changes whether metrics are on or off::

    metrics = GatewayMetrics()
    gateway = Gateway(config, observers=[metrics])
    metrics.attach(gateway)              # live pairs, capacity
    text = metrics.exposition()          # what /metrics serves

Each instance has its own :class:`prometheus_client.CollectorRegistry` (not the
process-wide one), so several gateways, or tests, never collide.
docs/metrics.md lists every metric.
"""

from __future__ import annotations

import bisect
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from .gateway import Gateway
    from .relay import Pair

__all__ = ["DURATION_BUCKETS", "MESSAGE_TYPES", "GatewayMetrics", "cluster_gauges"]

#: Upper bounds (seconds) of the handshake-duration histograms' buckets.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Values of the ``type`` label of ``wsgate_messages_total``.
MESSAGE_TYPES = ("text", "binary", "close", "ping", "pong")

_DIRECTIONS = (("client", "backend"), ("backend", "client"))


class _Histogram:
    """Bucket counts and sum of one label set (cumulated only when scraped)."""

    __slots__ = ("counts", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size  # per bucket, the last one being +Inf
        self.sum = 0.0

    def observe(self, value: float, bounds: Sequence[float]) -> None:
        self.counts[bisect.bisect_left(bounds, value)] += 1
        self.sum += value


class GatewayMetrics:
    """The gateway's Prometheus metrics: an Observer plus a custom collector.

    Pass it to ``Gateway(config, observers=[metrics])`` so it sees handshakes and
    closes, then :meth:`attach` the gateway so scrapes include open pairs
    (``serve_admin`` attaches it for you).
    """

    def __init__(self, *, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        self.registry = CollectorRegistry()
        self.gateway: Gateway | None = None
        self._bounds = tuple(sorted(buckets))
        self._attempts: dict[tuple[str, str], int] = defaultdict(int)
        self._closes: dict[tuple[str, str, str], int] = defaultdict(int)
        # Counts of pairs that have ended: (api, source, destination, type) -> n.
        self._messages: dict[tuple[str, str, str, str], int] = defaultdict(int)
        self._bytes: dict[tuple[str, str, str], int] = defaultdict(int)
        self._handshake: dict[str, _Histogram] = {}
        self._backend: dict[str, _Histogram] = {}
        # Pairs already folded in, in case a scrape sees one still listed as open.
        self._folded: weakref.WeakSet[Pair] = weakref.WeakSet()
        self.registry.register(self)

    def attach(self, gateway: Gateway) -> None:
        """Read open pairs and capacity from ``gateway`` at scrape time."""
        self.gateway = gateway

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)

    # -- Observer ------------------------------------------------------------------
    def handshake(self, record: Mapping[str, Any]) -> None:
        """Count one handshake and observe its durations."""
        api = record.get("api_id") or ""
        self._attempts[api, str(record.get("response_code"))] += 1
        total = record.get("total_time")
        if isinstance(total, int | float):
            self._observe(self._handshake, api, total / 1000)
        backend = record.get("backend_time")
        if isinstance(backend, int | float):
            self._observe(self._backend, api, backend / 1000)

    def disconnect(self, pair: Pair, record: Mapping[str, Any]) -> None:
        """Fold the finished pair's counts into the totals; count its close."""
        if pair in self._folded:
            return
        self._folded.add(pair)
        api = pair.api
        self._closes[api, str(record.get("closed_by")), str(record.get("close_code"))] += 1
        for (source, destination), (messages, nbytes) in zip(
            _DIRECTIONS, _counts(pair), strict=True
        ):
            for kind, count in zip(MESSAGE_TYPES, messages, strict=True):
                if count:
                    self._messages[api, source, destination, kind] += count
            self._bytes[api, source, destination] += nbytes

    def _observe(self, table: dict[str, _Histogram], api: str, seconds: float) -> None:
        histogram = table.get(api)
        if histogram is None:
            histogram = table[api] = _Histogram(len(self._bounds) + 1)
        histogram.observe(seconds, self._bounds)

    # -- collector -----------------------------------------------------------------
    def describe(self) -> Iterable[Metric]:
        """The metric families, without samples (for the registry's name checks)."""
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        """Every metric, with open pairs' counts added at this moment."""
        families = self._families()
        (
            attempts,
            active,
            capacity,
            in_progress,
            messages,
            nbytes,
            hs,
            backend,
            closes,
            refused,
            redis,
            config_version,
            units,
        ) = families
        for (api, code), count in sorted(self._attempts.items()):
            attempts.add_metric([api, code], count)
        for (api, closed_by, code), count in sorted(self._closes.items()):
            closes.add_metric([api, closed_by, code], count)
        message_totals = dict(self._messages)
        byte_totals = dict(self._bytes)
        per_api: dict[str, int] = {}
        open_pairs = 0
        gateway = self.gateway
        if gateway is not None:
            for api_config in gateway.config.apis:
                per_api[api_config.name] = 0
            for pair in list(gateway.pairs.values()):
                if pair in self._folded:
                    continue
                open_pairs += 1
                api = pair.api
                per_api[api] = per_api.get(api, 0) + 1
                for (source, destination), (counts, count_bytes) in zip(
                    _DIRECTIONS, _counts(pair), strict=True
                ):
                    for kind, count in zip(MESSAGE_TYPES, counts, strict=True):
                        if count:
                            key = (api, source, destination, kind)
                            message_totals[key] = message_totals.get(key, 0) + count
                    key3 = (api, source, destination)
                    byte_totals[key3] = byte_totals.get(key3, 0) + count_bytes
            if gateway.cluster is not None:
                redis.add_metric([], gateway.cluster.client.errors)
                for name, value in cluster_gauges(gateway).items():
                    (config_version if name == "config_version" else units).add_metric([], value)
            stats = gateway.stats()
            capacity.add_metric([], open_pairs / stats.capacity if stats.capacity else 0.0)
            in_progress.add_metric([], stats.handshakes_in_progress)
            for reason, count in sorted(stats.proxy_protocol_refused.items()):
                refused.add_metric([reason], count)
        for api, count in sorted(per_api.items()):
            active.add_metric([api], count)
        for (api, source, destination, kind), count in sorted(message_totals.items()):
            messages.add_metric([api, source, destination, kind], count)
        for (api, source, destination), count in sorted(byte_totals.items()):
            nbytes.add_metric([api, source, destination], count)
        for family, table in ((hs, self._handshake), (backend, self._backend)):
            for api, histogram in sorted(table.items()):
                family.add_metric([api], list(self._buckets(histogram)), histogram.sum)
        return families

    def _buckets(self, histogram: _Histogram) -> Iterator[tuple[str, float]]:
        cumulative = 0
        for bound, count in zip((*self._bounds, float("inf")), histogram.counts, strict=True):
            cumulative += count
            yield ("+Inf" if bound == float("inf") else repr(float(bound))), cumulative

    @staticmethod
    def _families() -> list[Any]:
        return [
            CounterMetricFamily(
                "wsgate_connection_attempts",
                "WebSocket handshakes by API and HTTP response code (101 = connected).",
                labels=["api", "response_code"],
            ),
            GaugeMetricFamily(
                "wsgate_connections_active", "Open client-backend pairs by API.", labels=["api"]
            ),
            GaugeMetricFamily(
                "wsgate_capacity_ratio",
                "Open pairs divided by max_connections (the platform's Capacity).",
            ),
            GaugeMetricFamily(
                "wsgate_handshakes_in_progress",
                "Client connections whose upgrade request has not been read yet.",
            ),
            CounterMetricFamily(
                "wsgate_messages",
                "Messages and control frames relayed, by API, direction and type.",
                labels=["api", "source", "destination", "type"],
            ),
            CounterMetricFamily(
                "wsgate_bytes",
                "Bytes read from one side of a pair (frame headers included).",
                labels=["api", "source", "destination"],
            ),
            HistogramMetricFamily(
                "wsgate_handshake_duration_seconds",
                "Time from accepting the client to the handshake's response.",
                labels=["api"],
            ),
            HistogramMetricFamily(
                "wsgate_backend_handshake_duration_seconds",
                "Time to connect to the backend and complete its handshake.",
                labels=["api"],
            ),
            CounterMetricFamily(
                "wsgate_closes",
                "Pairs ended, by API, who closed first and the close code logged.",
                labels=["api", "closed_by", "code"],
            ),
            CounterMetricFamily(
                "wsgate_proxy_protocol_refused",
                "Connections to a proxy_protocol listener closed unread, by reason.",
                labels=["reason"],
            ),
            CounterMetricFamily(
                "wsgate_cluster_redis_errors",
                "Redis calls of the [cluster] counters that failed or timed out.",
            ),
            GaugeMetricFamily(
                "wsgate_cluster_config_version",
                "Version of the shared configuration ([cluster]) this unit runs.",
            ),
            GaugeMetricFamily(
                "wsgate_cluster_units",
                "Live units of the cluster, as this unit last listed them.",
            ),
        ]


def cluster_gauges(gateway: Gateway) -> dict[str, float]:
    """``config_version`` and ``units`` of ``gateway``'s cluster member (those known)."""
    from .cluster.member import member_for

    member = member_for(gateway)
    if member is None:
        return {}
    gauges = {"config_version": float(member.manager.version)}
    if member.live_units is not None:
        gauges["units"] = float(member.live_units)
    return gauges


def _counts(pair: Pair) -> tuple[tuple[tuple[int, ...], int], tuple[tuple[int, ...], int]]:
    """(messages by type, bytes) read from the client, then from the backend."""
    out = []
    for side in (pair.client, pair.backend):
        s = side.scanner
        out.append(((s.text, s.binary, s.close, s.ping, s.pong), side.bytes_in))
    return out[0], out[1]
