"""The state file: changes made through the management API, written atomically.

A write goes to a temporary file in the same directory, which is flushed and
fsynced, then renamed over the state file, and the directory is fsynced so the
rename itself is durable. Whenever the process dies (kill -9 included) the state
file is therefore either the previous state or the new one, never a mix, and a
write that returned is on disk.

The document is JSON::

    {"format": 1,
     "apis": {"chat": {...config-file fields...}, "old-api": null},
     "products": {...}, "subscriptions": {...}}

Each entry replaces the config-file table with that name or id, or adds one;
``null`` deletes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsgate.errors import ConfigError

__all__ = ["COLLECTIONS", "FORMAT", "Overrides", "empty_overrides", "read_state", "write_atomic"]

#: Version of the state document's layout.
FORMAT = 1

#: The config tables the management API manages, by collection name.
COLLECTIONS = ("apis", "products", "subscriptions")

#: Per collection: name or id -> the table as the config file would hold it, or None (deleted).
Overrides = dict[str, dict[str, dict[str, Any] | None]]


def empty_overrides() -> Overrides:
    """No management changes."""
    return {collection: {} for collection in COLLECTIONS}


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see module docstring).

    The file is created with mode 0600 (it may hold subscription keys).
    """
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files a killed writer of ``path`` left behind."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def dump_state(overrides: Overrides) -> bytes:
    """The state document for ``overrides``."""
    document = {"format": FORMAT, **{c: overrides.get(c, {}) for c in COLLECTIONS}}
    return (json.dumps(document, indent=2, sort_keys=False) + "\n").encode()


def read_state(path: Path) -> Overrides:
    """The overrides stored in ``path`` (none if it does not exist); ConfigError if unusable."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return empty_overrides()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read state file: {exc}"]) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}: state file is not valid JSON: {exc}"]) from None
    return parse_state(document, str(path))


def parse_state(document: object, label: str) -> Overrides:
    """Check the layout of a state document; ConfigError lists what is wrong."""
    if not isinstance(document, Mapping):
        raise ConfigError([f"{label}: state file must hold a JSON object"])
    problems: list[str] = []
    if document.get("format") != FORMAT:
        problems.append(f"{label}: format: expected {FORMAT}, got {document.get('format')!r}")
    for key in document:
        if key != "format" and key not in COLLECTIONS:
            problems.append(f"{label}: {key}: unknown key")
    overrides = empty_overrides()
    for collection in COLLECTIONS:
        entries = document.get(collection, {})
        if not isinstance(entries, Mapping):
            problems.append(f"{label}: {collection}: expected an object")
            continue
        for name, entry in entries.items():
            if entry is not None and not isinstance(entry, Mapping):
                problems.append(f"{label}: {collection}.{name}: expected an object or null")
                continue
            overrides[collection][name] = None if entry is None else dict(entry)
    if problems:
        raise ConfigError(problems)
    return overrides
