"""The benchmark orchestrator: ``python -m benchmarks.run [--quick] ...`` (``make bench``).

One run starts the echo backend, the load generator's worker processes and
every target, then measures, in this order:

1. load scenarios: for each scenario every target in turn (the order rotates
   from one scenario to the next), ``rounds`` times; for each target the
   round least disturbed by other processes is kept;
2. handshakes per second, each target in turn; then one handshake at a
   time, one client loop alternating between the rate-limit counted in memory
   and the same counted in Redis (what ``[cluster]`` adds, docs/cluster.md);
3. memory per idle pair, each proxy restarted fresh;
4. the TLS front end (wsgate and nginx with a trustme certificate).

It prints the markdown report and writes it, the JSON and the charts to
``benchmarks/results/`` (``--out``). Everything listens and connects on
127.0.0.1 only; every wait is bounded; every process started is killed at the
end, on error and on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import procs, stats
from .loadgen import MIN_SIZE, LoadGenerator, split
from .targets import ALL, HANDSHAKES_ONLY, OPTIONAL, PLAIN, ROOT, TLS, HAProxy, Nginx, Target

RESULTS = Path(__file__).resolve().parent / "results"
atexit.register(procs.kill_all)

Scenario = tuple[int, int, int]  # connections, message size, pipelining depth

#: The default matrix: every connection count at 32 B, each size, and depth 16
#: where pipelining matters (small messages, and the largest).
FULL_MATRIX: list[Scenario] = [
    (1, 32, 1),
    (10, 32, 1),
    (100, 32, 1),
    (1000, 32, 1),
    (10, 32, 16),
    (100, 1024, 1),
    (100, 1024, 16),
    (10, 65536, 1),
    (10, 65536, 16),
]
QUICK_MATRIX: list[Scenario] = [(1, 32, 1), (100, 32, 1), (10, 32, 16), (10, 65536, 1)]
CROSS_PRODUCT: list[Scenario] = [
    (c, s, d) for c in (1, 10, 100, 1000) for s in (32, 1024, 65536) for d in (1, 16)
]
TLS_FULL: list[Scenario] = [(100, 32, 1), (10, 65536, 1)]
TLS_QUICK: list[Scenario] = [(100, 32, 1)]
#: The targets of a quick run: the limit, both engines and the two references
#: the ratios use. Without wsgate-2w and trio-naive it fits in about a minute.
QUICK_TARGETS = ["direct", "wsgate", "wsgate-reactor", "nginx", "websockets-relay"]

#: The one-at-a-time step: the in-memory check, then the same check in Redis.
PAIRED = ("wsgate-ratelimit", "wsgate-redis")
#: The order of each pair is random, but the same from run to run.
PAIR_SEED = 17

#: Pairs held open for the memory figure (the issue asks for 10,000).
IDLE_PAIRS = 10_000


@dataclass
class Options:
    mode: str = "full"
    targets: list[str] = field(default_factory=lambda: list(PLAIN))
    scenarios: list[Scenario] = field(default_factory=lambda: list(FULL_MATRIX))
    tls_scenarios: list[Scenario] = field(default_factory=lambda: list(TLS_FULL))
    warmup: float = 1.0
    duration: float = 3.0
    rounds: int = 2
    processes: int = 2
    handshake_duration: float = 3.0
    handshake_concurrency: int = 16  # per generator process
    #: Seconds of the one-at-a-time step (both rate-limit targets, alternating; 0: skip).
    pair_duration: float = 30.0
    idle_pairs: int = IDLE_PAIRS
    tls: bool = True
    charts: bool = True
    progress: bool = True
    out_dir: Path = RESULTS
    print_report: bool = True
    #: Seconds to wait at the start for other processes' CPU use to drop (0: don't).
    quiet_wait: float = 60.0
    #: Seconds to wait for the same before each measurement (0: don't).
    quiet_step: float = 2.0


def quick_options() -> Options:
    return Options(
        mode="quick",
        targets=list(QUICK_TARGETS),
        scenarios=list(QUICK_MATRIX),
        tls_scenarios=list(TLS_QUICK),
        warmup=0.2,
        duration=0.6,
        rounds=1,
        handshake_duration=0.5,
        pair_duration=2.0,
        idle_pairs=200,
        quiet_wait=5.0,
        quiet_step=0.3,
    )


# -- measuring ---------------------------------------------------------------------------


class Probe:
    """CPU counters of the proxy, the backend, the generator and the whole machine."""

    def __init__(self, proxy: list[int], backend: list[int], generator: list[int]):
        self.groups = {"proxy": proxy, "backend": backend, "gen": generator}
        self.samples: dict[str, dict[str, float]] = {}

    def sample(self, edge: str) -> None:
        sample = {name: procs.cpu_seconds(pids) for name, pids in self.groups.items()}
        sample["proxy_sys"] = procs.cpu_split(self.groups["proxy"])[1]
        sample["system"] = procs.system_busy_seconds()
        sample["time"] = time.monotonic()
        self.samples[edge] = sample

    def cpu(self, messages: int) -> dict[str, float | None]:
        before, after = self.samples.get("from"), self.samples.get("to")
        if before is None or after is None:
            return {}
        seconds = after["time"] - before["time"]
        ours = sum(after[g] - before[g] for g in self.groups)
        others = max(0.0, after["system"] - before["system"] - ours)
        out = {
            "proxy_cpu_us_per_msg": None,
            "proxy_sys_us_per_msg": None,
            "proxy_cpu_pct": None,
            "gen_cpu_pct": stats.cpu_percent(before["gen"], after["gen"], seconds),
            "backend_cpu_pct": stats.cpu_percent(before["backend"], after["backend"], seconds),
            "other_cpu_pct": stats.cpu_percent(0.0, others, seconds),
        }
        if self.groups["proxy"]:
            out["proxy_cpu_us_per_msg"] = stats.cpu_us_per_message(
                before["proxy"], after["proxy"], messages
            )
            out["proxy_sys_us_per_msg"] = stats.cpu_us_per_message(
                before.get("proxy_sys", 0.0), after.get("proxy_sys", 0.0), messages
            )
            out["proxy_cpu_pct"] = stats.cpu_percent(before["proxy"], after["proxy"], seconds)
        return out


def _examples(results: Sequence[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for result in results:
        for text in result.get("error_examples", []):
            if text not in seen:
                seen.append(text)
    return seen[:5]


def _sum_errors(results: Sequence[dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for result in results:
        for key, value in result.get("errors", {}).items():
            total[key] = total.get(key, 0) + value
    return total


def figures(
    results: Sequence[dict[str, Any]], probe: Probe, seconds: float, size: int
) -> dict[str, Any]:
    """The figures of one measured window from the workers' results and the CPU probe."""
    messages = sum(r["messages"] for r in results)
    hist = stats.histogram([r["latency_counts"] for r in results])
    detail = _sum_errors(results)
    msgs = stats.rate(messages, seconds)
    out: dict[str, Any] = {
        "messages": messages,
        "seconds": seconds,
        "msgs_per_s": round(msgs, 1),
        "mb_per_s": round(stats.megabytes_per_second(msgs, size), 3),
        **stats.latency_summary(hist),
        "errors": sum(detail.values()),
        "error_detail": detail,
        "error_examples": _examples(results),
        "opened": sum(r.get("opened", 0) for r in results),
        "percentile_curve": stats.percentile_curve(hist),
    }
    for key, value in probe.cpu(messages).items():
        out[key] = None if value is None else round(value, 2)
    return out


