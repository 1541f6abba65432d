"""``AdminConfig``: the ``[admin]`` table (admin listener, token, TLS, state file).

This module imports nothing from :mod:`wsgate.config` at import time, so that
``wsgate.config`` can import :class:`AdminConfig` to read the ``[admin]`` table
without an import cycle. :class:`~wsgate.config.Listen` and
:class:`~wsgate.config.TLSConfig` are looked up when an instance is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from wsgate.config import Listen, TLSConfig

__all__ = ["DEFAULT_ADMIN_LISTEN", "MIN_TOKEN_LENGTH", "TOKEN_ENV", "AdminConfig"]

#: Environment variable holding the admin token when the config file gives none.
TOKEN_ENV = "WSGATE_ADMIN_TOKEN"

#: The admin listener's default address: loopback only.
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8081"

#: Shortest admin token accepted: it is a bearer secret.
MIN_TOKEN_LENGTH = 16


def _default_listen() -> Listen:
    from wsgate.config import Listen

    return Listen.parse(DEFAULT_ADMIN_LISTEN)


def _token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def _listen(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    from wsgate.config import Listen

    if not isinstance(value, Listen):
        raise ValueError(f"expected a Listen address, got {type(value).__name__}")


def _tls(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    from wsgate.config import TLSConfig

    if value is not None and not isinstance(value, TLSConfig):
        raise ValueError(f"expected a TLS table, got {type(value).__name__}")


def _token(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    # Never put the value in a message: it is a secret.
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if len(value) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"too short: the admin token needs at least {MIN_TOKEN_LENGTH} characters"
            f" (from the config file or {TOKEN_ENV})"
        )
    if not all("!" <= ch <= "~" for ch in value):
        raise ValueError("must contain only visible ASCII characters (no spaces)")


def _optional_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


def _state_file(_inst: object, _attr: attrs.Attribute[Any], value: Path | None) -> None:
    if value is None:
        return
    if value.exists() and not value.is_file():
        raise ValueError(f"not a file: {value}")
    if not value.parent.is_dir():
        raise ValueError(f"directory not found: {value.parent}")


@attrs.frozen(kw_only=True)
class AdminConfig:
    """The admin listener (``[admin]``): management API, metrics, health.

    ``token`` defaults to the ``WSGATE_ADMIN_TOKEN`` environment variable, read
    when the object is built; without a token the management endpoints answer
    403 (``/health``, ``/ready``, ``/metrics`` and ``/openapi.json`` stay open).
    ``state_file`` keeps the changes made through the management API across
    restarts; without it they last until the process ends.
    """

    listen: Listen = attrs.field(factory=_default_listen, validator=_listen)
    token: str | None = attrs.field(factory=_token_from_env, repr=False, validator=_token)
    tls: TLSConfig | None = attrs.field(default=None, validator=_tls)
    state_file: Path | None = attrs.field(
        default=None, converter=_optional_path, validator=_state_file
    )
