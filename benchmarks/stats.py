"""Figures and the markdown report: pure functions, no I/O (unit-tested in tests/test_bench.py).

Conventions:

* latencies are microseconds, recorded into an HDR histogram (1 us .. 60 s, 3
  significant digits) from ``{microseconds: count}`` maps;
* a *message* is one echoed message: sent by the generator, relayed to the
  backend, echoed, relayed back. ``msgs/s`` counts echoes received in the
  measured window; ``MB/s`` is ``msgs/s x payload size`` (echoed payload
  bytes, 10^6 bytes per MB, frame headers not counted);
* proxy CPU per message is the proxy's user+system CPU time over the window
  divided by the messages echoed in it (both directions of a message, every
  process of the proxy: nginx's master and worker); "of which sys" is the
  kernel's part (system calls, and on loopback the TCP work of delivering to
  the peer socket), which no relay written in Python can shave off;
* a ratio is ``figure of this target / figure of the reference target``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 60_000_000
SIGNIFICANT_DIGITS = 3
PERCENTILES = (50.0, 99.0, 99.9)

#: Targets that ratios are computed against, with their column titles.
REFERENCES = (("direct", "x direct"), ("nginx", "x nginx"), ("websockets-relay", "x ws-relay"))


# -- histograms ------------------------------------------------------------------------


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def histogram(counts: Mapping[int, int] | Iterable[Mapping[int, int]]) -> HdrHistogram:
    """An HDR histogram of ``{microseconds: count}`` (one map, or several to merge)."""
    maps = [counts] if isinstance(counts, Mapping) else list(counts)
    hist = new_histogram()
    for mapping in maps:
        for value, count in mapping.items():
            # JSON round trips turn keys into strings; clamp into the trackable range.
            hist.record_value(min(max(int(value), LOWEST_US), HIGHEST_US), int(count))
    return hist


def latency_summary(hist: HdrHistogram) -> dict[str, float | None]:
    """p50/p99/p99.9/max/mean in microseconds (None when nothing was recorded)."""
    if hist.get_total_count() == 0:
        return {"p50_us": None, "p99_us": None, "p999_us": None, "max_us": None, "mean_us": None}
    p50, p99, p999 = (hist.get_value_at_percentile(p) for p in PERCENTILES)
    return {
        "p50_us": p50,
        "p99_us": p99,
        "p999_us": p999,
        "max_us": hist.get_max_value(),
        "mean_us": round(hist.get_mean_value(), 1),
    }


def percentile_curve(hist: HdrHistogram, steps: int = 60) -> list[tuple[float, int]]:
    """(percentile, microseconds) points from p0 to about p99.99, spaced for a log chart."""
    if hist.get_total_count() == 0:
        return []
    points = []
    for i in range(steps + 1):
        # 1 - 10^(-4 i / steps): evenly spaced on a "nines" axis up to 99.99.
        pct = 100.0 * (1.0 - 10 ** (-4.0 * i / steps))
        points.append((round(pct, 4), hist.get_value_at_percentile(pct)))
    return points


# -- arithmetic ------------------------------------------------------------------------


def rate(count: float, seconds: float) -> float:
    """``count`` per second (0 for an empty window)."""
    return count / seconds if seconds > 0 else 0.0


def megabytes_per_second(messages_per_second: float, size: int) -> float:
    return messages_per_second * size / 1e6


def cpu_us_per_message(cpu_before: float, cpu_after: float, messages: int) -> float | None:
    """Microseconds of CPU per message, from CPU-seconds counters read around a window."""
    if messages <= 0:
        return None
    return (cpu_after - cpu_before) * 1e6 / messages


def cpu_percent(cpu_before: float, cpu_after: float, seconds: float) -> float | None:
    """CPU use over a window, in percent of one core."""
    if seconds <= 0:
        return None
    return (cpu_after - cpu_before) * 100.0 / seconds


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, None when either is missing or the reference is zero."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def per_pair(rss_before: int, rss_after: int, pairs: int) -> float | None:
    """Bytes of proxy memory per idle pair."""
    if pairs <= 0:
        return None
    return (rss_after - rss_before) / pairs


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- formatting ------------------------------------------------------------------------


def fmt_num(value: float | None, digits: int = 0) -> str:
    """A number with thousands separators; '-' for None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def fmt_sig(value: float | None) -> str:
    """A number with about three significant digits ('-' for None)."""
    if value is None:
        return "-"
    if value >= 100:
        return fmt_num(value)
    if value >= 10:
        return fmt_num(value, 1)
    return fmt_num(value, 2)


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1024 * 1024:
        return f"{value / (1024 * 1024):.1f} MiB"
    if abs(value) >= 1024:
        return f"{value / 1024:.1f} KiB"
    return f"{value:.0f} B"


