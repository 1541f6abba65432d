"""Config objects as JSON: the tables the management API returns.

An API, product or subscription becomes the table a config file would hold for
it (every field, ``None`` ones left out); a policy becomes ``{"policy": name,
...}`` with the settings that differ from their defaults. Secret fields (those
attrs keeps out of ``repr``: subscription keys, passwords, JWT secrets) are
masked unless ``mask=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from wsgate.logs import utc_iso

if TYPE_CHECKING:
    from wsgate.relay import Pair

__all__ = ["MASK", "connection_json", "mask_secret", "table"]

#: What a secret shows instead of its value.
MASK = "****"


def mask_secret(name: str, value: str) -> str:
    """A masked secret: subscription keys keep their last 4 characters to tell them apart."""
    if name.endswith("_key") and len(value) >= 16:
        return MASK + value[-4:]
    return MASK


def table(obj: Any, *, mask: bool = True) -> dict[str, Any]:
    """An API, product or subscription as a config-file table (every set field)."""
    out: dict[str, Any] = {}
    for field in attrs.fields(type(obj)):
        if not field.init:
            continue
        value = getattr(obj, field.name)
        if value is None:
            continue
        key = field.alias or field.name
        out[key] = _secret(key, value) if mask and not field.repr else _value(value, mask)
    return out


def _secret(name: str, value: object) -> object:
    return mask_secret(name, value) if isinstance(value, str) else MASK


def _settings(obj: Any, mask: bool) -> dict[str, Any]:
    """The init fields of an attrs object that differ from their defaults."""
    out: dict[str, Any] = {}
    for field in attrs.fields(type(obj)):
        if not field.init:
            continue
        value = getattr(obj, field.name)
        default = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = attrs.NOTHING if default.takes_self else default.factory()
        if default is not attrs.NOTHING and _equal(value, default, field):
            continue
        key = field.alias or field.name
        out[key] = _secret(key, value) if mask and not field.repr else _value(value, mask)
    return out


def _equal(value: object, default: object, field: attrs.Attribute[Any]) -> bool:
    if callable(field.converter) and default is not None:
        try:
            default = field.converter(default)
        except Exception:
            return False
    try:
        return bool(value == default)
    except Exception:
        return False


def _value(value: object, mask: bool) -> Any:
    policy_name = getattr(value, "policy_name", None)
    if isinstance(policy_name, str) and attrs.has(type(value)):
        settings = _settings(value, mask)
        settings.pop("policy_name", None)  # a SkippedPolicy's one field
        return {"policy": policy_name, **settings}
    if attrs.has(type(value)):
        return _settings(value, mask)
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _value(v, mask) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return sorted(_value(item, mask) for item in value)
    if isinstance(value, tuple | list):
        return [_value(item, mask) for item in value]
    return str(value)


def connection_json(pair: Pair, now: float, trio_now: float) -> dict[str, Any]:
    """One open pair as ``GET /connections`` lists it."""
    return {
        "id": pair.correlation_id,
        "api": pair.api,
        "caller_ip": pair.caller_ip,
        "connected_since": utc_iso(pair.connected_at),
        "last_activity": utc_iso(now - max(0.0, trio_now - pair.last_activity)),
        "messages_from_client": pair.messages_from_client,
        "messages_from_backend": pair.messages_from_backend,
        "bytes_from_client": pair.bytes_from_client,
        "bytes_from_backend": pair.bytes_from_backend,
    }
