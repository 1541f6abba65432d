"""``/metrics`` for every worker of ``wsgate serve --workers N`` together.

The supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory; each
worker then writes its metrics to prometheus-client's per-process files
(multiprocess mode), and whichever worker answers a scrape reads all the files
with :class:`prometheus_client.multiprocess.MultiProcessCollector`. So every
scrape reports the whole machine, whatever worker the kernel gives it.

:class:`MachineMetrics` is a :class:`~wsgate.metrics.GatewayMetrics` (the same
observer, the same in-process counts) that also writes them out:

* handshake counts and durations, and closes, as they happen;
* message and byte totals, and gauges, every :data:`SYNC_INTERVAL` seconds
  (:meth:`MachineMetrics.run`), so those lag by at most that much.

Counters and histograms are summed over the workers (a dead worker's counts
stay in). Gauges: open pairs and handshakes in progress are summed over live
workers (``livesum``); ``wsgate_capacity_ratio`` is per live worker (it has a
``pid`` label: a full worker is what it shows); ``wsgate_cluster_config_version``
is the lowest version a live worker runs (``livemin``: every worker runs at
least that one); ``wsgate_cluster_units`` the highest count (``livemax``; every
worker lists the same cluster).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .metrics import GatewayMetrics, cluster_gauges

if TYPE_CHECKING:
    from .relay import Pair

__all__ = ["MULTIPROC_ENV", "SYNC_INTERVAL", "MachineMetrics", "multiprocess_dir"]

#: The environment variable prometheus-client reads (set by the supervisor).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds between two writes of the totals and gauges that are not counted as they happen.
SYNC_INTERVAL = 0.5


def multiprocess_dir() -> str | None:
    """The multiprocess directory, when this process is a worker writing to one."""
    path = os.environ.get(MULTIPROC_ENV)
    return path if path and os.path.isdir(path) else None


class MachineMetrics(GatewayMetrics):
    """GatewayMetrics that also writes to the multiprocess files; run :meth:`run` too."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        bounds = self._bounds
        # registry=None: in multiprocess mode the values live in the files.
        self._m_attempts = Counter(
            "wsgate_connection_attempts",
            "WebSocket handshakes by API and HTTP response code (101 = connected).",
            ["api", "response_code"],
            registry=None,
        )
        self._m_closes = Counter(
            "wsgate_closes",
            "Pairs ended, by API, who closed first and the close code logged.",
            ["api", "closed_by", "code"],
            registry=None,
        )
        self._m_handshake = Histogram(
            "wsgate_handshake_duration_seconds",
            "Time from accepting the client to the handshake's response.",
            ["api"],
            buckets=bounds,
            registry=None,
        )
        self._m_backend = Histogram(
            "wsgate_backend_handshake_duration_seconds",
            "Time to connect to the backend and complete its handshake.",
            ["api"],
            buckets=bounds,
            registry=None,
        )
        self._m_messages = Counter(
            "wsgate_messages",
            "Messages and control frames relayed, by API, direction and type.",
            ["api", "source", "destination", "type"],
            registry=None,
        )
        self._m_bytes = Counter(
            "wsgate_bytes",
            "Bytes read from one side of a pair (frame headers included).",
            ["api", "source", "destination"],
            registry=None,
        )
        self._m_redis = Counter(
            "wsgate_cluster_redis_errors",
            "Redis calls of the [cluster] counters that failed or timed out.",
            registry=None,
        )
        self._m_active = Gauge(
            "wsgate_connections_active",
            "Open client-backend pairs by API.",
            ["api"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self._m_in_progress = Gauge(
            "wsgate_handshakes_in_progress",
            "Client connections whose upgrade request has not been read yet.",
            multiprocess_mode="livesum",
            registry=None,
        )
        self._m_capacity = Gauge(
            "wsgate_capacity_ratio",
            "Open pairs divided by max_connections, per worker (pid).",
            multiprocess_mode="liveall",
            registry=None,
        )
        # Made at the first value: a worker that knows none yet must not report 0.
        self._m_version: Gauge | None = None
        self._m_units: Gauge | None = None
        self._written: dict[tuple[str, tuple[str, ...]], float] = {}
        self._active_apis: set[str] = set()

    # -- Observer ------------------------------------------------------------------
    def handshake(self, record: Mapping[str, Any]) -> None:
        """Count it here and in the files."""
        super().handshake(record)
        api = record.get("api_id") or ""
        self._m_attempts.labels(api, str(record.get("response_code"))).inc()
        total = record.get("total_time")
        if isinstance(total, int | float):
            self._m_handshake.labels(api).observe(total / 1000)
        backend = record.get("backend_time")
        if isinstance(backend, int | float):
            self._m_backend.labels(api).observe(backend / 1000)

    def disconnect(self, pair: Pair, record: Mapping[str, Any]) -> None:
        """Fold it here; count its close in the files."""
        if pair not in self._folded:
            labels = (pair.api, str(record.get("closed_by")), str(record.get("close_code")))
            self._m_closes.labels(*labels).inc()
        super().disconnect(pair, record)

    # -- the files -----------------------------------------------------------------
    def exposition(self) -> bytes:
        """Every worker's metrics together (what ``/metrics`` serves)."""
        self.sync()
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def sync(self) -> None:
        """Write the totals counted from pairs, and the gauges, to this worker's files."""
        active: set[str] = set()
        for family in self.collect():
            name = family.name
            for sample in family.samples:
                labels = tuple(sample.labels.values())
                if name in ("wsgate_messages", "wsgate_bytes", "wsgate_cluster_redis_errors"):
                    if not sample.name.endswith("_total"):
                        continue
                    counter = {
                        "wsgate_messages": self._m_messages,
                        "wsgate_bytes": self._m_bytes,
                        "wsgate_cluster_redis_errors": self._m_redis,
                    }[name]
                    # Totals only grow: write what is new since the last sync.
                    done = self._written.get((name, labels), 0.0)
                    if sample.value > done:
                        (counter.labels(*labels) if labels else counter).inc(sample.value - done)
                        self._written[name, labels] = sample.value
                elif name == "wsgate_connections_active":
                    self._m_active.labels(*labels).set(sample.value)
                    active.update(labels)
                elif name == "wsgate_handshakes_in_progress":
                    self._m_in_progress.set(sample.value)
                elif name == "wsgate_capacity_ratio":
                    self._m_capacity.set(sample.value)
        for api in self._active_apis - active:  # an API that left the config
            self._m_active.labels(api).set(0)
        self._active_apis = active
        if self.gateway is not None and self.gateway.config.cluster is not None:
            gauges = cluster_gauges(self.gateway)
            if "config_version" in gauges:
                if self._m_version is None:
                    self._m_version = Gauge(
                        "wsgate_cluster_config_version",
                        "Lowest version of the shared configuration a live worker runs.",
                        multiprocess_mode="livemin",
                        registry=None,
                    )
                self._m_version.set(gauges["config_version"])
            if "units" in gauges:
                if self._m_units is None:
                    self._m_units = Gauge(
                        "wsgate_cluster_units",
                        "Live units of the cluster, as the workers last listed them.",
                        multiprocess_mode="livemax",
                        registry=None,
                    )
                self._m_units.set(gauges["units"])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write the totals and gauges every :data:`SYNC_INTERVAL` seconds until cancelled."""
        task_status.started()
        while True:
            self.sync()
            await trio.sleep(SYNC_INTERVAL)