def fmt_size(size: int) -> str:
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} B"


def scenario_name(connections: int, size: int, depth: int) -> str:
    return f"{connections} x {fmt_size(size)}, depth {depth}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> str:
    """A GitHub markdown table; ``align`` is one letter per column ('l' or 'r', default 'r')."""
    align = align.ljust(len(headers), "r")
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- the report ------------------------------------------------------------------------


def _ratios(value: float | None, results: Mapping[str, Mapping[str, Any]], key: str) -> list[str]:
    cells = []
    for ref, _title in REFERENCES:
        ref_value = results.get(ref, {}).get(key)
        cells.append(fmt_ratio(ratio(value, ref_value)))
    return cells


def _errors(figures: Mapping[str, Any]) -> str:
    total = figures.get("errors")
    if total is None:
        return "-"
    if not total:
        return "0"
    detail = figures.get("error_detail") or {}
    parts = ", ".join(f"{k} {v}" for k, v in detail.items() if v)
    return f"**{total}** ({parts})" if parts else f"**{total}**"


def load_table(sections: Sequence[Mapping[str, Any]], targets: Sequence[str]) -> str:
    headers = [
        "scenario",
        "target",
        "msgs/s",
        "MB/s",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "errors",
        "proxy us/msg",
        "of which sys",
        "proxy CPU",
        *(title for _ref, title in REFERENCES),
    ]
    rows = []
    for section in sections:
        results = section["results"]
        for target in targets:
            if target not in results:
                continue
            f = results[target]
            rows.append(
                [
                    section["scenario"]["name"],
                    f"**{target}**" if target.startswith("wsgate") else target,
                    fmt_num(f.get("msgs_per_s")),
                    fmt_sig(f.get("mb_per_s")),
                    fmt_num(f.get("p50_us")),
                    fmt_num(f.get("p99_us")),
                    fmt_num(f.get("p999_us")),
                    _errors(f),
                    fmt_sig(f.get("proxy_cpu_us_per_msg")),
                    fmt_sig(f.get("proxy_sys_us_per_msg")),
                    _pct(f.get("proxy_cpu_pct")),
                    *_ratios(f.get("msgs_per_s"), results, "msgs_per_s"),
                ]
            )
    return table(headers, rows, "ll")


