"""The request-shaping and access policies: pure logic on a HandshakeContext, no I/O.

check-header, ip-filter, set-header, set-query-parameter, rewrite-uri,
set-backend-service, authentication-basic, return-response. docs/policies.md
documents each with an example. Every class validates its settings when built,
so the config is refused at load rather than a handshake failing later.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, unquote_plus

import attrs

from wsgate.addresses import BackendURL
from wsgate.errors import HandshakeRejected
from wsgate.handshake import end_to_end
from wsgate.policy import HandshakeContext, PolicyResponse
from wsgate.validate import (
    KeyedValueError,
    address_ranges,
    boolean,
    describe,
    has_space_or_control,
    header_name,
    http_status,
    key_spec,
    keyed,
    one_of,
    optional,
    parse_network,
    valid_header_name,
    valid_key_spec,
)

from .registry import register

__all__ = [
    "AuthenticationBasic",
    "CheckHeader",
    "IpFilter",
    "ReturnResponse",
    "RewriteUri",
    "SetBackendService",
    "SetHeader",
    "SetQueryParameter",
]

if TYPE_CHECKING:
    _Attribute = attrs.Attribute[Any]
_EXISTS_ACTIONS = ("override", "skip", "append", "delete")


# --- shared validators and converters ---------------------------------------------------


def _string_tuple(value: object) -> tuple[str, ...]:
    if (
        isinstance(value, str)
        or not isinstance(value, list | tuple)
        or not all(isinstance(item, str) for item in value)
    ):
        raise ValueError(f"expected an array of strings, got {describe(value)}")
    return tuple(value)


@keyed
def _text(_inst: object, _attr: _Attribute, value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe(value)}")


def _managed_header(name: str) -> bool:
    """Whether the gateway owns ``name`` for each hop (the rule lives in end_to_end)."""
    return not end_to_end([(name, "")])


@keyed
def _settable_header(inst: object, attr: _Attribute, value: str) -> None:
    header_name(inst, attr, value)
    if _managed_header(value):
        raise ValueError(
            f"{value!r} cannot be set by a policy: the gateway manages it for each hop"
            " (Host, Connection, Upgrade, Content-Length, Transfer-Encoding, Keep-Alive,"
            " Sec-WebSocket-*, ...)"
        )


def _header_value_problem(value: str) -> str | None:
    """Why ``value`` cannot go in an HTTP/1.1 header, or None."""
    if any(ch in value for ch in "\r\n\0"):
        return "must not contain CR, LF or NUL"
    if not all(ch == "\t" or " " <= ch <= "~" for ch in value):
        return "must contain only printable ASCII characters"
    if value != value.strip(" \t"):
        return "must not start or end with whitespace"
    return None


@keyed
def _header_value(_inst: object, _attr: _Attribute, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe(value)}")
    problem = _header_value_problem(value)
    if problem:
        raise ValueError(problem)


def _request_value(ctx: HandshakeContext, spec: str, what: str) -> str | None:
    """``ctx.key(spec)`` made safe for a header; 400 if the request's value cannot be."""
    value = ctx.key(spec)
    if value is None:
        return None
    value = value.strip(" \t")
    if _header_value_problem(value):
        raise HandshakeRejected(
            400,
            f"the request's {spec} cannot be used as a {what}",
            reason="InvalidRequestValue",
        )
    return value


def _value_or_from(inst: Any) -> None:
    """``value`` xor ``value_from``, neither with exists_action = "delete"."""
    given = [name for name in ("value", "value_from") if getattr(inst, name) is not None]
    if inst.exists_action == "delete":
        if given:
            raise KeyedValueError([(given[0], 'not used with exists_action = "delete"')])
    elif len(given) != 1:
        key = given[1] if given else "value"
        raise KeyedValueError([(key, "give exactly one of value and value_from")])


# --- check-header -----------------------------------------------------------------------


@register("check-header")
@attrs.frozen(kw_only=True)
class CheckHeader:
    """Refuse the handshake unless header ``name`` is present (with one of ``values``).

    The header is looked up in the request as shaped so far (so an earlier
    set-header counts); headers the gateway manages per hop (Host, Upgrade,
    Sec-WebSocket-*, ...) are looked up in the client's request. With ``values``
    each occurrence's whole value is compared (in constant time).
    """

    policy_name: ClassVar[str]

    name: str = attrs.field(validator=header_name)
    values: tuple[str, ...] = attrs.field(default=(), converter=_string_tuple)
    ignore_case: bool = attrs.field(default=True, validator=boolean)
    failed_check_httpcode: int = attrs.field(default=401, validator=http_status(400, 599))
    failed_check_error_message: str = attrs.field(
        default=attrs.Factory(
            lambda self: f"Missing or invalid header {self.name}", takes_self=True
        ),
        validator=_text,
    )

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        low = self.name.lower()
        source = ctx.request.headers if _managed_header(low) else ctx.headers
        present = [value.strip() for key, value in source if key.lower() == low]
        if present and (not self.values or any(map(self._allowed, present))):
            return
        raise HandshakeRejected(
            self.failed_check_httpcode,
            self.failed_check_error_message,
            reason="HeaderCheckFailed",
            source=self.policy_name,
        )

    def _allowed(self, value: str) -> bool:
        fold = str.casefold if self.ignore_case else str
        got = fold(value).encode()
        matched = False
        for allowed in self.values:
            matched |= hmac.compare_digest(got, fold(allowed).encode())
        return matched


