"""Who the client is, behind balancers: the one rule, as pure functions.

The peer of a connection (the TCP peer, or the address a trusted balancer's
PROXY protocol header named) is the client unless it is a trusted proxy. From a
trusted proxy only, the forwarding header is read from the right, one hop per
entry, and the first address that is not itself a trusted proxy is the client:
entries further left were written by whoever connected to that hop, possibly
the client itself, so they prove nothing. If every entry is trusted, the
leftmost is the client. An entry that is not an address (``unknown``, an
obfuscated RFC 7239 name, garbage) ends the walk: the client is then the last
trusted hop, the one that reported it. From any other peer the headers are
ignored here (and passed on upstream, after the peer, as before).

Only one header is read, the one the trusted proxies are configured to append
(``forwarded_header``): with both read, a client could add the other one,
which the proxy passes on untouched, and choose its own address.
``X-Forwarded-Proto`` (or the ``proto=`` of the chosen ``Forwarded`` element)
follows the same trust.

docs/security.md gives the rule with examples.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

import attrs

from .validate import parse_network

__all__ = [
    "FORWARDED_HEADERS",
    "ClientAddress",
    "TrustedProxies",
    "client_address",
    "parse_address",
    "parse_network",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The forwarding headers a config may name (lower case).
FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")

_SECURE = {"https": True, "wss": True, "http": False, "ws": False}


def _unmapped(ip: IPAddress) -> IPAddress:
    # A dual-stack socket names an IPv4 peer ::ffff:a.b.c.d; trust lists say a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_address(text: str) -> IPAddress | None:
    """An IP from a forwarding entry or a peer name, without port or brackets; None if none.

    Takes ``192.0.2.1``, ``192.0.2.1:443``, ``2001:db8::1``, ``[2001:db8::1]`` and
    ``[2001:db8::1]:443``; a zone (``fe80::1%eth0``) is dropped.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
    else:
        host = text
    try:
        return _unmapped(ipaddress.ip_address(host.partition("%")[0]))
    except ValueError:
        return None


@attrs.frozen
class TrustedProxies:
    """The addresses and CIDR ranges whose forwarding headers and PROXY headers count."""

    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, texts: Iterable[str]) -> TrustedProxies:
        """From config strings; ValueError on the first bad one."""
        return cls(tuple(parse_network(text) for text in texts))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: IPAddress | str | None) -> bool:
        """Whether ``ip`` (an address object or a peer name) is a trusted proxy."""
        if isinstance(ip, str):
            ip = parse_address(ip)
        if ip is None:
            return False
        return any(ip in network for network in self.networks)


@attrs.frozen
class ClientAddress:
    """The client as far as the trusted hops can tell.

    ``ip``: its address. ``secure``: whether it reached the first trusted hop
    over TLS, as that hop said (None: no trusted hop said, use the
    connection's own).
    """

    ip: str
    secure: bool | None = None


def client_address(
    peer: str,
    headers: Sequence[tuple[str, str]],
    trusted: TrustedProxies,
    *,
    header: str = "x-forwarded-for",
) -> ClientAddress:
    """The client behind ``peer``, from the request ``headers`` (names lower case).

    ``header`` is the forwarding header the trusted proxies append:
    ``x-forwarded-for`` or ``forwarded``. See the module docstring for the rule.
    """
    if not trusted.trusts(peer):
        return ClientAddress(peer)
    if header == "forwarded":
        hops = _forwarded(headers)
    else:
        hops = [(entry, None) for entry in _tokens(headers, "x-forwarded-for")]
    client, chosen = peer, len(hops)  # chosen: the entry naming the client (len: the peer)
    for index in range(len(hops) - 1, -1, -1):
        ip = parse_address(hops[index][0] or "")
        if ip is None:
            break  # the hop that wrote it (or the peer) stays the client
        client, chosen = str(ip), index
        if not trusted.trusts(ip):
            break
    if header == "forwarded":
        proto = hops[chosen][1] if chosen < len(hops) else None
    else:
        proto = _aligned(_tokens(headers, "x-forwarded-proto"), chosen, len(hops))
    return ClientAddress(client, _SECURE.get((proto or "").lower()))


def _tokens(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    """Every comma-separated item of every ``name`` header, in order."""
    return [item.strip() for key, value in headers if key == name for item in value.split(",")]


def _aligned(protos: list[str], index: int, hops: int) -> str | None:
    """The X-Forwarded-Proto item for hop ``index``: aligned when both lists match, else the last.

    Proxies that append to both keep the lists aligned; one that sets a single
    value (the usual TLS-terminating balancer) speaks for its own hop.
    """
    if not protos:
        return None
    if len(protos) == hops and index < hops:
        return protos[index]
    return protos[-1]


def _forwarded(headers: Sequence[tuple[str, str]]) -> list[tuple[str | None, str | None]]:
    """RFC 7239 elements as (for, proto); for is None in an element that lacks it or is broken."""
    text = ", ".join(value for key, value in headers if key == "forwarded")
    hops: list[tuple[str | None, str | None]] = []
    for element in _split(text, ","):
        if not element.strip():
            continue
        pairs: dict[str, str] = {}
        broken = False
        for pair in _split(element, ";"):
            key, sep, value = pair.strip().partition("=")
            if not sep or not key:
                broken = True
                continue
            unquoted = _unquote(value.strip())
            if unquoted is None:
                broken = True
                continue
            pairs.setdefault(key.strip().lower(), unquoted)
        hops.append((None if broken else pairs.get("for"), pairs.get("proto")))
    return hops


def _split(text: str, separator: str) -> list[str]:
    """``text`` split on ``separator`` outside quoted strings."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str | None:
    """A token or a quoted-string's content; None if the quoting is broken."""
    if not value.startswith('"'):
        return None if '"' in value or not value else value
    if len(value) < 2 or not value.endswith('"'):
        return None
    out, escaped = [], False
    for char in value[1:-1]:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return None
        else:
            out.append(char)
    return None if escaped else "".join(out)