def headroom_table(sections: Sequence[Mapping[str, Any]], proxy: str = "wsgate") -> str:
    """Direct vs ``proxy``: the generator's capacity against what the proxy used of it."""
    headers = [
        "scenario",
        "direct msgs/s",
        f"{proxy} msgs/s",
        f"direct / {proxy}",
        f"generator CPU ({proxy} run)",
        f"backend CPU ({proxy} run)",
        f"{proxy} CPU",
    ]
    rows = []
    for section in sections:
        results = section["results"]
        direct, other = results.get("direct"), results.get(proxy)
        if not direct or not other:
            continue
        rows.append(
            [
                section["scenario"]["name"],
                fmt_num(direct.get("msgs_per_s")),
                fmt_num(other.get("msgs_per_s")),
                fmt_ratio(ratio(direct.get("msgs_per_s"), other.get("msgs_per_s"))),
                _pct(other.get("gen_cpu_pct")),
                _pct(other.get("backend_cpu_pct")),
                _pct(other.get("proxy_cpu_pct")),
            ]
        )
    return table(headers, rows, "l")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def handshake_table(results: Mapping[str, Mapping[str, Any]], targets: Sequence[str]) -> str:
    headers = [
        "target",
        "cycles/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "proxy us/cycle",
        "CPU x nginx",
        "proxy CPU",
        *(title for _ref, title in REFERENCES),
    ]
    nginx = "nginx-tls" if "nginx-tls" in results else "nginx"
    nginx_cpu = results.get(nginx, {}).get("proxy_cpu_us_per_msg")
    rows = []
    only_here = [t for t in results if t not in targets]  # handshake-only targets
    for target in [*targets, *only_here]:
        if target not in results:
            continue
        f = results[target]
        rows.append(
            [
                f"**{target}**" if target.startswith("wsgate") else target,
                fmt_num(f.get("msgs_per_s")),
                fmt_sig(None if f.get("p50_us") is None else f["p50_us"] / 1000),
                fmt_sig(None if f.get("p99_us") is None else f["p99_us"] / 1000),
                _errors(f),
                fmt_sig(f.get("proxy_cpu_us_per_msg")),
                fmt_ratio(ratio(f.get("proxy_cpu_us_per_msg"), nginx_cpu)),
                _pct(f.get("proxy_cpu_pct")),
                *_ratios(f.get("msgs_per_s"), results, "msgs_per_s"),
            ]
        )
    return table(headers, rows, "l")


def idle_table(results: Mapping[str, Mapping[str, Any]], targets: Sequence[str]) -> str:
    headers = [
        "target",
        "idle pairs",
        "RSS before",
        "RSS with pairs",
        "per pair",
        "errors",
        "x nginx",
        "x ws-relay",
    ]
    rows = []
    for target in targets:
        if target not in results:
            continue
        f = results[target]
        per = f.get("bytes_per_pair")
        rows.append(
            [
                f"**{target}**" if target.startswith("wsgate") else target,
                fmt_num(f.get("pairs")),
                fmt_bytes(f.get("rss_before")),
                fmt_bytes(f.get("rss_after")),
                fmt_bytes(per),
                _errors(f),
                fmt_ratio(ratio(per, results.get("nginx", {}).get("bytes_per_pair"))),
                fmt_ratio(ratio(per, results.get("websockets-relay", {}).get("bytes_per_pair"))),
            ]
        )
    return table(headers, rows, "l")


def find(sections: Sequence[Mapping[str, Any]], connections: int, size: int, depth: int) -> Any:
    """The results of one scenario, or {} when it was not run."""
    for section in sections:
        s = section["scenario"]
        if (s["connections"], s["size"], s["depth"]) == (connections, size, depth):
            return section["results"]
    return {}