class Bench:
    """One benchmark run: its processes, its targets and the report being built."""

    def __init__(self, options: Options) -> None:
        self.o = options
        self.workdir = Path(tempfile.mkdtemp(prefix="wsgate-bench-"))
        self.backend: subprocess.Popen[Any] | None = None
        self.backend_port = 0
        self.gen: LoadGenerator | None = None
        self.tls_files: dict[str, Path] | None = None
        self.ca_pem: str | None = None
        self.notes: list[str] = []
        self.bar: Any = None
        self.background: dict[str, float] = {}

    # -- set-up and tear-down ---------------------------------------------------------
    def start_backend(self) -> None:
        log = open(self.workdir / "backend.stderr", "ab")  # noqa: SIM115 - child owns it
        try:
            self.backend = procs.spawn(
                [sys.executable, "-m", "benchmarks.backend"],
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=str(ROOT),
            )
        finally:
            log.close()
        self.backend_port = int(procs.read_line(self.backend, "READY "))

    def make_tls_files(self) -> None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        files = {"cert": self.workdir / "server.pem", "key": self.workdir / "server.key"}
        cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(files["cert"]), append=True)
        cert.private_key_pem.write_to_path(str(files["key"]))
        self.tls_files = files
        self.ca_pem = ca.cert_pem.bytes().decode()

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
            self.gen = None
        procs.kill_all()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def target(self, name: str) -> Target:
        cls = ALL[name]
        return cls(self.workdir, self.backend_port, self.tls_files)

    # -- progress -----------------------------------------------------------------------
    def step(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    # -- the measurements ---------------------------------------------------------------
    def _ca(self, target: Target) -> str | None:
        return self.ca_pem if target.tls else None

    def settle(self, target: Target) -> None:
        """Give other processes on the machine a moment to leave the CPU (bounded)."""
        if self.o.quiet_step > 0 and self.gen is not None and self.backend is not None:
            own = [*target.pids(), self.backend.pid, *self.gen.pids]
            procs.wait_for_quiet_step(self.o.quiet_step, own)

    def load(self, target: Target, scenario: Scenario) -> dict[str, Any]:
        assert self.gen is not None and self.backend is not None
        self.settle(target)
        conns, size, depth = scenario
        specs = [
            {
                "url": target.url,
                "connections": n,
                "size": size,
                "depth": depth,
                "ca_pem": self._ca(target),
            }
            for n in split(conns, self.o.processes)
        ]
        probe = Probe(target.pids(), [self.backend.pid], self.gen.pids)
        began = time.monotonic()
        _, results = self.gen.run(
            "load", specs, warmup=self.o.warmup, duration=self.o.duration, window=probe.sample
        )
        out = figures(results, probe, self.o.duration, size)
        out["wall_s"] = round(time.monotonic() - began, 2)
        return out

    def handshakes(self, target: Target) -> dict[str, Any]:
        """Churn cycles against ``target``: every generator's loops at once."""
        assert self.gen is not None and self.backend is not None
        self.settle(target)
        specs = [
            {
                "url": target.url,
                "concurrency": self.o.handshake_concurrency,
                "ca_pem": self._ca(target),
                "headers": target.headers,
            }
            for _ in range(self.o.processes)
        ]
        probe = Probe(target.pids(), [self.backend.pid], self.gen.pids)
        warmup = min(0.5, self.o.warmup)
        _, results = self.gen.run(
            "handshakes",
            specs,
            warmup=warmup,
            duration=self.o.handshake_duration,
            window=probe.sample,
        )
        out = figures(results, probe, self.o.handshake_duration, 32)
        out.pop("mb_per_s", None)
        return out

    def paired_handshakes(
        self, targets: list[Target]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """One client loop in all that alternates between ``targets`` (random order per
        round): each target's figures, and what the second adds over the first.

        One loop: no queue forms, so a cycle's latency is one handshake's own.
        Alternating: both targets are measured over the same seconds, so a busy
        moment of this shared machine lands on both alike; measured one after the
        other, each would get its own moments and the difference of two tails
        would be mostly noise. Every target is up for the whole window.
        """
        assert self.gen is not None and self.backend is not None
        if self.o.quiet_step > 0:
            own = [pid for t in targets for pid in t.pids()]
            procs.wait_for_quiet_step(self.o.quiet_step, [*own, self.backend.pid, *self.gen.pids])
        headers = targets[0].headers
        assert all(t.headers == headers for t in targets), "one loop sends one set of headers"
        spec = {
            "urls": [t.url for t in targets],
            "ca_pem": self._ca(targets[0]),
            "headers": headers,
            "seed": PAIR_SEED,
        }
        idle: dict[str, Any] = {"urls": []}
        probes = [Probe(t.pids(), [self.backend.pid], self.gen.pids) for t in targets]
        # Each target is "other" to the other's probe: this one counts them all.
        both = Probe([pid for t in targets for pid in t.pids()], [self.backend.pid], self.gen.pids)

        def window(edge: str) -> None:
            for probe in [*probes, both]:
                probe.sample(edge)

        duration = self.o.pair_duration
        _, results = self.gen.run(
            "handshake_pairs",
            [spec, *[idle] * (self.o.processes - 1)],
            warmup=min(0.5, self.o.warmup),
            duration=duration,
            window=window,
        )
        others = both.cpu(0).get("other_cpu_pct")
        single = {}
        for target, probe, result in zip(targets, probes, results[0]["by_url"], strict=True):
            single[target.name] = figures([result], probe, duration, 32)
            single[target.name].pop("mb_per_s", None)
            single[target.name]["other_cpu_pct"] = None if others is None else round(others, 1)
        first, second = (single[t.name] for t in targets)
        added: dict[str, Any] = {
            "baseline": targets[0].name,
            "target": targets[1].name,
            "order": "alternating, random order per pair",
            "seconds": duration,
            "pairs": min(first["messages"], second["messages"]),
            # Processes outside this run (other sessions), in percent of one core.
            "other_cpu_pct": first["other_cpu_pct"],
        }
        for key in ("p50_us", "p99_us", "p999_us", "mean_us"):
            a, b = first.get(key), second.get(key)
            added[key] = None if a is None or b is None else round(b - a, 1)
        return single, added

    def idle(self, target: Target, pairs: int) -> dict[str, Any]:
        assert self.gen is not None
        target.restart()  # a fresh process: no heap left over from the load runs
        warm = [{"url": target.url, "connections": n} for n in split(10, self.o.processes)]
        self.gen.run("idle", warm, warmup=0, duration=0)
        time.sleep(0.5)
        before = procs.rss_bytes(target.pids())
        held: dict[str, int] = {}

        def measure(_edge: str) -> None:
            time.sleep(1.0)  # let the proxy settle (late allocations, log buffers)
            held["rss"] = procs.rss_bytes(target.pids())

        specs = [{"url": target.url, "connections": n} for n in split(pairs, self.o.processes)]
        infos, results = self.gen.run(
            "idle", specs, warmup=0, duration=0, window=measure, setup_timeout=300
        )
        opened = sum(i["opened"] for i in infos)
        detail = _sum_errors(results)
        return {
            "requested": pairs,
            "pairs": opened,
            "alive": sum(r.get("alive", 0) for r in results),
            "rss_before": before,
            "rss_after": held.get("rss"),
            "bytes_per_pair": None
            if "rss" not in held
            else round(stats.per_pair(before, held["rss"], opened) or 0.0, 1),
            "errors": sum(detail.values()),
            "error_detail": detail,
            "error_examples": _examples([*infos, *results]),
        }

    # -- the run ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        o = self.o
        available, absent = [], {}
        for name in o.targets:
            reason = ALL[name].absent()
            if reason:
                absent[name] = reason
            else:
                available.append(name)
        for name, reason in absent.items():
            self.notes.append(f"The {name} column is absent: {reason}.")
        tls_names = [n for n in TLS if n.removesuffix("-tls") in available] if o.tls else []
        idle_names = [n for n in available if ALL[n].proxy] if o.idle_pairs > 0 else []
        # e.g. wsgate-jwt, measured beside wsgate.
        hs_only = []
        if o.handshake_duration > 0:
            for name, cls in HANDSHAKES_ONLY.items():
                if cls.base not in available:
                    continue
                reason = cls.absent()  # e.g. wsgate-redis without redis-server
                if reason is None:
                    hs_only.append(name)
                else:
                    self.notes.append(f"The {name} row is absent: {reason}.")
        pairs = self.idle_pairs()
        if o.quiet_wait > 0:
            print("waiting for a quiet machine...", file=sys.stderr, flush=True)
            began = time.monotonic()
            busy = procs.wait_for_quiet(o.quiet_wait)
            self.background = {
                "cpu_pct": round(busy, 1),
                "waited_s": round(time.monotonic() - began, 1),
            }
            if busy >= 25:
                self.notes.append(
                    f"The machine was not quiet: other processes used {busy:.0f}% of a core when "
                    f"the run started, after waiting {o.quiet_wait:g} s."
                )

        self.start_backend()
        if tls_names:
            self.make_tls_files()
        self.gen = LoadGenerator(o.processes)
        # Load targets, then those measured for handshakes only.
        targets = {name: self.target(name) for name in [*available, *hs_only]}
        for target in targets.values():
            target.start()

        steps = (
            len(o.scenarios) * len(available) * o.rounds
            + (len(available) + len(hs_only) if o.handshake_duration > 0 else 0)
            + (1 if o.handshake_duration > 0 and o.pair_duration > 0 else 0)
            + len(idle_names)
            + len(tls_names) * (len(o.tls_scenarios) + (1 if o.handshake_duration > 0 else 0))
        )
        report: dict[str, Any] = {"targets": available, "load": []}
        with self.progress(steps):
            rounds: dict[tuple[Scenario, str], list[dict[str, Any]]] = {}
            for r in range(o.rounds):
                for index, scenario in enumerate(o.scenarios):
                    for name in _rotate(available, index + r):
                        self.step(f"{stats.scenario_name(*scenario)}: {name}")
                        rounds.setdefault((scenario, name), []).append(
                            self.load(targets[name], scenario)
                        )
                        self.advance()
            for scenario in o.scenarios:
                results = {}
                for name in available:
                    runs = rounds[(scenario, name)]
                    best = _pick_round(runs)
                    if len(runs) > 1:
                        best["rounds_msgs_per_s"] = [r["msgs_per_s"] for r in runs]
                    results[name] = best
                report["load"].append({"scenario": _scenario(scenario), "results": results})

            if o.handshake_duration > 0:
                hs = {}
                for name in targets:
                    self.step(f"handshakes: {name}")
                    hs[name] = self.handshakes(targets[name])
                    self.advance()
                report["handshakes"] = {"results": hs}
                # What [cluster] adds to one handshake, without a queue in front of it.
                if o.pair_duration > 0 and all(n in targets for n in PAIRED):
                    self.step("one handshake at a time: " + " / ".join(PAIRED))
                    single, added = self.paired_handshakes([targets[n] for n in PAIRED])
                    report["handshakes"]["one_at_a_time"] = single
                    report["handshakes"]["cluster_added"] = added
                    self.advance()

            if idle_names:
                idle = {}
                for name in idle_names:
                    self.step(f"{pairs:,} idle pairs: {name}")
                    idle[name] = self.idle(targets[name], pairs)
                    self.advance()
                report["idle"] = {"pairs": pairs, "results": idle}

            for target in targets.values():
                target.stop()

            if tls_names:
                report["tls"] = self.run_tls(tls_names)

        report["meta"] = self.meta(available, pairs, report)
        return report

    def run_tls(self, names: list[str]) -> dict[str, Any]:
        o = self.o
        targets = {name: self.target(name) for name in names}
        for target in targets.values():
            target.start()
        sections = []
        for index, scenario in enumerate(o.tls_scenarios):
            results = {}
            for name in _rotate(names, index):
                self.step(f"TLS {stats.scenario_name(*scenario)}: {name}")
                results[name] = self.load(targets[name], scenario)
                self.advance()
            sections.append({"scenario": _scenario(scenario), "results": results})
        hs = {}
        if o.handshake_duration > 0:
            for name in names:
                self.step(f"TLS handshakes: {name}")
                hs[name] = self.handshakes(targets[name])
                self.advance()
        for target in targets.values():
            target.stop()
        return {"targets": names, "load": sections, "handshakes": hs}

    def idle_pairs(self) -> int:
        """The pairs to hold: what was asked, within what a proxy's descriptors allow."""
        hard = procs.hard_nofile()
        fits = (hard - 200) // 2  # two descriptors per pair, and some to spare
        if self.o.idle_pairs > fits:
            self.notes.append(
                f"Idle pairs: {self.o.idle_pairs:,} were asked for, but the hard limit on open "
                f"files here is {hard:,} and cannot be raised (no CAP_SYS_RESOURCE); a proxy "
                f"holds two descriptors per pair, so {fits:,} pairs were held."
            )
            return fits
        return self.o.idle_pairs

    @contextlib.contextmanager
    def progress(self, total: int) -> Iterator[None]:
        if not self.o.progress:
            yield
            return
        try:
            import tqdm
        except ImportError:
            yield
            return
        tqdm.tqdm.monitor_interval = 0  # no monitor thread: we fork children
        with tqdm.tqdm(
            total=total,
            unit="run",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 5.0,
        ) as bar:
            self.bar = bar
            try:
                yield
            finally:
                self.bar = None

    def meta(self, available: list[str], pairs: int, report: dict[str, Any]) -> dict[str, Any]:
        o = self.o
        versions = {
            name: _version(name)
            for name in ("wsgate", "picows", "uvloop", "websockets", "trio", "hdrhistogram")
        }
        if "nginx" in available:
            versions["nginx"] = Nginx.version()
        if "haproxy" in available:
            versions["haproxy"] = HAProxy.version()
        cpu_model = _cpu_model()
        others = [
            f.get("other_cpu_pct") or 0.0
            for section in report.get("load", [])
            for f in section["results"].values()
        ]
        notes = list(self.notes)
        if others and max(others) > 20:
            notes.append(
                f"Other processes on this machine used up to {max(others):.0f}% of a core during "
                f"some runs (median {stats.median(others):.0f}%; `other_cpu_pct` in the JSON): "
                "those runs had less CPU than the others."
            )
        loop = "uvloop" if versions.get("uvloop") else "asyncio"
        summary = [
            f"Machine: {os.cpu_count()} cores ({cpu_model}), Linux {platform.release()}, "
            f"Python {platform.python_version()}.",
            f"Load generator: {o.processes} processes, picows {versions['picows']} on {loop}, "
            "closed loop, every echo checked for length and sequence number; backend: picows "
            f"echo server on {loop}, its own process.",
            f"Each scenario: {o.warmup:g} s warm-up, then {o.duration:g} s measured; targets "
            f"interleaved per scenario (order rotated), each measurement preceded by a wait of "
            f"up to {o.quiet_step:g} s for other processes to leave the CPU; {o.rounds} round(s)"
            + (
                ", keeping for each target the round least disturbed by other processes."
                if o.rounds > 1
                else "."
            ),
            "Targets: " + "; ".join(f"{n}: {ALL[n].description}" for n in available) + ".",
            "msgs/s = echoes per second; MB/s = echoed payload; latency = round trip of one "
            "message; proxy us/msg = proxy CPU time per echoed message (both directions); "
            "proxy CPU = percent of one core; ratios divide msgs/s by the reference's.",
        ]
        if o.handshake_duration > 0:
            summary.append(
                f"Handshakes: {o.processes} x {o.handshake_concurrency} concurrent loops of "
                f"connect, one echo, close, for {o.handshake_duration:g} s."
                + "".join(
                    f" {n}: {ALL[n].description}."
                    for n in report.get("handshakes", {}).get("results", {})
                    if n in HANDSHAKES_ONLY
                )
            )
            paired = report.get("handshakes", {}).get("cluster_added")
            if paired:
                added = " / ".join(
                    "-" if paired.get(k) is None else f"{paired[k]:+,.0f} us"
                    for k in ("p50_us", "p99_us", "p999_us")
                )
                summary.append(
                    f"One handshake at a time: one client loop in all, for {paired['seconds']:g} "
                    f"s, alternating between {paired['baseline']} and {paired['target']} (both "
                    "up throughout, a random order per pair), so both see the same moments of "
                    f"the machine; {paired['pairs']:,} pairs. Added by [cluster] "
                    f"(p50 / p99 / p99.9): {added}."
                    + (
                        ""
                        if paired.get("other_cpu_pct") is None
                        else f" Processes outside this run used {paired['other_cpu_pct']:.0f}% "
                        "of a core meanwhile."
                    )
                )
        if pairs and o.idle_pairs > 0:
            summary.append(f"Idle pairs: {pairs:,} per proxy, each proxy restarted before.")
        return {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": o.mode,
            "cpus": f"{os.cpu_count()} cores",
            "cpu_model": cpu_model,
            "kernel": platform.release(),
            "python": platform.python_version(),
            "versions": versions,
            "generator_processes": o.processes,
            "warmup_s": o.warmup,
            "duration_s": o.duration,
            "rounds": o.rounds,
            "handshake_duration_s": o.handshake_duration,
            "idle_pairs": pairs,
            "background_at_start": self.background,
            "scenarios": [_scenario(s) for s in o.scenarios],
            "summary": summary,
            "notes": notes,
        }


def _rotate(items: Sequence[str], by: int) -> list[str]:
    if not items:
        return []
    by %= len(items)
    return [*items[by:], *items[:by]]


def _pick_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round least disturbed by other processes (ties: the faster one).

    Other sessions may share the machine; the round during which they used the
    least CPU is the one closest to what the targets can do.
    """
    return dict(min(runs, key=lambda r: (round(r.get("other_cpu_pct") or 0.0), -r["msgs_per_s"])))


def _scenario(s: Scenario) -> dict[str, Any]:
    return {"name": stats.scenario_name(*s), "connections": s[0], "size": s[1], "depth": s[2]}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


# -- outputs -------------------------------------------------------------------------------


def write_outputs(report: dict[str, Any], out_dir: Path, charts: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    md = out_dir / "latest.md"
    md.write_text(stats.render_markdown(report))
    written.append(md)
    js = out_dir / "latest.json"
    js.write_text(json.dumps(report, indent=1) + "\n")
    written.append(js)
    if charts:
        try:
            from .charts import draw_all
        except ImportError as exc:
            print(f"charts skipped: {exc} (pip install -e '.[bench]')", file=sys.stderr)
        else:
            written += draw_all(report, out_dir)
    return written


def run(options: Options) -> dict[str, Any]:
    """Run the benchmark described by ``options``; write and return the report."""
    bench = Bench(options)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        report = bench.run()
    finally:
        bench.close()
        signal.signal(signal.SIGTERM, previous)
    write_outputs(report, options.out_dir, options.charts)
    return report


def _terminate(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")


# -- command line ------------------------------------------------------------------------


def _scenario_arg(text: str) -> Scenario:
    """``CONNECTIONSxSIZExDEPTH``, e.g. ``100x32x1`` or ``10x64Kx16``."""
    try:
        conns, size, depth = text.lower().split("x")
        size_bytes = int(size[:-1]) * 1024 if size.endswith("k") else int(size)
        scenario = (int(conns), size_bytes, int(depth))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CONNECTIONSxSIZExDEPTH, got {text!r}") from None
    if scenario[0] < 1 or scenario[2] < 1 or scenario[1] < MIN_SIZE:
        raise argparse.ArgumentTypeError(f"need >= 1 connection, depth >= 1, size >= {MIN_SIZE}")
    return scenario


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="wsgate's load benchmark (see docs/performance.md).",
    )
    p.add_argument("--quick", action="store_true", help="the one-minute subset (make bench-quick)")
    p.add_argument(
        "--targets",
        type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
        help=f"comma-separated, from: {', '.join([*PLAIN, *OPTIONAL])} "
        f"(default: {', '.join(PLAIN)})",
    )
    p.add_argument(
        "--scenario",
        action="append",
        type=_scenario_arg,
        dest="scenarios",
        metavar="CxSIZExDEPTH",
        help="a load scenario, e.g. 100x32x1 or 10x64Kx16 (repeatable; replaces the matrix)",
    )
    p.add_argument(
        "--full-matrix",
        action="store_true",
        help="every combination of 1/10/100/1000 connections, 32 B/1 KiB/64 KiB, depth 1/16",
    )
    p.add_argument("--warmup", type=float, help="seconds of warm-up per scenario")
    p.add_argument("--duration", type=float, help="measured seconds per scenario")
    p.add_argument("--rounds", type=int, help="repeat the load matrix; keep the median")
    p.add_argument("--processes", type=int, help="load generator processes (default 2)")
    p.add_argument("--handshake-duration", type=float, help="seconds; 0 skips handshakes")
    p.add_argument(
        "--pair-duration",
        type=float,
        help="seconds of one loop alternating wsgate-ratelimit and wsgate-redis "
        "(default 30; 0 skips it)",
    )
    p.add_argument("--idle-pairs", type=int, help="idle pairs per proxy; 0 skips the memory test")
    p.add_argument("--no-tls", action="store_true", help="skip the TLS front end")
    p.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, help=f"output directory (default {RESULTS})")
    p.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait at the start for other processes to leave the CPU (0: don't)",
    )
    p.add_argument(
        "--quiet-step",
        type=float,
        help="the same before each measurement (default 2, quick 1; 0: don't)",
    )
    return p


def options_from_args(args: argparse.Namespace) -> Options:
    o = quick_options() if args.quick else Options()
    if args.targets:
        unknown = [t for t in args.targets if t not in PLAIN and t not in OPTIONAL]
        if unknown:
            raise SystemExit(
                f"unknown target(s): {', '.join(unknown)}; "
                f"choose from {', '.join([*PLAIN, *OPTIONAL])}"
            )
        o.targets = args.targets
    if args.full_matrix:
        o.scenarios = list(CROSS_PRODUCT)
    if args.scenarios:
        o.scenarios = args.scenarios
    if args.targets or args.scenarios:
        o.mode = f"partial {o.mode}"  # the report's title says what was left out
    names = (
        "warmup",
        "duration",
        "rounds",
        "processes",
        "handshake_duration",
        "pair_duration",
        "idle_pairs",
    )
    for name in (*names, "quiet_wait", "quiet_step"):
        value = getattr(args, name)
        if value is not None:
            setattr(o, name, value)
    o.tls = not args.no_tls
    o.charts = not args.no_charts
    o.progress = not args.no_progress
    if args.out is not None:
        o.out_dir = args.out
    return o


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    started = time.monotonic()
    try:
        report = run(options)
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        return 130
    if options.print_report:
        print(stats.render_markdown(report))
    print(
        f"\nwritten to {options.out_dir} in {time.monotonic() - started:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