# --- ip-filter --------------------------------------------------------------------------

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@register("ip-filter")
@attrs.frozen(kw_only=True)
class IpFilter:
    """Allow only, or forbid, callers whose IP is in ``addresses`` (IPs and CIDR ranges).

    The caller's IP is the TCP peer's, or the client a peer in ``trusted_proxies``
    names (wsgate.clientaddr); an IPv4-mapped
    IPv6 peer (``::ffff:192.0.2.1``) is matched as the IPv4 address. 403 otherwise.
    """

    policy_name: ClassVar[str]

    action: str = attrs.field(validator=one_of("allow", "forbid"))
    addresses: tuple[str, ...] = attrs.field(
        converter=_string_tuple, validator=address_ranges(required=True)
    )
    networks: tuple[_Network, ...] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "networks", tuple(map(parse_network, self.addresses)))

    def matches(self, client_ip: str) -> bool | None:
        """Whether ``client_ip`` is in the list; None if it is not an IP address."""
        try:
            ip = ipaddress.ip_address(client_ip.partition("%")[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        listed = self.matches(ctx.request.client_ip)
        if listed is not None and listed == (self.action == "allow"):
            return
        raise HandshakeRejected(
            403,
            "Caller IP address is not allowed to access this API.",
            reason="CallerIpNotAllowed",
            source=self.policy_name,
        )


# --- set-header -------------------------------------------------------------------------


@register("set-header")
@attrs.frozen(kw_only=True)
class SetHeader:
    """Set, append or delete a header of the backend request.

    ``value`` is literal; ``value_from`` is a key (``claim:sub``, ``header:X-A``,
    ``ip``...) read from the request. When ``value_from`` has no value, override
    deletes the header (so a client cannot supply it instead) and the other
    actions do nothing.
    """

    policy_name: ClassVar[str]

    name: str = attrs.field(validator=_settable_header)
    value: str | None = attrs.field(default=None, validator=_header_value)
    value_from: str | None = attrs.field(default=None, validator=optional(key_spec))
    exists_action: str = attrs.field(default="override", validator=one_of(*_EXISTS_ACTIONS))

    def __attrs_post_init__(self) -> None:
        _value_or_from(self)

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        low = self.name.lower()
        others = [(key, value) for key, value in ctx.headers if key.lower() != low]
        if self.exists_action == "delete":
            ctx.headers = others
            return
        if self.value_from is not None:
            value = _request_value(ctx, self.value_from, "header value")
        else:
            value = self.value
        if value is None:
            if self.exists_action == "override":
                ctx.headers = others
            return
        exists = len(others) != len(ctx.headers)
        if self.exists_action == "skip" and exists:
            return
        if self.exists_action == "override":
            ctx.headers = others
        ctx.headers.append((low, value))


# --- set-query-parameter ----------------------------------------------------------------


@keyed
def _param_name(_inst: object, _attr: _Attribute, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {describe(value)}")
    if any(not ch.isprintable() for ch in value):
        raise ValueError("must not contain control characters")


@keyed
def _optional_text(inst: object, attr: _Attribute, value: object) -> None:
    if value is not None:
        _text(inst, attr, value)


def _param_names(query: str) -> list[str]:
    return [unquote_plus(part.partition("=")[0]) for part in query.split("&")] if query else []


@register("set-query-parameter")
@attrs.frozen(kw_only=True)
class SetQueryParameter:
    """Set, append or delete a query parameter of the backend request (values percent-encoded).

    ``value_from`` works as in set-header.
    """

    policy_name: ClassVar[str]

    name: str = attrs.field(validator=_param_name)
    value: str | None = attrs.field(default=None, validator=_optional_text)
    value_from: str | None = attrs.field(default=None, validator=optional(key_spec))
    exists_action: str = attrs.field(default="override", validator=one_of(*_EXISTS_ACTIONS))

    def __attrs_post_init__(self) -> None:
        _value_or_from(self)

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        parts = ctx.query.split("&") if ctx.query else []
        others = [p for p in parts if unquote_plus(p.partition("=")[0]) != self.name]
        if self.exists_action == "delete":
            ctx.query = "&".join(others)
            return
        value = self.value if self.value_from is None else ctx.key(self.value_from)
        if value is None:
            if self.exists_action == "override":
                ctx.query = "&".join(others)
            return
        if self.exists_action == "skip" and len(others) != len(parts):
            return
        kept = others if self.exists_action == "override" else parts
        ctx.query = "&".join([*kept, f"{quote(self.name, safe='')}={quote(value, safe='')}"])


# --- rewrite-uri ------------------------------------------------------------------------


@attrs.frozen
class _Var:
    """A ``{placeholder}`` of a rewrite-uri template."""

    spec: str


_Parts = tuple[str | _Var, ...]
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_PLACEHOLDER_TEXT = re.compile(r"[^\s{}&=?#]+")


def _parse_parts(text: str, *, in_path: bool) -> _Parts:
    """Split ``text`` into literals and placeholders; ValueError names the problem."""
    parts: list[str | _Var] = []
    pos = 0
    for match in _TOKEN.finditer(text):
        parts.append(text[pos : match.start()])
        token, spec = match.group(0), match.group(1)
        if token in ("{{", "}}"):
            parts.append(token[0])
        elif spec is None:
            raise ValueError("unbalanced brace: write '{{' or '}}' for a literal one")
        elif spec == "rest" and in_path:
            parts.append(_Var(spec))
        elif spec == "rest":
            raise ValueError("{rest} is only allowed in the path")
        elif _PLACEHOLDER_TEXT.fullmatch(spec) and valid_key_spec(spec):
            parts.append(_Var(spec))
        else:
            raise ValueError(
                f"unknown placeholder {{{spec}}}: use {{rest}}, {{ip}}, {{subscription}},"
                " {api}, {product}, {header:NAME}, {query:NAME} or {claim:NAME}"
            )
        pos = match.end()
    parts.append(text[pos:])
    return tuple(part for part in parts if part != "")


@attrs.frozen
class _Template:
    path: _Parts
    query: tuple[tuple[str, bool, _Parts], ...]  # (literal name, has "=", value)
    claimed: frozenset[str]  # query parameters the template sets or reads


def _parse_template(text: str) -> _Template:
    if not text.startswith("/"):
        raise ValueError(f"must start with '/' (it is relative to the backend URL), got {text!r}")
    if has_space_or_control(text) or "#" in text:
        raise ValueError("must not contain whitespace, control characters or '#'")
    path_text, _, query_text = text.partition("?")
    path = _parse_parts(path_text, in_path=True)
    literal = "".join(part if isinstance(part, str) else "x" for part in path)
    if any(segment in (".", "..") for segment in literal.split("/")):
        raise ValueError("'.' and '..' segments are not allowed")
    query: list[tuple[str, bool, _Parts]] = []
    for piece in query_text.split("&") if query_text else ():
        name, eq, value = piece.partition("=")
        if not name or "{" in name or "}" in name:
            raise ValueError(f"query parameter names must be literal and non-empty, got {piece!r}")
        query.append((name, bool(eq), _parse_parts(value, in_path=False)))
    read = {
        part.spec.partition(":")[2]
        for part in (*path, *(p for _, _, value in query for p in value))
        if isinstance(part, _Var) and part.spec.startswith("query:")
    }
    return _Template(
        tuple(path), tuple(query), frozenset(read | {unquote_plus(n) for n, _, _ in query})
    )


@keyed
def _template(_inst: object, _attr: _Attribute, value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe(value)}")
    _parse_template(value)


class _Missing(Exception):
    def __init__(self, spec: str) -> None:
        self.spec = spec


def _render(parts: _Parts, ctx: HandshakeContext, *, in_path: bool) -> str:
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif part.spec == "rest":
            out.append(ctx.rest.removeprefix("/"))
        else:
            value = ctx.key(part.spec)
            if value is None or (in_path and value in ("", ".", "..")):
                raise _Missing(part.spec)
            out.append(quote(value, safe=""))
    return "".join(out)


@register("rewrite-uri")
@attrs.frozen(kw_only=True)
class RewriteUri:
    """Rewrite the backend request's path and query from a template.

    The template is relative to the backend URL's path (it cannot change the
    host). ``{rest}`` is the client's path below the API's suffix, as sent; the
    other placeholders are keys (``{header:X-Tenant}``, ``{query:room}``,
    ``{claim:sub}``, ``{ip}``...) whose values are percent-encoded. A path
    placeholder without a value fails the handshake with 400; a query parameter
    whose placeholder has none is left out. With ``copy_unmatched_params`` the
    client's query parameters that the template neither sets nor reads follow
    the template's.
    """

    policy_name: ClassVar[str]

    template: str = attrs.field(validator=_template)
    copy_unmatched_params: bool = attrs.field(default=True, validator=boolean)
    parsed: _Template = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "parsed", _parse_template(self.template))

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        try:
            path = _render(self.parsed.path, ctx, in_path=True)
        except _Missing as missing:
            raise HandshakeRejected(
                400,
                f"the request has no usable value for {{{missing.spec}}} of the backend URL",
                reason="RewriteUriValueMissing",
                source=self.policy_name,
            ) from None
        query = []
        for name, eq, value in self.parsed.query:
            try:
                query.append(f"{name}={_render(value, ctx, in_path=False)}" if eq else name)
            except _Missing:
                continue
        if self.copy_unmatched_params and ctx.query:
            query += [
                part
                for part in ctx.query.split("&")
                if unquote_plus(part.partition("=")[0]) not in self.parsed.claimed
            ]
        ctx.rest = path
        ctx.query = "&".join(query)


# --- set-backend-service ----------------------------------------------------------------


@keyed
def _base_url(_inst: object, _attr: _Attribute, value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe(value)}")
    BackendURL.parse(value)


@register("set-backend-service")
@attrs.frozen(kw_only=True)
class SetBackendService:
    """Send the handshake to another ws:// or wss:// backend, fixed in config.

    The client's path below the API's suffix and its query are appended as for
    the API's own service_url. Nothing in the request can choose the host.
    """

    policy_name: ClassVar[str]

    base_url: str = attrs.field(validator=_base_url)
    backend: BackendURL = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "backend", BackendURL.parse(self.base_url))

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        ctx.backend = self.backend


# --- authentication-basic ---------------------------------------------------------------


@keyed
def _username(_inst: object, _attr: _Attribute, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {describe(value)}")
    if ":" in value or any(not ch.isprintable() for ch in value):
        raise ValueError("must not contain ':' or control characters")


@keyed
def _password(_inst: object, _attr: _Attribute, value: object) -> None:
    # Never put the value in a message: it is a secret.
    if not isinstance(value, str):
        raise ValueError("expected a string")
    if any(not ch.isprintable() for ch in value):
        raise ValueError("must not contain control characters")


@register("authentication-basic")
@attrs.frozen(kw_only=True)
class AuthenticationBasic:
    """Authenticate to the backend with HTTP Basic (replaces any client Authorization)."""

    policy_name: ClassVar[str]

    username: str = attrs.field(validator=_username)
    password: str = attrs.field(repr=False, validator=_password)
    header_value: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        object.__setattr__(self, "header_value", f"Basic {token}")

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        ctx.headers = [(k, v) for k, v in ctx.headers if k.lower() != "authorization"]
        ctx.headers.append(("authorization", self.header_value))


# --- return-response --------------------------------------------------------------------


def _header_pairs(value: object) -> tuple[tuple[str, str], ...]:
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list | tuple) and all(
        isinstance(item, list | tuple) and len(item) == 2 for item in value
    ):
        items = [tuple(item) for item in value]
    else:
        raise ValueError(
            'expected a table { Name = "value" } or an array of ["Name", "value"] pairs,'
            f" got {describe(value)}"
        )
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in items):
        raise ValueError("header names and values must be strings")
    return tuple((k, v) for k, v in items)


def _response_headers(_inst: object, attr: _Attribute, value: tuple[tuple[str, str], ...]) -> None:
    problems = []
    for name, text in value:
        if not valid_header_name(name):
            problems.append((attr.name, f"invalid header name {name!r}"))
        elif _managed_header(name):
            problems.append((attr.name, f"{name!r} cannot be set: the gateway writes it"))
        elif problem := _header_value_problem(text):
            problems.append((attr.name, f"{name}: {problem}"))
    if problems:
        raise KeyedValueError(problems)


@register("return-response")
@attrs.frozen(kw_only=True)
class ReturnResponse:
    """Answer the handshake with ``status``, ``headers`` and ``body``; the backend is not used."""

    policy_name: ClassVar[str]

    status: int = attrs.field(default=200, validator=http_status(200, 599))
    headers: tuple[tuple[str, str], ...] = attrs.field(
        default=(), converter=_header_pairs, validator=_response_headers
    )
    body: str = attrs.field(default="", validator=_text)

    async def on_handshake(self, ctx: HandshakeContext) -> None:
        raise PolicyResponse(self.status, headers=list(self.headers), body=self.body.encode())
