"""The PROXY protocol parser, sans-io: v1, v2 (TCP4/TCP6/UNIX/LOCAL), TLVs, bad input, fuzz."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.proxyproto import (
    MAX_HEADER,
    MAX_V1,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    RefusalLog,
)

REQUEST = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"


def v2(
    command: int = 0x1,
    family: int = 0x1,
    protocol: int = 0x1,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    version: int = 0x2,
) -> bytes:
    """A v2 header as HAProxy builds it (doc/proxy-protocol.txt, section 2.2)."""
    payload = addresses + tlvs
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family << 4 | protocol])
        + struct.pack("!H", len(payload))
        + payload
    )


def tcp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tcp6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def parse(data: bytes) -> tuple[ProxyHeader | None, bytes]:
    parser = ProxyHeaderParser()
    header = parser.feed(data)
    return header, parser.trailing


def error_of(*chunks: bytes) -> ProxyHeaderError:
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError) as info:
        for chunk in chunks:
            assert parser.feed(chunk) is None
    return info.value


# -- v1 ---------------------------------------------------------------------------------


def test_v1_tcp4_names_the_source_and_leaves_the_request() -> None:
    header, trailing = parse(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n" + REQUEST)
    assert header == ProxyHeader(
        1, "PROXY", "TCP4", ("192.0.2.7", 56324), ("198.51.100.1", 443), length=45
    )
    assert trailing == REQUEST


def test_v1_tcp6_normalises_the_address() -> None:
    header, _ = parse(b"PROXY TCP6 2001:DB8:0::1 ::1 65535 0\r\n")
    assert header is not None
    assert header.source == ("2001:db8::1", 65535)
    assert header.destination == ("::1", 0)


def test_v1_unknown_names_no_client_and_ignores_the_rest_of_its_line() -> None:
    header, trailing = parse(b"PROXY UNKNOWN ffff::1 whatever\r\nGET")
    assert header is not None
    assert (header.family, header.source) == ("UNKNOWN", None)
    assert trailing == b"GET"


def test_v1_at_the_longest_length_the_spec_allows() -> None:
    # The spec's worst case: UNKNOWN followed by two full IPv6 addresses and ports.
    line = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(line) == MAX_V1
    header, _ = parse(line)
    assert header is not None
    assert header.length == MAX_V1
    assert error_of(line[:-2] + b"0\r\n").reason == "malformed"  # one byte more


def test_v1_byte_by_byte() -> None:
    data = b"PROXY TCP4 10.1.2.3 10.0.0.1 1000 80\r\nGET"
    parser = ProxyHeaderParser()
    results = [parser.feed(data[i : i + 1]) for i in range(len(data) - 3)]
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] is not None and results[-1].source == ("10.1.2.3", 1000)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 +80 443\r\n",  # int() would take it
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1_0 443\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 80  443\r\n",  # two spaces
        b"PROXY TCP4 ::1 ::1 80 443\r\n",  # IPv6 under TCP4
        b"PROXY TCP6 192.0.2.7 198.51.100.1 80 443\r\n",
        b"PROXY TCP4 192.0.2.07 198.51.100.1 80 443\r\n",  # leading zero
        b"PROXY TCP4 192.0.2.7 198.51.100.1 80\r\n",
        b"PROXY UDP4 192.0.2.7 198.51.100.1 80 443\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 80 443\n",  # LF alone
        b"PROXY TCP4 \xff.0.2.7 198.51.100.1 80 443\r\n",
    ],
)
def test_v1_malformed_lines_are_refused(line: bytes) -> None:
    assert error_of(line).reason == "malformed"


def test_v1_line_without_crlf_in_107_bytes_is_refused() -> None:
    assert error_of(b"PROXY TCP4 " + b"1" * 200).reason == "malformed"


# -- v2 ---------------------------------------------------------------------------------


def test_v2_tcp4() -> None:
    data = v2(addresses=tcp4("203.0.113.9", "10.0.0.2", 40000, 8080))
    header, trailing = parse(data + REQUEST)
    assert header == ProxyHeader(
        2, "PROXY", "TCP4", ("203.0.113.9", 40000), ("10.0.0.2", 8080), length=28
    )
    assert trailing == REQUEST


def test_v2_tcp6() -> None:
    header, _ = parse(v2(family=0x2, addresses=tcp6("2001:db8::5", "::1", 1, 2)))
    assert header is not None
    assert (header.family, header.source, header.destination) == (
        "TCP6",
        ("2001:db8::5", 1),
        ("::1", 2),
    )


def test_v2_tlvs_are_skipped() -> None:
    # PP2_TYPE_ALPN "http/1.1", PP2_TYPE_UNIQUE_ID, and a CRC32C we do not check.
    tlvs = b"\x01\x00\x08http/1.1" + b"\x05\x00\x04abcd" + b"\x03\x00\x04\x00\x00\x00\x00"
    data = v2(addresses=tcp4("192.0.2.1", "192.0.2.2", 5, 6), tlvs=tlvs)
    header, trailing = parse(data + b"\x16\x03\x01")  # a TLS ClientHello follows
    assert header is not None
    assert header.source == ("192.0.2.1", 5)
    assert header.length == len(data)
    assert trailing == b"\x16\x03\x01"


def test_v2_local_is_the_balancer_itself() -> None:
    header, _ = parse(v2(command=0x0, family=0x0, protocol=0x0))
    assert header is not None
    assert (header.command, header.source) == ("LOCAL", None)
    # LOCAL ignores whatever address block it carries.
    header, _ = parse(v2(command=0x0, addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2)))
    assert header is not None and header.source is None


def test_v2_unix_and_unspec_name_no_address() -> None:
    unix = b"/run/haproxy.sock".ljust(108, b"\0") + b"/run/wsgate.sock".ljust(108, b"\0")
    header, _ = parse(v2(family=0x3, addresses=unix))
    assert header is not None and (header.family, header.source) == ("UNIX", None)
    header, _ = parse(v2(family=0x0, protocol=0x0))
    assert header is not None and (header.family, header.source) == ("UNSPEC", None)


def test_v2_in_pieces() -> None:
    data = v2(family=0x2, addresses=tcp6("2001:db8::5", "::1", 1, 2)) + b"rest"
    for cut in range(1, len(data) - 4):
        parser = ProxyHeaderParser()
        assert parser.feed(data[:cut]) is None
        header = parser.feed(data[cut:])
        assert header is not None and header.source == ("2001:db8::5", 1)
        assert parser.trailing == b"rest"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (v2(version=0x1, addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2)), "unsupported"),
        (v2(command=0x2, addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2)), "unsupported"),
        (v2(family=0x4), "unsupported"),
        (v2(protocol=0x3, addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2)), "unsupported"),
        # The address block is shorter than its family's (where struct.error lurks).
        (v2(addresses=b"\x01\x02\x03\x04"), "malformed"),
        (v2(family=0x2, addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2)), "malformed"),
        (v2(family=0x3, addresses=b"/x"), "malformed"),
        (v2(addresses=tcp4("1.2.3.4", "5.6.7.8", 1, 2), tlvs=b"\0" * MAX_HEADER), "oversize"),
    ],
)
def test_v2_bad_headers_are_refused(data: bytes, reason: str) -> None:
    assert error_of(data).reason == reason


def test_v2_oversize_is_refused_from_its_length_field_alone() -> None:
    # Nothing past the fixed 16 bytes is needed, nor buffered, to refuse it.
    fixed = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 65535)
    assert error_of(fixed).reason == "oversize"


# -- not a PROXY header at all ----------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [REQUEST, b"\x16\x03\x01\x02\x00", b"PROXY\r\n", b"\r\n\r\nGET", b"proxy TCP4 "],
)
def test_anything_else_is_refused_at_its_first_wrong_byte(data: bytes) -> None:
    assert error_of(data).reason == "not_proxy"


def test_a_direct_http_client_is_refused_at_its_first_byte() -> None:
    assert error_of(b"G").reason == "not_proxy"


@pytest.mark.parametrize(
    "chunks",
    [(b"",), (b"PROXY TCP4 1.2.3.4", b""), (V2_SIGNATURE[:5], b""), (v2()[:15], b"")],
)
def test_end_of_stream_before_the_header_is_complete(chunks: tuple[bytes, ...]) -> None:
    assert error_of(*chunks).reason == "truncated"


def test_feeding_past_a_complete_header_is_a_bug() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\n") is not None
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


# -- fuzz -------------------------------------------------------------------------------


def _feed_all(chunks: list[bytes]) -> tuple[ProxyHeader | None, ProxyHeaderParser]:
    parser = ProxyHeaderParser()
    for chunk in chunks:
        header = parser.feed(chunk)
        if header is not None:
            return header, parser
    return None, parser


@given(st.lists(st.binary(min_size=1, max_size=64), max_size=8))
def test_fuzz_arbitrary_bytes_only_ever_parse_or_raise_our_error(chunks: list[bytes]) -> None:
    try:
        header, parser = _feed_all(chunks)
    except ProxyHeaderError as exc:
        assert exc.reason in {"not_proxy", "malformed", "unsupported", "oversize"}
        return
    if header is not None:
        data = b"".join(chunks)
        assert header.length <= min(len(data), MAX_HEADER)
        assert data[: header.length] + parser.trailing == data


_prefixes = st.sampled_from([V2_SIGNATURE, b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 "])


@given(_prefixes, st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_fuzz_after_a_valid_signature(prefix: bytes, rest: bytes, step: int) -> None:
    data = prefix + rest
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    try:
        header, parser = _feed_all(chunks)
    except ProxyHeaderError as exc:
        assert exc.reason in {"malformed", "unsupported", "oversize"}
        return
    if header is not None:
        assert data[: header.length] + parser.trailing == data
        if header.source is not None:
            ipaddress.ip_address(header.source[0])
            assert 0 <= header.source[1] <= 65535


@given(
    st.sampled_from(["TCP4", "TCP6"]),
    st.integers(0, 2**128 - 1),
    st.integers(0, 65535),
    st.integers(1, 30),
)
def test_fuzz_roundtrip_of_valid_headers(family: str, seed: int, port: int, step: int) -> None:
    """Any header a balancer can send parses to what it said, however it is split."""
    if family == "TCP4":
        src = str(ipaddress.IPv4Address(seed % 2**32))
        variants = [
            f"PROXY TCP4 {src} 10.0.0.1 {port} 443\r\n".encode(),
            v2(addresses=tcp4(src, "10.0.0.1", port, 443)),
        ]
    else:
        src = str(ipaddress.IPv6Address(seed))
        variants = [
            f"PROXY TCP6 {src} ::1 {port} 443\r\n".encode(),
            v2(family=0x2, addresses=tcp6(src, "::1", port, 443)),
        ]
    for data in variants:
        data += REQUEST
        chunks = [data[i : i + step] for i in range(0, len(data), step)]
        header, parser = _feed_all(chunks)
        assert header is not None
        assert header.source == (src, port)
        assert header.length == len(data) - len(REQUEST)
        # The bytes fed past the header are the request's first ones.
        assert REQUEST.startswith(parser.trailing)


# -- the refusal log's rate limit -------------------------------------------------------


def test_refusal_log_admits_one_line_per_interval_and_counts_the_rest() -> None:
    log = RefusalLog(interval=10.0)
    assert log.admit(100.0) == 0
    assert [log.admit(t) for t in (100.5, 101.0, 109.9)] == [None, None, None]
    assert log.admit(110.0) == 3
    assert log.admit(110.1) is None
    assert log.admit(500.0) == 1
