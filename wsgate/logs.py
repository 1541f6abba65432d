"""Helpers for the gateway log records (see docs/logs.md for every key)."""

from __future__ import annotations

import datetime


def utc_now() -> str:
    """The current time as ISO-8601 UTC with milliseconds, e.g. ``2026-11-29T16:00:00.123Z``."""
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
