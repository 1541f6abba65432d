"""Validators shared by the config classes and the policies, with one message convention.

The convention: **an error names the keys it knows, and only those.**

* A field validator (an attrs validator, ``check(instance, attribute, value)``)
  raises :class:`KeyedValueError` naming its own field: ``("calls", "must be >=
  1, got 0")``. Write it as a plain check that raises ``ValueError(reason)``
  and wrap it with :func:`keyed`, which adds the field's name. A validator that
  can point at a more precise key (``addresses[2]``) raises
  :class:`KeyedValueError` itself, with keys relative to the object it
  validates.
* A rule across fields (``__attrs_post_init__``) raises :class:`KeyedValueError`
  for the key at fault, or ``ValueError(reason)`` when the object as a whole is.
* Converters and parsers (``Listen.parse``) raise ``ValueError(reason)``: they
  do not know which key their text came from; their caller does.
* A reason never starts with its own key; whoever knows more of the path adds it
  (the config reader turns ``("calls", reason)`` at ``apis[0].policies[1]`` into
  ``FILE: apis[0].policies[1].calls: reason``).

This module imports nothing from wsgate: everything else may use it.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import attrs

__all__ = [
    "KEY_KINDS",
    "MIN_SECRET_LENGTH",
    "KeyedValueError",
    "Validator",
    "boolean",
    "describe",
    "existing_file",
    "has_space_or_control",
    "header_name",
    "http_status",
    "key_spec",
    "keyed",
    "number",
    "one_of",
    "optional",
    "secret_token",
    "strings",
    "valid_header_name",
    "valid_key_spec",
]

#: An attrs validator: ``check(instance, attribute, value)``; the config reader
#: calls it with ``instance=None`` to check one field on its own.
Validator: TypeAlias = "Callable[[Any, attrs.Attribute[Any], Any], None]"


class KeyedValueError(ValueError):
    """A validation failure that names the exact keys at fault.

    ``problems`` holds ``(key, reason)`` pairs; keys are relative to the object
    being validated (``"backend_ca_file"``, ``"apis[2].name"``).
    """

    def __init__(self, problems: Iterable[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(f"{key}: {reason}" for key, reason in self.problems))


def keyed(check: Validator) -> Validator:
    """``check`` as a field validator whose plain ValueError names the field.

    A :class:`KeyedValueError` from ``check`` already names its keys and passes
    through unchanged.
    """

    @functools.wraps(check)
    def run(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        try:
            check(instance, attribute, value)
        except KeyedValueError:
            raise
        except ValueError as exc:
            raise KeyedValueError([(attribute.alias or attribute.name, str(exc))]) from None

    return run


def optional(check: Validator) -> Validator:
    """``check``, except that None is accepted."""

    def run(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            check(instance, attribute, value)

    return run


def describe(value: object) -> str:
    """The TOML name of a value's type, for "expected X, got Y" messages."""
    if isinstance(value, list | tuple) and value:
        return "an array with " + " and ".join(sorted({describe(item) for item in value}))
    for types, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        ((list, tuple), "an empty array"),
        (Mapping, "a table"),
        ((datetime.date, datetime.time), "a date/time"),
    ):
        if isinstance(value, types):
            return name
    return type(value).__name__


def has_space_or_control(text: str) -> bool:
    """Whether ``text`` holds whitespace or a character that does not print."""
    return any(ch.isspace() or not ch.isprintable() for ch in text)


# --- field validators ---------------------------------------------------------------------


