"""``AdminConfig``: the ``[admin]`` table (admin listener, token, TLS, state file).

It builds on the leaf modules only (:mod:`wsgate.addresses`, :mod:`wsgate.validate`),
so :mod:`wsgate.config` can read the ``[admin]`` table with it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from wsgate.addresses import Listen, TLSConfig
from wsgate.validate import MIN_SECRET_LENGTH, keyed, optional, secret_token

__all__ = ["DEFAULT_ADMIN_LISTEN", "MIN_TOKEN_LENGTH", "TOKEN_ENV", "AdminConfig"]

#: Environment variable holding the admin token when the config file gives none.
TOKEN_ENV = "WSGATE_ADMIN_TOKEN"

#: The admin listener's default address: loopback only.
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8081"

#: Shortest admin token accepted: it is a bearer secret.
MIN_TOKEN_LENGTH = MIN_SECRET_LENGTH


def _default_listen() -> Listen:
    return Listen.parse(DEFAULT_ADMIN_LISTEN)


def _token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


@keyed
def _listen(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, Listen):
        raise ValueError(f"expected a Listen address, got {type(value).__name__}")


@keyed
def _tls(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, TLSConfig):
        raise ValueError(f"expected a TLS table, got {type(value).__name__}")


_token = secret_token("the admin token", hint=f" (from the config file or {TOKEN_ENV})")


def _optional_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


@keyed
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
    tls: TLSConfig | None = attrs.field(default=None, validator=optional(_tls))
    state_file: Path | None = attrs.field(
        default=None, converter=_optional_path, validator=_state_file
    )
