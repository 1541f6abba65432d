"""Gateway configuration: frozen attrs classes, validated at construction, read once from TOML.

Every class validates its own fields, so a config built in code is checked exactly
like one read from a file. The file reader (:func:`load_config`, :func:`parse_config`)
adds what only a file can know: unknown keys, TOML types, relative paths, and the
key path of each problem. It collects every problem in the file and raises one
:class:`~wsgate.errors.ConfigError`.

Conventions that keep the reader generic:

* a TOML key has the same name as the attrs field it fills;
* field validators look at their own value only (the reader runs them one by one,
  with no instance, to report every bad field); rules that span fields live in
  ``__attrs_post_init__``;
* a rule that can point at a precise key raises :class:`KeyedValueError`; messages follow
  the convention of :mod:`wsgate.validate` (a reason never repeats its own key).

Adding a table (say ``[admin]``) is: write the attrs class, add its entry to
``_SPECS`` and a ``"admin": _table(AdminConfig)`` key to the parent's entry.

Policy tables (``policies = [...]`` at global, product and API scope) are the one
exception to "a spec per class": their keys are the fields of the policy class
registered under their ``policy`` name (:data:`wsgate.policies.registry.POLICIES`), so
the reader checks them against ``attrs.fields`` instead (:meth:`_Reader.build_policy`):
each policy class validates its own parameters, config knows none of them. The
entries of a ``policies`` list are defined with the policy contract (:mod:`wsgate.policy`).
Rules that span tables (products referenced by APIs and subscription scopes, the
``subscription_required`` default, unique keys) live in :class:`Config`.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import attrs
import structlog

from wsgate.addresses import BackendURL, Listen, TLSConfig
from wsgate.admin.settings import AdminConfig
from wsgate.clientaddr import FORWARDED_HEADERS, TrustedProxies
from wsgate.cluster.settings import ClusterConfig
from wsgate.errors import ConfigError
from wsgate.policies.registry import POLICIES  # importing it registers the built-in policies
from wsgate.policy import (
    BASE,
    UNSUPPORTED_POLICIES,
    BasePlacement,
    PolicyEntry,
    SkippedPolicy,
    policy_list,
    unsupported_at_api,
)
from wsgate.validate import (
    KeyedValueError,
    Validator,
    address_ranges,
    boolean,
    describe,
    existing_file,
    has_space_or_control,
    header_name,
    keyed,
    number,
    one_of,
    optional,
    secret_token,
    strings,
)

# The value types, policy entries and KeyedValueError live in lower modules
# (docs/architecture.md); they are re-exported for code that imports them from here.
__all__ = [
    "BASE",
    "UNSUPPORTED_POLICIES",
    "AdminConfig",
    "ApiConfig",
    "BackendURL",
    "BasePlacement",
    "ClusterConfig",
    "Config",
    "GatewayConfig",
    "KeyedValueError",
    "Listen",
    "PolicyEntry",
    "ProductConfig",
    "SkippedPolicy",
    "SubscriptionConfig",
    "TLSConfig",
    "load_config",
    "parse_config",
]

_T = TypeVar("_T")

# --- validators -------------------------------------------------------------------------


_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")


@keyed
def _api_name(_inst: object, _attr: attrs.Attribute[Any], value: str) -> None:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"invalid name {value!r}: use lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )


@keyed
def _non_empty(_inst: object, _attr: attrs.Attribute[Any], value: str) -> None:
    if not value.strip():
        raise ValueError("must not be empty")


@keyed
def _product_id(inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    _api_name(inst, attr, value)
    if value == "all":
        raise ValueError("'all' is reserved: a subscription scope of \"all\" means every API")


@keyed
def _scope(inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    if value != "all":
        _api_name(inst, attr, value)


@keyed
def _query_name(_inst: object, _attr: attrs.Attribute[Any], value: str) -> None:
    if not value or has_space_or_control(value) or any(c in value for c in "&=#%+"):
        raise ValueError(
            f"invalid query parameter name {value!r}: must be non-empty, without spaces,"
            " control characters or any of & = # % +"
        )


def _query_names(inst: object, attr: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for name in value:
        _query_name(inst, attr, name)


def _strip_slashes(path: str) -> str:
    # Stored bare so routing compares suffixes without caring how the user wrote them.
    return path.strip("/")


@keyed
def _api_path(_inst: object, _attr: attrs.Attribute[Any], value: str) -> None:
    if value == "":
        return  # the root API
    for segment in value.split("/"):
        if segment == "":
            reason = "empty segment ('//')"
        elif segment in (".", ".."):
            reason = "'.' and '..' segments are not allowed"
        elif "?" in segment or "#" in segment:
            reason = "must not contain '?' or '#'"
        elif has_space_or_control(segment):
            reason = "must not contain whitespace or control characters"
        else:
            continue
        raise ValueError(f"invalid path {value!r}: {reason}")


@keyed
def _service_url(_inst: object, _attr: attrs.Attribute[Any], value: str) -> None:
    BackendURL.parse(value)


def _unique(*keys: str) -> Validator:
    """Items of a sequence field must differ in each of ``keys``; names both indexes.

    Items the file reader could not build arrive as namespaces of their valid
    fields only (missing keys are skipped), so duplicates are still reported next
    to the other problems in the file.
    """

    def check(_inst: object, attr: attrs.Attribute[Any], items: Sequence[object]) -> None:
        problems = []
        for key in keys:
            seen: dict[object, int] = {}
            for index, item in enumerate(items):
                value = getattr(item, key, None)
                if value is None:
                    continue
                if value in seen:
                    problems.append(
                        (
                            f"{attr.name}[{index}].{key}",
                            f"duplicate {key} {value!r} (also {attr.name}[{seen[value]}].{key})",
                        )
                    )
                else:
                    seen[value] = index
        if problems:
            raise KeyedValueError(problems)

    return check


def _distinct(_inst: object, attr: attrs.Attribute[Any], items: Sequence[object]) -> None:
    problems = [
        (f"{attr.name}[{index}]", f"duplicate {item!r}")
        for index, item in enumerate(items)
        if item in items[:index]
    ]
    if problems:
        raise KeyedValueError(problems)


# Concrete converters: mypy's attrs plugin cannot type a bare ``converter=tuple``.
def _str_tuple(items: Iterable[str]) -> tuple[str, ...]:
    if isinstance(items, str):
        raise ValueError(f"must be a sequence of strings, not the string {items!r}")
    return tuple(items)


def _api_tuple(items: Iterable[ApiConfig]) -> tuple[ApiConfig, ...]:
    return tuple(items)


def _product_tuple(items: Iterable[ProductConfig]) -> tuple[ProductConfig, ...]:
    return tuple(items)


def _subscription_tuple(items: Iterable[SubscriptionConfig]) -> tuple[SubscriptionConfig, ...]:
    return tuple(items)


def _policy_tuple(items: Iterable[PolicyEntry]) -> tuple[PolicyEntry, ...]:
    return tuple(items)


# --- configuration classes --------------------------------------------------------------


@attrs.frozen(kw_only=True)
class GatewayConfig:
    """Settings of the gateway process itself (the ``[gateway]`` table)."""

    listen: Listen = Listen(host="127.0.0.1", port=8080)  # noqa: RUF009 (frozen: safe to share)
    max_connections: int = attrs.field(default=200, validator=number(1, integer=True))
    handshake_timeout: float = attrs.field(default=10.0, validator=number(0, inclusive=False))
    backend_connect_timeout: float = attrs.field(default=10.0, validator=number(0, inclusive=False))
    close_timeout: float = attrs.field(default=5.0, validator=number(0, inclusive=False))
    drain_timeout: float = attrs.field(default=30.0, validator=number(0))
    #: TCP keepalive on both legs, so a peer that vanished without a FIN (its host
    #: lost power, a NAT forgot the flow) does not hold a pair forever: seconds of
    #: silence before the kernel probes (0: off), seconds between probes, and
    #: unanswered probes before it fails the connection. Linux's limits apply.
    tcp_keepalive: int = attrs.field(default=60, validator=number(0, integer=True, maximum=32767))
    tcp_keepalive_interval: int = attrs.field(
        default=10, validator=number(1, integer=True, maximum=32767)
    )
    tcp_keepalive_probes: int = attrs.field(
        default=6, validator=number(1, integer=True, maximum=127)
    )
    #: More query parameters whose values never reach a log line (beyond the
    #: built-in list, subscription keys and validate-jwt's token parameter).
    redact_query_parameters: tuple[str, ...] = attrs.field(
        default=(), converter=_str_tuple, validator=[strings, _query_names]
    )
    tls: TLSConfig | None = None
    #: "tasks" (two relay tasks per pair) or "reactor" (one epoll pump per process,
    #: Linux; see docs/performance.md).
    relay_engine: str = attrs.field(default="tasks", validator=one_of("tasks", "reactor"))
    #: Global-scope onHandshake policies: they run first for every API.
    policies: tuple[PolicyEntry, ...] = attrs.field(
        default=(), converter=_policy_tuple, validator=policy_list("global")
    )
    #: The balancers in front (addresses, CIDR ranges): only their PROXY headers and
    #: forwarding headers name the client (wsgate.clientaddr). Empty: trust nobody.
    trusted_proxies: tuple[str, ...] = attrs.field(
        default=(), converter=_str_tuple, validator=[strings, address_ranges(required=False)]
    )
    #: Every connection starts with a PROXY protocol header (v1 or v2) from a trusted proxy.
    proxy_protocol: bool = attrs.field(default=False, validator=boolean)
    #: The forwarding header the trusted proxies append, the only one read.
    forwarded_header: str = attrs.field(
        default="x-forwarded-for", validator=one_of(*FORWARDED_HEADERS)
    )
    trusted: TrustedProxies = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "trusted", TrustedProxies.parse(self.trusted_proxies))
        if self.proxy_protocol and not self.trusted_proxies:
            raise KeyedValueError(
                [
                    (
                        "proxy_protocol",
                        "needs trusted_proxies: the PROXY header names the client, so only"
                        " the balancers' addresses may send it (list them in trusted_proxies)",
                    )
                ]
            )

    @property
    def keepalive(self) -> tuple[int, int, int] | None:
        """(idle, interval, probes) for :func:`wsgate.netio.set_keepalive`; None when off."""
        if not self.tcp_keepalive:
            return None
        return (self.tcp_keepalive, self.tcp_keepalive_interval, self.tcp_keepalive_probes)


@attrs.frozen(kw_only=True)
class ApiConfig:
    """One WebSocket API: the URL suffix clients use and the backend it fronts."""

    name: str = attrs.field(validator=_api_name)
    path: str = attrs.field(converter=_strip_slashes, validator=_api_path)
    service_url: str = attrs.field(validator=_service_url)
    display_name: str = attrs.field(
        default=attrs.Factory(lambda self: self.name, takes_self=True), validator=_non_empty
    )
    max_message_size: int = attrs.field(default=16 * 1024 * 1024, validator=number(0, integer=True))
    idle_timeout: float = attrs.field(default=0.0, validator=number(0))
    backend_ca_file: Path | None = attrs.field(default=None, validator=existing_file)
    products: tuple[str, ...] = attrs.field(
        default=(), converter=_str_tuple, validator=[strings, _distinct]
    )
    #: None until a :class:`Config` resolves it: true if any of the API's products
    #: requires a subscription, else false.
    subscription_required: bool | None = attrs.field(default=None, validator=optional(boolean))
    subscription_key_header: str = attrs.field(
        default="Ocp-Apim-Subscription-Key", validator=header_name
    )
    subscription_key_query: str = attrs.field(default="subscription-key", validator=_query_name)
    #: API-scope (onHandshake operation) policies.
    policies: tuple[PolicyEntry, ...] = attrs.field(
        default=(), converter=_policy_tuple, validator=policy_list("api")
    )
    inherit_policies: bool = attrs.field(default=True, validator=boolean)
    backend: BackendURL = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        backend = BackendURL.parse(self.service_url)
        object.__setattr__(self, "backend", backend)
        if self.backend_ca_file is not None and not backend.secure:
            raise KeyedValueError(
                [("backend_ca_file", "only allowed with a wss:// service_url, not ws://")]
            )


@attrs.frozen(kw_only=True)
class ProductConfig:
    """A product: a bundle of APIs that subscriptions give access to, with its own policies."""

    id: str = attrs.field(validator=_product_id)
    display_name: str = attrs.field(
        default=attrs.Factory(lambda self: self.id, takes_self=True), validator=_non_empty
    )
    subscription_required: bool = attrs.field(default=True, validator=boolean)
    #: Product-scope policies, run after the global ones (see :class:`BasePlacement`).
    policies: tuple[PolicyEntry, ...] = attrs.field(
        default=(), converter=_policy_tuple, validator=policy_list("product")
    )
    inherit_policies: bool = attrs.field(default=True, validator=boolean)


_SUBSCRIPTION_KEY = secret_token("a subscription key")


@attrs.frozen(kw_only=True)
class SubscriptionConfig:
    """A subscription: a pair of keys giving access to a product, an API or every API.

    ``scope`` is a product id, an API name, or ``"all"``. The keys never appear in
    ``repr``/``str``; read from the file they may come from environment variables.
    """

    id: str = attrs.field(validator=_api_name)
    scope: str = attrs.field(validator=_scope)
    primary_key: str = attrs.field(repr=False, validator=_SUBSCRIPTION_KEY)
    secondary_key: str | None = attrs.field(default=None, repr=False, validator=_SUBSCRIPTION_KEY)
    state: str = attrs.field(default="active", validator=one_of("active", "suspended"))

    def __attrs_post_init__(self) -> None:
        if self.secondary_key is not None and self.secondary_key == self.primary_key:
            raise KeyedValueError([("secondary_key", "must differ from primary_key")])

    @property
    def keys(self) -> tuple[str, ...]:
        """The subscription's keys: primary, then secondary if it has one."""
        return tuple(key for key in (self.primary_key, self.secondary_key) if key is not None)