def number(
    minimum: float,
    *,
    inclusive: bool = True,
    integer: bool = False,
    maximum: float | None = None,
) -> Validator:
    """Number >= (or >) ``minimum`` (and <= ``maximum``); rejects bool, and NaN/inf."""
    op = ">=" if inclusive else ">"
    kind, types = ("an integer", int) if integer else ("a number", (int, float))

    @keyed
    def check(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"must be {kind}, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        if value < minimum or (value == minimum and not inclusive):
            raise ValueError(f"must be {op} {minimum:g}, got {value!r}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be <= {maximum:g}, got {value!r}")

    return check


def http_status(low: int, high: int) -> Validator:
    """An HTTP status code from ``low`` to ``high``."""

    @keyed
    def check(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be an HTTP status code {low}-{high}, got {value!r}")

    return check


@keyed
def boolean(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    """true or false (not 0 or 1)."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")


def one_of(*choices: str) -> Validator:
    """One of the strings ``choices``."""

    @keyed
    def check(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {value!r}")

    return check


@keyed
def strings(_inst: object, _attr: attrs.Attribute[Any], value: Iterable[object]) -> None:
    """A sequence of strings only."""
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"must contain only strings, got {item!r}")


_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def valid_header_name(value: object) -> bool:
    """Whether ``value`` is an HTTP header name (an RFC 9110 token)."""
    return isinstance(value, str) and _TOKEN_RE.fullmatch(value) is not None


@keyed
def header_name(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    """An HTTP header name (an RFC 9110 token)."""
    if not valid_header_name(value):
        raise ValueError(f"invalid header name {value!r}")


@keyed
def existing_file(_inst: object, _attr: attrs.Attribute[Any], value: Path | None) -> None:
    """None, or the path of a file that exists now."""
    if value is not None and not value.is_file():
        raise ValueError(
            f"file not found: {value}" if not value.exists() else f"not a file: {value}"
        )


#: Shortest bearer secret (subscription key, admin token) accepted.
MIN_SECRET_LENGTH = 16


def secret_token(what: str, *, hint: str = "") -> Validator:
    """None, or a bearer secret: visible ASCII, at least :data:`MIN_SECRET_LENGTH` long.

    ``what`` names it in the message ("a subscription key"); ``hint`` follows the
    length rule (where else the value may come from). The value itself never
    appears in a message: it is a secret.
    """

    @keyed
    def check(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
        if value is None:
            return
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if len(value) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"too short: {what} needs at least {MIN_SECRET_LENGTH} characters{hint}"
            )
        if not all("!" <= ch <= "~" for ch in value):
            raise ValueError("must contain only visible ASCII characters (no spaces)")

    return check


# --- counter-key specs ----------------------------------------------------------------------

#: The counter-key specs :meth:`wsgate.policy.HandshakeContext.key` resolves; the
#: last three take a name after the colon.
KEY_KINDS = ("ip", "subscription", "api", "product", "header:", "query:", "claim:")


def valid_key_spec(spec: str) -> bool:
    """Whether ``spec`` is a counter-key spec (``ip``, ``header:X-Tenant``...)."""
    return spec in KEY_KINDS[:4] or any(
        spec.startswith(prefix) and len(spec) > len(prefix) for prefix in KEY_KINDS[4:]
    )


@keyed
def key_spec(_inst: object, _attr: attrs.Attribute[Any], value: object) -> None:
    """A counter-key spec (see :func:`valid_key_spec`)."""
    if not isinstance(value, str) or not valid_key_spec(value):
        raise ValueError(
            f"invalid key {value!r}: use ip, subscription, api, product,"
            " header:NAME, query:NAME or claim:NAME"
        )


# --- addresses ------------------------------------------------------------------------------


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address or CIDR range; ValueError naming the mistake (host bits, syntax)."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text!r} has host bits set (did you mean '{loose}'?)") from None
        raise ValueError(f"invalid IP address or CIDR range {text!r}") from None


def address_ranges(*, required: bool) -> Validator:
    """A list of addresses and CIDR ranges (ip-filter, trusted_proxies); each bad item by index."""

    @keyed
    def check(_inst: object, attr: attrs.Attribute[Any], value: Iterable[str]) -> None:
        items = list(value)
        if required and not items:
            raise ValueError("must list at least one address or CIDR range")
        problems = []
        for index, text in enumerate(items):
            try:
                parse_network(text)
            except ValueError as exc:
                problems.append((f"{attr.name}[{index}]", str(exc)))
        if problems:
            raise KeyedValueError(problems)

    return check
