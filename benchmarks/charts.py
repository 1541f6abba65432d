"""PNG charts of a report (matplotlib, no display): ``python -m benchmarks.charts [latest.json]``.

* ``throughput.png``: msgs/s per scenario, one bar per target (log scale);
* ``latency.png``: p50 / p99 / p99.9 per scenario and target (log scale);
* ``latency_distribution.png``: the percentile spectrum of each target in the
  headline scenario (100 x 32 B, depth 1, when it was run);
* ``churn.png``: proxy CPU per open-echo-close cycle, plain and TLS, one bar per
  target, with nginx's figure drawn as a line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .targets import ALL

COLORS = {name: cls.color for name, cls in ALL.items()}
HEADLINE = (100, 32, 1)


def _bars(
    ax: Any,
    sections: Sequence[Mapping[str, Any]],
    targets: Sequence[str],
    key: str,
    label: str,
) -> None:
    names = [s["scenario"]["name"] for s in sections]
    width = 0.8 / max(1, len(targets))
    for i, target in enumerate(targets):
        xs, ys = [], []
        for j, section in enumerate(sections):
            value = section["results"].get(target, {}).get(key)
            if value:
                xs.append(j + (i - (len(targets) - 1) / 2) * width)
                ys.append(value)
        ax.bar(xs, ys, width, label=target, color=COLORS.get(target))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 4)  # room for the legend above the tallest bar
    ax.set_ylabel(label)
    ax.grid(axis="y", which="both", alpha=0.3)


def throughput(report: Mapping[str, Any], path: Path) -> Path:
    sections, targets = report["load"], report["targets"]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    _bars(ax, sections, targets, "msgs_per_s", "echoed messages per second (log)")
    ax.set_title(f"Throughput by scenario ({report['meta'].get('date', '')})")
    ax.legend(fontsize=8, ncol=len(targets))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency(report: Mapping[str, Any], path: Path) -> Path:
    sections, targets = report["load"], report["targets"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 11), sharex=True)
    for ax, (key, title) in zip(
        axes, (("p50_us", "p50"), ("p99_us", "p99"), ("p99_9_us", "p99.9")), strict=True
    ):
        _bars(ax, sections, targets, "p999_us" if key == "p99_9_us" else key, f"{title} (us, log)")
    axes[0].set_title("Round-trip latency percentiles by scenario (lower is better)")
    axes[0].legend(fontsize=8, ncol=len(targets))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def distribution(report: Mapping[str, Any], path: Path) -> Path | None:
    section = next(
        (
            s
            for s in report["load"]
            if (s["scenario"]["connections"], s["scenario"]["size"], s["scenario"]["depth"])
            == HEADLINE
        ),
        report["load"][0] if report["load"] else None,
    )
    if section is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for target, figures in section["results"].items():
        curve = figures.get("percentile_curve") or []
        if not curve:
            continue
        # x: the "number of nines", so p50, p90, p99, p99.9 are evenly spaced.
        xs = [1.0 / (1.0 - p / 100.0) if p < 100 else 1e5 for p, _ in curve]
        ax.plot(xs, [v for _, v in curve], label=target, color=COLORS.get(target))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000]
    ax.set_xticks(ticks)
    ax.set_xticklabels(["p0", "p50", "p90", "p99", "p99.9", "p99.99"])
    ax.set_ylabel("round-trip latency (us, log)")
    ax.set_title(f"Latency distribution, {section['scenario']['name']}")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def churn(report: Mapping[str, Any], path: Path) -> Path | None:
    plain = report.get("handshakes", {}).get("results", {})
    tls = report.get("tls", {}).get("handshakes", {})
    rows = [
        (name, f["proxy_cpu_us_per_msg"])
        for name, f in [*plain.items(), *tls.items()]
        if f.get("proxy_cpu_us_per_msg")
    ]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5))
    names = [n for n, _ in rows]
    ax.barh(names, [v for _, v in rows], color=[COLORS.get(n) for n in names])
    for reference in ("nginx", "nginx-tls"):
        figures = plain.get(reference) or tls.get(reference) or {}
        if figures.get("proxy_cpu_us_per_msg"):
            ax.axvline(figures["proxy_cpu_us_per_msg"], color="#2ca02c", ls="--", lw=1)
    ax.invert_yaxis()
    ax.set_xlabel("proxy CPU per cycle (us, lower is better); dashed: nginx")
    ax.set_title("Connection churn: open, one 32 B echo, close")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Draw every chart of ``report`` into ``out_dir``; return the files written."""
    if not report.get("load"):
        return []
    written = [
        throughput(report, out_dir / "throughput.png"),
        latency(report, out_dir / "latency.png"),
    ]
    dist = distribution(report, out_dir / "latency_distribution.png")
    if dist is not None:
        written.append(dist)
    cycle = churn(report, out_dir / "churn.png")
    if cycle is not None:
        written.append(cycle)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else Path(__file__).resolve().parent / "results" / "latest.json"
    report = json.loads(path.read_text())
    for written in draw_all(report, path.parent):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