@attrs.frozen(kw_only=True)
class Config:
    """A whole gateway configuration; ``source`` is the file it was loaded from, if any.

    Building one checks the references between tables (every product an API or a
    subscription scope names exists; product ids and API names differ, since both
    may be a subscription's scope; no key is shared) and resolves each API's
    ``subscription_required``: an API that leaves it unset requires a subscription
    exactly when one of its products does (an API in no product: false).
    """

    gateway: GatewayConfig = GatewayConfig()
    apis: tuple[ApiConfig, ...] = attrs.field(
        default=(), converter=_api_tuple, validator=_unique("name", "path")
    )
    products: tuple[ProductConfig, ...] = attrs.field(
        default=(), converter=_product_tuple, validator=_unique("id")
    )
    subscriptions: tuple[SubscriptionConfig, ...] = attrs.field(
        default=(), converter=_subscription_tuple, validator=_unique("id")
    )
    #: The admin listener (management API, metrics, health); None: not started.
    admin: AdminConfig | None = None
    #: Redis shared by every unit for the limits policies; None: counters in memory.
    cluster: ClusterConfig | None = None
    source: Path | None = None
    _derived: dict[Hashable, Any] = attrs.field(init=False, factory=dict, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        problems = _reference_problems(self)
        if problems:
            raise KeyedValueError(problems)
        products = {product.id: product for product in self.products}
        apis = tuple(
            api
            if api.subscription_required is not None
            else attrs.evolve(
                api,
                subscription_required=any(
                    products[pid].subscription_required for pid in api.products
                ),
            )
            for api in self.apis
        )
        object.__setattr__(self, "apis", apis)

    def product(self, product_id: str) -> ProductConfig | None:
        """The product with this id, or None."""
        return next((p for p in self.products if p.id == product_id), None)

    def derived(self, key: Hashable, make: Callable[[], _T]) -> _T:
        """A value computed once from this (immutable) config and kept with it.

        For caches such as :func:`wsgate.policies.pipeline`; ``key`` names the value.
        """
        try:
            value: _T = self._derived[key]
        except KeyError:
            value = self._derived[key] = make()
        return value

    @property
    def skipped_policies(self) -> list[dict[str, str]]:
        """Every unsupported policy kept at global or product scope, with its scope."""
        scopes: list[tuple[str, tuple[PolicyEntry, ...]]] = [("global", self.gateway.policies)]
        scopes += [(f"product:{p.id}", p.policies) for p in self.products]
        return [
            {"policy": entry.policy_name, "scope": scope}
            for scope, entries in scopes
            for entry in entries
            if isinstance(entry, SkippedPolicy)
        ]


def _reference_problems(config: Config) -> list[tuple[str, str]]:
    """What is wrong between the tables of ``config`` (keys relative to the document)."""
    problems: list[tuple[str, str]] = []
    product_ids = {product.id for product in config.products}
    api_names = {api.name for api in config.apis}
    for i, api in enumerate(config.apis):
        for j, product_id in enumerate(api.products):
            if product_id not in product_ids:
                problems.append(
                    (
                        f"apis[{i}].products[{j}]",
                        f"unknown product {product_id!r}{_hint(product_id, product_ids)}",
                    )
                )
    for i, product in enumerate(config.products):
        if product.id in api_names:
            problems.append(
                (
                    f"products[{i}].id",
                    f"{product.id!r} is also an API name; product ids and API names must differ"
                    " (either may be a subscription's scope)",
                )
            )
    seen: dict[str, str] = {}
    for i, sub in enumerate(config.subscriptions):
        if sub.scope != "all" and sub.scope not in product_ids | api_names:
            problems.append(
                (
                    f"subscriptions[{i}].scope",
                    f"unknown product or API {sub.scope!r}"
                    f"{_hint(sub.scope, product_ids | api_names)}"
                    ' (expected a product id, an API name or "all")',
                )
            )
        for name in ("primary_key", "secondary_key"):
            key = getattr(sub, name)
            where = f"subscriptions[{i}].{name}"
            if key is None:
                continue
            if key in seen:  # never name the key itself: it is a secret
                problems.append(
                    (where, f"same key as {seen[key]}; a key must identify one subscription")
                )
            else:
                seen[key] = where
    return problems


def _hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- reading files ----------------------------------------------------------------------


class _Reported(Exception):
    """The problems were already recorded; stop building the enclosing object.

    ``partial`` holds the fields that were valid, for checks across array items.
    """

    def __init__(self, partial: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self.partial = partial or {}


def _quote(key: str) -> str:
    """A TOML key as written in a dotted key path (quoted unless it is a bare key)."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", key):
        return key
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _join(path: str, key: str) -> str:
    if not path:
        return key
    return path + key if key.startswith("[") else f"{path}.{key}"


@attrs.frozen
class _Key:
    """How one TOML key is read: the TOML values it accepts and how they become the field's."""

    expect: str
    accepts: Callable[[object], bool]
    convert: Callable[[Any, _Reader, str], object] = lambda value, _reader, _path: value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


_STR = _Key("a string", _is_str)
_INT = _Key("an integer", _is_int)
_NUMBER = _Key("a number", _is_number, lambda value, _r, _p: float(value))
_FILE = _Key("a string (file path)", _is_str, lambda value, reader, _p: reader.resolve(value))
_STRINGS = _Key(
    "an array of strings",
    lambda value: isinstance(value, list) and all(isinstance(item, str) for item in value),
    lambda value, _r, _p: tuple(value),
)
_LISTEN = _Key("a string 'host:port'", _is_str, lambda value, _r, _p: Listen.parse(value))
_BOOL = _Key("a boolean", lambda value: isinstance(value, bool))


def _secret_value(value: str | Mapping[str, object], _reader: _Reader, _path: str) -> str:
    """A literal secret, or ``{ env = "NAME" }`` read from the environment now."""
    if isinstance(value, str):
        return value
    name = value.get("env")
    if set(value) != {"env"} or not isinstance(name, str) or not name:
        raise ValueError('expected a string or a table { env = "VARIABLE" }')
    try:
        return os.environ[name]
    except KeyError:
        raise ValueError(f"environment variable {name!r} is not set") from None


_SECRET = _Key(
    'a string or a table { env = "VARIABLE" }',
    lambda value: isinstance(value, str | Mapping),
    _secret_value,
)


def _table(cls: type) -> _Key:
    """A sub-table built into ``cls``."""
    return _Key(
        "a table", lambda value: isinstance(value, Mapping), lambda v, r, p: r.build(cls, v, p)
    )


def _tables(cls: type) -> _Key:
    """An array of tables built into a tuple of ``cls``.

    Items that fail become namespaces of their valid fields, so the field's
    validator (e.g. ``_unique``) still checks them; the problems already recorded
    keep the parent from being built out of them.
    """

    def convert(value: list[object], reader: _Reader, path: str) -> tuple[object, ...]:
        return tuple(
            reader.build_or_partial(cls, item, f"{path}[{i}]") for i, item in enumerate(value)
        )

    return _Key("an array of tables", lambda value: isinstance(value, list), convert)


def _policy_tables(scope: str) -> _Key:
    """An array of policy tables (see :meth:`_Reader.build_policy`) at ``scope``."""

    def convert(value: list[object], reader: _Reader, path: str) -> tuple[object, ...]:
        entries, failed = [], False
        for index, item in enumerate(value):
            try:
                entries.append(reader.build_policy(item, f"{path}[{index}]", scope))
            except _Reported:
                failed = True
        if failed:
            raise _Reported
        return tuple(entries)

    return _Key("an array of tables", lambda value: isinstance(value, list), convert)


_SPECS: dict[type, Mapping[str, _Key]] = {
    TLSConfig: {"certificate": _FILE, "private_key": _FILE},
    AdminConfig: {
        "listen": _LISTEN,
        "token": _SECRET,
        "tls": _table(TLSConfig),
        "state_file": _FILE,
    },
    ClusterConfig: {
        "redis_url": _SECRET,
        "key_prefix": _STR,
        "timeout": _NUMBER,
        "on_unavailable": _STR,
        "lease_ttl": _NUMBER,
    },
    GatewayConfig: {
        "listen": _LISTEN,
        "max_connections": _INT,
        "handshake_timeout": _NUMBER,
        "backend_connect_timeout": _NUMBER,
        "close_timeout": _NUMBER,
        "drain_timeout": _NUMBER,
        "tcp_keepalive": _INT,
        "tcp_keepalive_interval": _INT,
        "tcp_keepalive_probes": _INT,
        "redact_query_parameters": _STRINGS,
        "tls": _table(TLSConfig),
        "relay_engine": _STR,
        "policies": _policy_tables("global"),
        "trusted_proxies": _STRINGS,
        "proxy_protocol": _BOOL,
        "forwarded_header": _STR,
    },
    ApiConfig: {
        "name": _STR,
        "display_name": _STR,
        "path": _STR,
        "service_url": _STR,
        "max_message_size": _INT,
        "idle_timeout": _NUMBER,
        "backend_ca_file": _FILE,
        "products": _STRINGS,
        "subscription_required": _BOOL,
        "subscription_key_header": _STR,
        "subscription_key_query": _STR,
        "policies": _policy_tables("api"),
        "inherit_policies": _BOOL,
    },
    ProductConfig: {
        "id": _STR,
        "display_name": _STR,
        "subscription_required": _BOOL,
        "policies": _policy_tables("product"),
        "inherit_policies": _BOOL,
    },
    SubscriptionConfig: {
        "id": _STR,
        "scope": _STR,
        "primary_key": _SECRET,
        "secondary_key": _SECRET,
        "state": _STR,
    },
    Config: {
        "gateway": _table(GatewayConfig),
        "admin": _table(AdminConfig),
        "cluster": _table(ClusterConfig),
        "apis": _tables(ApiConfig),
        "products": _tables(ProductConfig),
        "subscriptions": _tables(SubscriptionConfig),
    },
}


def _error_text(exc: Exception) -> str:
    """A validation error as one line (attrs' own validators put extra args in theirs)."""
    args = exc.args
    if (
        isinstance(exc, TypeError)
        and len(args) == 4
        and isinstance(args[1], attrs.Attribute)
        and isinstance(args[2], type | tuple)
    ):
        types = args[2] if isinstance(args[2], tuple) else (args[2],)
        expected = " or ".join(_describe_type(t) for t in types)
        return f"expected {expected}, got {describe(args[3])}"
    if len(args) > 1 and isinstance(args[0], str):
        return args[0]
    return str(exc)


def _describe_type(cls: type) -> str:
    for types, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (tuple, "an array"),
        (list, "an array"),
        (dict, "a table"),
    ):
        if cls is types:
            return name
    return cls.__name__


def _from_toml(value: object) -> object:
    """TOML arrays reach policy classes as tuples (frozen, hashable configs)."""
    return tuple(value) if isinstance(value, list) else value


@attrs.define
class _Reader:
    """Builds config objects from parsed TOML, recording ``(key path, reason)`` problems."""

    base_dir: Path | None
    problems: list[tuple[str, str]] = attrs.Factory(list)

    def resolve(self, text: str) -> Path:
        # Relative to the config file, so the gateway can be started from anywhere.
        path = Path(text)
        return self.base_dir / path if self.base_dir is not None else path

    def build_or_partial(self, cls: type, data: object, path: str) -> Any:
        try:
            return self.build(cls, data, path)
        except _Reported as exc:
            return SimpleNamespace(**exc.partial)

    def build(self, cls: type, data: object, path: str, **extra: object) -> Any:
        """Build ``cls`` from table ``data`` at key ``path``; raise _Reported on any problem."""
        if not isinstance(data, Mapping):
            self.problems.append((path, f"expected a table, got {describe(data)}"))
            raise _Reported
        spec, fields = _SPECS[cls], attrs.fields_dict(cls)
        before = len(self.problems)
        kwargs: dict[str, object] = dict(extra)
        for key, raw in data.items():
            if key not in spec:
                close = difflib.get_close_matches(str(key), spec, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.problems.append((_join(path, _quote(str(key))), f"unknown key{hint}"))
                continue
            try:
                kwargs[key] = self._field(fields[key], spec[key], raw, _join(path, key))
            except _Reported:
                pass
            except KeyedValueError as exc:
                self.problems.extend((_join(path, k), reason) for k, reason in exc.problems)
            except ValueError as exc:
                self.problems.append((_join(path, key), str(exc)))
        for name, field in fields.items():
            if (
                field.init
                and field.default is attrs.NOTHING
                and name not in data
                and name not in extra
            ):
                self.problems.append((_join(path, name), "missing required key"))
        if len(self.problems) > before:
            raise _Reported(kwargs)
        try:
            return cls(**kwargs)
        except KeyedValueError as exc:
            self.problems.extend((_join(path, k), reason) for k, reason in exc.problems)
        except ValueError as exc:
            self.problems.append((path, str(exc)))
        raise _Reported

    def build_policy(self, data: object, path: str, scope: str) -> object:
        """Build one policy table at ``scope``; raise _Reported on any problem.

        The table's ``policy`` key names the class, its other keys are that class's
        attrs fields. Each field is converted and validated on its own first, so
        every bad key is reported with its path; then the class is built, which runs
        the rules that span fields.
        """
        if not isinstance(data, Mapping):
            self.problems.append((path, f"expected a table, got {describe(data)}"))
            raise _Reported
        name = data.get("policy")
        if not isinstance(name, str):
            reason = (
                "missing required key"
                if name is None
                else f"expected a string, got {describe(name)}"
            )
            self.problems.append((_join(path, "policy"), reason))
            raise _Reported
        settings = {key: value for key, value in data.items() if key != "policy"}
        if name == "base":
            for key in settings:
                self.problems.append(
                    (
                        _join(path, _quote(str(key))),
                        'unknown key: { policy = "base" } takes no other keys',
                    )
                )
            if settings:
                raise _Reported
            return BASE
        if name in UNSUPPORTED_POLICIES:
            if scope == "api":
                self.problems.append((_join(path, "policy"), unsupported_at_api(name)))
                raise _Reported
            return SkippedPolicy(name)
        cls = POLICIES.get(name)
        if cls is None:
            hint = _hint(name, [*POLICIES, "base"])
            self.problems.append((_join(path, "policy"), f"unknown policy {name!r}{hint}"))
            raise _Reported
        fields = {field.alias or field.name: field for field in attrs.fields(cls) if field.init}
        before = len(self.problems)
        kwargs: dict[str, object] = {}
        for key, raw in settings.items():
            field = fields.get(key)
            if field is None:
                hint = _hint(str(key), fields)
                self.problems.append((_join(path, _quote(str(key))), f"unknown key{hint}"))
                continue
            kwargs[key] = value = _from_toml(raw)
            try:
                if callable(field.converter):
                    value = field.converter(value)
                if field.validator is not None:
                    field.validator(None, field, value)
            except KeyedValueError as exc:
                self.problems.extend((_join(path, k), reason) for k, reason in exc.problems)
            except (ValueError, TypeError) as exc:
                self.problems.append((_join(path, key), _error_text(exc)))
            except Exception:
                pass  # the validator needs the instance: building the class below checks it
        for alias, field in fields.items():
            if field.default is attrs.NOTHING and alias not in settings:
                self.problems.append((_join(path, alias), "missing required key"))
        if len(self.problems) > before:
            raise _Reported
        try:
            return cls(**kwargs)
        except KeyedValueError as exc:
            self.problems.extend((_join(path, k), reason) for k, reason in exc.problems)
        except (ValueError, TypeError) as exc:
            attr = exc.args[1] if len(exc.args) > 1 else None
            if isinstance(attr, attrs.Attribute):
                name = attr.alias or attr.name
                self.problems.append((_join(path, name), _error_text(exc)))
            else:
                self.problems.append((path, _error_text(exc)))
        raise _Reported

    def _field(self, field: attrs.Attribute[Any], key: _Key, raw: object, path: str) -> object:
        """Type-check, convert and validate one value, as the class's own __init__ would."""
        if not key.accepts(raw):
            raise ValueError(f"expected {key.expect}, got {describe(raw)}")
        value = key.convert(raw, self, path)
        if callable(field.converter):
            value = field.converter(value)
        if field.validator is not None:
            field.validator(None, field, value)
        return value


def parse_config(
    data: Mapping[str, object], *, source: str = "<config>", base_dir: Path | None = None
) -> Config:
    """Build a :class:`Config` from an already-parsed document (tomllib, JSON...).

    Relative file paths are resolved against ``base_dir`` (the current directory
    if None). Every problem is collected and raised as one ConfigError whose lines
    read ``"SOURCE: KEY: reason"``.
    """
    return _parse(data, source, base_dir, None)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file; ConfigError lists every problem in it."""
    file = Path(path).absolute()
    return _parse(read_toml(path), os.fspath(path), file.parent, file)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file's TOML document, unvalidated; ConfigError if it cannot be read."""
    label = os.fspath(path)
    try:
        return tomllib.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError([f"{label}: cannot read config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{label}: not valid UTF-8: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{label}: invalid TOML: {exc}"]) from None


def _parse(data: object, label: str, base_dir: Path | None, source: Path | None) -> Config:
    reader = _Reader(base_dir)
    try:
        config: Config = reader.build(Config, data, "", source=source)
    except _Reported:
        raise ConfigError(
            [
                f"{label}: {key}: {reason}" if key else f"{label}: {reason}"
                for key, reason in reader.problems
            ]
        ) from None
    skipped = config.skipped_policies
    if skipped:
        structlog.get_logger("wsgate").warning(
            "config_policies_skipped",
            config=label,
            policies=skipped,
            detail="not supported by the onHandshake operation; skipped at run time",
        )
    return config