def goals(report: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """Issues 7 and 19's targets, both relay engines: (goal, measured, wanted, verdict)."""
    load = report.get("load", [])
    rows: list[tuple[str, str, str, str]] = []

    def check(name: str, value: float | None, wanted: str, ok: bool | None, shown: str) -> None:
        verdict = "n/a" if ok is None else ("met" if ok else "**not met**")
        rows.append((name, shown if value is not None else "not measured", wanted, verdict))

    r = find(load, 100, 32, 1)
    v = ratio(
        r.get("wsgate", {}).get("msgs_per_s"), r.get("websockets-relay", {}).get("msgs_per_s")
    )
    check(
        "100 x 32 B: wsgate / websockets-relay",
        v,
        ">= 1.8x",
        None if v is None else v >= 1.8,
        fmt_ratio(v),
    )
    r = find(load, 10, 65536, 1)
    for engine in ("wsgate", "wsgate-reactor"):
        v = ratio(r.get(engine, {}).get("mb_per_s"), r.get("haproxy", {}).get("mb_per_s"))
        check(
            f"10 x 64 KiB: {engine} / haproxy MB/s",
            v,
            ">= 1x",
            None if v is None else v >= 1.0,
            fmt_ratio(v),
        )
    # Issue 19: proxy CPU per open-echo-close cycle against nginx's.
    churn = report.get("handshakes", {}).get("results", {})
    nginx_cycle = churn.get("nginx", {}).get("proxy_cpu_us_per_msg")
    for name, wanted_ratio in (("wsgate", 2.5), ("wsgate-reactor", 2.5), ("wsgate-jwt-hs256", 3.0)):
        v = ratio(churn.get(name, {}).get("proxy_cpu_us_per_msg"), nginx_cycle)
        check(
            f"churn: {name} CPU per cycle / nginx's",
            v,
            f"<= {wanted_ratio}x",
            None if v is None else v <= wanted_ratio,
            fmt_ratio(v),
        )
    tls_churn = report.get("tls", {}).get("handshakes", {})
    v = ratio(
        tls_churn.get("wsgate-tls", {}).get("proxy_cpu_us_per_msg"),
        tls_churn.get("nginx-tls", {}).get("proxy_cpu_us_per_msg"),
    )
    check(
        "churn over TLS: wsgate-tls CPU per cycle / nginx-tls's",
        v,
        "<= 1.5x",
        None if v is None else v <= 1.5,
        fmt_ratio(v),
    )
    r = find(load, 10, 32, 16)
    v = ratio(r.get("wsgate", {}).get("msgs_per_s"), r.get("nginx", {}).get("msgs_per_s"))
    check(
        "10 x 32 B, depth 16: wsgate / nginx",
        v,
        ">= 0.9x",
        None if v is None else v >= 0.9,
        fmt_ratio(v),
    )
    idle = report.get("idle", {}).get("results", {}).get("wsgate", {})
    v = idle.get("bytes_per_pair")
    check(
        "memory per idle pair",
        v,
        "<= 12 KiB",
        None if v is None else v <= 12 * 1024,
        fmt_bytes(v),
    )
    r = find(load, 1, 32, 1)
    gw, direct = r.get("wsgate", {}).get("p50_us"), r.get("direct", {}).get("p50_us")
    v = None if gw is None or direct is None else gw - direct
    check(
        "1 x 32 B: median latency added over direct",
        v,
        "<= 150 us",
        None if v is None else v <= 150,
        f"{fmt_num(v)} us",
    )
    hs = report.get("handshakes", {}).get("results", {}).get("wsgate", {})
    v = hs.get("msgs_per_s")
    check(
        "handshakes per second (no policies)",
        v,
        ">= 2,000",
        None if v is None else v >= 2000,
        fmt_num(v),
    )
    v = report.get("handshakes", {}).get("results", {}).get("wsgate-jwt", {}).get("msgs_per_s")
    check(
        "handshakes per second (validate-jwt, RS256)",
        v,
        ">= 1,000",
        None if v is None else v >= 1000,
        fmt_num(v),
    )
    # [cluster]: what the Redis round trip adds to a rate-limit check (docs/cluster.md).
    # One handshake at a time: the latency a check adds, not a saturated queue's.
    handshakes = report.get("handshakes", {}).get("one_at_a_time", {})
    memory, redis = handshakes.get("wsgate-ratelimit", {}), handshakes.get("wsgate-redis", {})
    added = {}
    for quantile in ("p50", "p99", "p999"):
        a, b = memory.get(f"{quantile}_us"), redis.get(f"{quantile}_us")
        added[quantile] = None if a is None or b is None else b - a
    v = added["p99"]
    check(
        "one handshake at a time: p50 / p99 / p99.9 added by [cluster] "
        "(wsgate-redis - wsgate-ratelimit, one loop alternating between them)",
        v,
        "p99 <= 1 ms",
        None if v is None else v <= 1000,
        f"{fmt_num(added['p50'])} / {fmt_num(v)} / {fmt_num(added['p999'])} us",
    )
    # The reactor engine's own targets.
    for connections, wanted_ratio in ((100, 0.7), (1000, 0.9)):
        r = find(load, connections, 32, 1)
        v = ratio(
            r.get("wsgate-reactor", {}).get("msgs_per_s"), r.get("nginx", {}).get("msgs_per_s")
        )
        check(
            f"reactor, {connections} x 32 B: wsgate-reactor / nginx",
            v,
            f">= {wanted_ratio}x",
            None if v is None else v >= wanted_ratio,
            fmt_ratio(v),
        )
    reactor_idle = report.get("idle", {}).get("results", {}).get("wsgate-reactor", {})
    v = reactor_idle.get("bytes_per_pair")
    check(
        "reactor: memory per idle pair",
        v,
        "<= 6 KiB",
        None if v is None else v <= 6 * 1024,
        fmt_bytes(v),
    )
    held = idle.get("pairs")
    wanted = 10_000
    check(
        "concurrent pairs in one process",
        held,
        f">= {wanted:,}",
        None if held is None else held >= wanted and not idle.get("errors"),
        f"{fmt_num(held)} held, {idle.get('errors', 0)} errors",
    )
    return rows


def render_markdown(report: Mapping[str, Any]) -> str:
    """The whole report as markdown (what is printed and written to latest.md)."""
    meta = report.get("meta", {})
    targets = report.get("targets", [])
    out = [f"# wsgate benchmark ({meta.get('mode', '?')} run, {meta.get('date', '?')})", ""]
    for line in meta.get("summary", []):
        out.append(f"- {line}")
    out.append("")
    for note in meta.get("notes", []):
        out.append(f"> {note}")
        out.append("")
    if report.get("load"):
        out += ["## Throughput and latency (closed loop, echo)", ""]
        out.append(load_table(report["load"], targets))
        out += ["", "## The generator is not the bottleneck", ""]
        out.append(
            "The same generator and backend, without a proxy, against through wsgate. "
            "CPU is in percent of one core over the measured window (the machine has "
            f"{meta.get('cpus', '?')})."
        )
        out += ["", headroom_table(report["load"]), ""]
    if report.get("handshakes", {}).get("results"):
        out += ["## Connection churn (open, one 32 B echo, close)", ""]
        out.append(
            "Proxy CPU per cycle is the figure that counts (the generator's own ceiling caps "
            "cycles/s); `CPU x nginx` divides it by nginx's, lower is better."
        )
        out.append("")
        out.append(handshake_table(report["handshakes"]["results"], targets))
        out.append("")
        single = report["handshakes"].get("one_at_a_time")
        if single:
            out += [
                "One client loop in all (no queue in front of the proxy): what a check adds "
                "to one handshake's latency.",
                "",
                handshake_table(single, list(single)),
                "",
            ]
    if report.get("idle", {}).get("results"):
        out += ["## Memory per idle pair (RSS with the pairs open minus before, divided)", ""]
        out.append(idle_table(report["idle"]["results"], targets))
        out.append("")
    tls = report.get("tls", {})
    if tls.get("load") or tls.get("handshakes"):
        tls_targets = tls.get("targets", [])
        out += ["## TLS front end (wss:// to the proxy, ws:// to the backend)", ""]
        if tls.get("load"):
            out.append(load_table(tls["load"], tls_targets))
            out.append("")
        if tls.get("handshakes"):
            out.append(handshake_table(tls["handshakes"], tls_targets))
            out.append("")
    rows = goals(report)
    if rows:
        out += ["## Against the targets of issues 7 and 19", ""]
        out.append(table(("goal", "measured", "target", "verdict"), rows, "llll"))
        out.append("")
    return "\n".join(out)
