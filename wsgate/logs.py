"""Helpers for the gateway log records (see docs/logs.md for every key)."""

from __future__ import annotations

import time

# strftime is the costliest step of a log line; the seconds part changes once a second.
_second = -1
_prefix = ""


def utc_iso(timestamp: float) -> str:
    """``timestamp`` (seconds since the epoch) as ISO-8601 UTC with milliseconds.

    E.g. ``2026-11-29T16:00:00.123Z``: the one timestamp format of wsgate's log
    records, management API and console output.
    """
    global _second, _prefix
    second = int(timestamp)
    if second != _second:
        _second, _prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
    return f"{_prefix}{int((timestamp - second) * 1000):03d}Z"


def utc_now() -> str:
    """The current time as :func:`utc_iso` formats it."""
    return utc_iso(time.time())
