"""The PROXY protocol header (HAProxy's v1 text and v2 binary), sans-io.

A balancer in TCP mode (HAProxy ``send-proxy-v2``, nginx ``proxy_protocol on``,
AWS NLB) sends one header before the client's first byte, naming the client's
address. :class:`ProxyHeaderParser` takes bytes as they arrive and returns the
:class:`ProxyHeader` once it is complete; the bytes read past it
(:attr:`~ProxyHeaderParser.trailing`: the start of the HTTP request or of a TLS
ClientHello) belong to whatever reads next. Nothing here awaits or touches a
socket; :mod:`wsgate.gateway` feeds it and decides what to do with the result.

Why not the ``proxy-protocol`` package (0.11.3 on PyPI): its parser wants the
caller to read exactly the bytes it asks for (``readexactly`` for v2, a line
for v1), which a non-blocking socket read into a shared buffer cannot do
without over-reading; it does not say how many bytes the header took; it lets a
foreign ``struct.error`` out of a v2 block too short for its address family;
its v1 reader has no length limit and takes ports such as ``+80`` or ``1_0``;
and it is an "Alpha" asyncio library. The spec (haproxy doc/proxy-protocol.txt)
is small enough to follow here, and fuzzing keeps this honest
(tests/test_proxyproto.py).
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

from .errors import ProxyHeaderError

__all__ = ["MAX_HEADER", "ProxyHeader", "ProxyHeaderError", "ProxyHeaderParser", "RefusalLog"]

#: The v2 signature: starts with CRLF CRLF so that no HTTP request can begin with it.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_SIGNATURE = b"PROXY "
#: The spec's longest v1 line, CRLF included ("PROXY TCP6 ffff:...:ffff 65535 65535\r\n").
MAX_V1 = 107
#: The longest v2 header we take (16 fixed bytes, addresses and TLVs). The spec
#: allows 64 KiB of TLVs; balancers send a few hundred bytes (ALPN, authority,
#: unique id, TLS details). More is refused rather than buffered.
MAX_HEADER = 4096

_V2_FIXED = 16
# Address block length by v2 family nibble (byte 13, high half): AF_UNSPEC, AF_INET,
# AF_INET6, AF_UNIX.
_V2_ADDRESS_LENGTH = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}
_V2_FAMILY = {0x0: "UNSPEC", 0x1: "TCP4", 0x2: "TCP6", 0x3: "UNIX"}


@attrs.frozen
class ProxyHeader:
    """What a PROXY protocol header said.

    ``source`` is the client's (ip, port) when the header names one: a v1
    ``TCP4``/``TCP6`` line or a v2 ``PROXY`` command over IPv4/IPv6. It is None
    for a v2 ``LOCAL`` command (the balancer's own health check), a v1
    ``UNKNOWN`` line, and the UNSPEC and UNIX families: the spec says to use the
    connection's real addresses then.
    """

    version: int
    command: str  # "PROXY" or "LOCAL"
    family: str  # "TCP4", "TCP6", "UNIX", "UNSPEC" or (v1) "UNKNOWN"
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    length: int = 0  # bytes the header took


class ProxyHeaderParser:
    """Sans-io reader of the one PROXY header a connection starts with.

    :meth:`feed` bytes as they arrive (``b""`` at end of stream); it returns the
    header once complete and raises :class:`ProxyHeaderError` as soon as the
    bytes cannot be one: the first byte that matches neither signature refuses
    an HTTP request sent straight to the port, before any of it is parsed.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: ProxyHeader | None = None
        self.trailing = b""  # bytes past the header, once it is complete

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyHeader | None:
        """Take the next bytes; the header once complete, else None (need more)."""
        if self._header is not None:
            raise RuntimeError("the PROXY header was complete already")
        if not data:
            raise ProxyHeaderError(
                "truncated",
                "connection closed before a complete PROXY protocol header"
                if self._buffer
                else "connection closed before a PROXY protocol header",
            )
        self._buffer += data
        header = self._parse(bytes(self._buffer))
        if header is not None:
            self._header = header
            self.trailing = bytes(self._buffer[header.length :])
            self._buffer.clear()
        return header

    def _parse(self, data: bytes) -> ProxyHeader | None:
        probe = data[: len(V2_SIGNATURE)]
        if V2_SIGNATURE.startswith(probe):
            return _parse_v2(data) if len(data) >= len(V2_SIGNATURE) else None
        probe = data[: len(V1_SIGNATURE)]
        if V1_SIGNATURE.startswith(probe):
            return _parse_v1(data) if len(data) >= len(V1_SIGNATURE) else None
        raise ProxyHeaderError("not_proxy", "the connection did not start with a PROXY header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1)
    if end < 0:
        if len(data) >= MAX_V1 or b"\n" in data[:MAX_V1]:
            raise ProxyHeaderError("malformed", "PROXY v1 line is not CRLF-terminated in 107 bytes")
        return None
    try:
        line = data[len(V1_SIGNATURE) : end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("malformed", "PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    length = end + 2
    if parts[0] == "UNKNOWN":
        # The spec: the rest of the line, whatever it holds, is to be ignored.
        return ProxyHeader(1, "PROXY", "UNKNOWN", length=length)
    if parts[0] not in ("TCP4", "TCP6") or len(parts) != 5:
        raise ProxyHeaderError(
            "malformed", "PROXY v1 line must be 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'"
        )
    family, source, destination, sport, dport = parts
    kind = ipaddress.IPv4Address if family == "TCP4" else ipaddress.IPv6Address
    try:
        src, dst = kind(source), kind(destination)
    except ValueError:
        raise ProxyHeaderError("malformed", f"PROXY v1 addresses are not {family}") from None
    return ProxyHeader(
        1,
        "PROXY",
        family,
        source=(str(src), _v1_port(sport)),
        destination=(str(dst), _v1_port(dport)),
        length=length,
    )


def _v1_port(text: str) -> int:
    # Digits only: int() would also take "+80", " 80" and "1_0".
    if not (1 <= len(text) <= 5 and text.isascii() and text.isdigit()) or int(text) > 65535:
        raise ProxyHeaderError("malformed", "PROXY v1 port is not a number 0-65535")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_FIXED:
        return None
    version_command, family_protocol, payload = struct.unpack_from("!BBH", data, 12)
    length = _V2_FIXED + payload
    if version_command >> 4 != 2:
        raise ProxyHeaderError("unsupported", "PROXY v2 header has an unknown version")
    command = {0x0: "LOCAL", 0x1: "PROXY"}.get(version_command & 0xF)
    if command is None:
        raise ProxyHeaderError("unsupported", "PROXY v2 header has an unknown command")
    family_nibble, protocol = family_protocol >> 4, family_protocol & 0xF
    if family_nibble not in _V2_ADDRESS_LENGTH or protocol > 2:
        raise ProxyHeaderError("unsupported", "PROXY v2 header has an unknown address family")
    if length > MAX_HEADER:
        raise ProxyHeaderError("oversize", f"PROXY v2 header is longer than {MAX_HEADER} bytes")
    if payload < _V2_ADDRESS_LENGTH[family_nibble]:
        raise ProxyHeaderError("malformed", "PROXY v2 address block is too short for its family")
    if len(data) < length:
        return None
    family = _V2_FAMILY[family_nibble]
    # LOCAL: the balancer's own connection (a health check); its block is ignored.
    # UNIX and UNSPEC name no IP address. The TLVs past the addresses carry
    # nothing we use: they are skipped, not parsed.
    if command == "LOCAL" or family_nibble in (0x0, 0x3):
        return ProxyHeader(2, command, family, length=length)
    size = 4 if family_nibble == 0x1 else 16
    kind = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    at = _V2_FIXED
    src, dst = kind(data[at : at + size]), kind(data[at + size : at + 2 * size])
    sport, dport = struct.unpack_from("!HH", data, at + 2 * size)
    return ProxyHeader(
        2, command, family, source=(str(src), sport), destination=(str(dst), dport), length=length
    )


class RefusalLog:
    """Rate-limits the log of refused connections: a flood must not flood the log.

    :meth:`admit` says whether to log a refusal now; at most one per
    ``interval`` seconds, and the one logged says how many were not
    (``suppressed``). Time comes from the caller, so tests need no clock.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next = float("-inf")
        self._suppressed = 0

    def admit(self, now: float) -> int | None:
        """The count suppressed since the last line if one may be logged now, else None."""
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self.interval
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed
