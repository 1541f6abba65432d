"""The client-address rule, sans-io: rightmost untrusted, spoofing, IPv6, ports, Forwarded."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.clientaddr import (
    ClientAddress,
    TrustedProxies,
    client_address,
    parse_address,
)

TRUSTED = TrustedProxies.parse(["10.0.0.0/8", "2001:db8:ffff::/48", "127.0.0.1"])


def xff(*values: str) -> list[tuple[str, str]]:
    return [("x-forwarded-for", value) for value in values]


def test_an_untrusted_peer_is_the_client_whatever_its_headers_say() -> None:
    headers = [*xff("198.51.100.7"), ("x-forwarded-proto", "https")]
    assert client_address("203.0.113.5", headers, TRUSTED) == ClientAddress("203.0.113.5")


def test_nobody_is_trusted_by_default() -> None:
    assert client_address("10.0.0.1", xff("198.51.100.7"), TrustedProxies()).ip == "10.0.0.1"


def test_a_trusted_balancer_names_the_client() -> None:
    assert client_address("10.0.0.1", xff("198.51.100.7"), TRUSTED).ip == "198.51.100.7"


def test_spoofed_leftmost_entries_are_ignored() -> None:
    # The client sent "X-Forwarded-For: 1.1.1.1, 10.9.9.9"; the balancer appended
    # the address it saw. Only that last one is the balancer's word.
    headers = xff("1.1.1.1, 10.9.9.9, 198.51.100.7")
    assert client_address("10.0.0.1", headers, TRUSTED).ip == "198.51.100.7"


def test_a_chain_of_trusted_proxies_is_walked_from_the_right() -> None:
    headers = xff("192.0.2.1, 198.51.100.7", "10.1.1.1, 10.2.2.2")  # two headers, in order
    assert client_address("10.0.0.1", headers, TRUSTED).ip == "198.51.100.7"


def test_an_all_trusted_chain_gives_its_leftmost_entry() -> None:
    assert client_address("10.0.0.1", xff("10.3.3.3, 10.2.2.2"), TRUSTED).ip == "10.3.3.3"


def test_a_trusted_peer_without_the_header_is_the_client() -> None:
    assert client_address("10.0.0.1", [], TRUSTED).ip == "10.0.0.1"


@pytest.mark.parametrize("garbage", ["unknown", "not an ip", "", "1.2.3.4:http", "[::1"])
def test_an_entry_that_is_no_address_stops_the_walk_at_the_hop_that_wrote_it(
    garbage: str,
) -> None:
    assert client_address("10.0.0.1", xff(f"192.0.2.1, {garbage}"), TRUSTED).ip == "10.0.0.1"
    headers = xff(f"192.0.2.1, {garbage}, 10.5.5.5")
    assert client_address("10.0.0.1", headers, TRUSTED).ip == "10.5.5.5"


@pytest.mark.parametrize(
    ("entry", "ip"),
    [
        ("198.51.100.7:54321", "198.51.100.7"),
        ("2001:DB8::7", "2001:db8::7"),
        ("[2001:db8::7]", "2001:db8::7"),
        ("[2001:db8::7]:443", "2001:db8::7"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("fe80::1%eth0", "fe80::1"),
        (" 198.51.100.7 ", "198.51.100.7"),
    ],
)
def test_ports_brackets_and_ipv6_forms(entry: str, ip: str) -> None:
    assert client_address("10.0.0.1", xff(entry), TRUSTED).ip == ip


def test_ipv6_peers_and_ranges() -> None:
    headers = xff("2001:db8:1::9, 2001:db8:ffff::3")
    assert client_address("2001:db8:ffff::1", headers, TRUSTED).ip == "2001:db8:1::9"
    # A dual-stack listener names an IPv4 peer ::ffff:a.b.c.d: still trusted.
    assert client_address("::ffff:10.0.0.1", xff("192.0.2.9"), TRUSTED).ip == "192.0.2.9"


def test_x_forwarded_proto_follows_the_same_trust() -> None:
    headers = [*xff("198.51.100.7"), ("x-forwarded-proto", "https")]
    assert client_address("10.0.0.1", headers, TRUSTED) == ClientAddress("198.51.100.7", True)
    assert client_address("203.0.113.5", headers, TRUSTED).secure is None
    headers = [*xff("198.51.100.7"), ("x-forwarded-proto", "ws")]
    assert client_address("10.0.0.1", headers, TRUSTED).secure is False
    headers = [*xff("198.51.100.7"), ("x-forwarded-proto", "gopher")]
    assert client_address("10.0.0.1", headers, TRUSTED).secure is None


def test_x_forwarded_proto_lists_aligned_with_the_chain() -> None:
    headers = [
        *xff("198.51.100.7, 10.2.2.2"),
        ("x-forwarded-proto", "https, http"),
    ]
    assert client_address("10.0.0.1", headers, TRUSTED).secure is True
    # Not aligned: the nearest hop's (last) value speaks.
    headers = [*xff("1.1.1.1, 198.51.100.7, 10.2.2.2"), ("x-forwarded-proto", "http, https")]
    assert client_address("10.0.0.1", headers, TRUSTED).secure is True


# -- RFC 7239 Forwarded -------------------------------------------------------------------


def fwd(*values: str) -> list[tuple[str, str]]:
    return [("forwarded", value) for value in values]


def test_forwarded_elements_are_walked_like_x_forwarded_for() -> None:
    headers = fwd(
        'for=1.1.1.1, for="[2001:db8:cafe::17]:4711";proto=https', "for=10.2.2.2;proto=http"
    )
    found = client_address("10.0.0.1", headers, TRUSTED, header="forwarded")
    assert found == ClientAddress("2001:db8:cafe::17", True)


def test_only_the_configured_header_is_read() -> None:
    # The balancer appends X-Forwarded-For; a client-supplied Forwarded proves nothing.
    headers = [*xff("198.51.100.7"), *fwd("for=1.1.1.1")]
    assert client_address("10.0.0.1", headers, TRUSTED).ip == "198.51.100.7"
    assert client_address("10.0.0.1", headers, TRUSTED, header="forwarded").ip == "1.1.1.1"
    # ... and the other way round.
    headers = [*xff("1.1.1.1"), *fwd("for=198.51.100.7")]
    assert client_address("10.0.0.1", headers, TRUSTED, header="forwarded").ip == "198.51.100.7"


@pytest.mark.parametrize(
    "element",
    [
        "for=unknown",
        "for=_hidden",
        "by=10.0.0.1",  # no for=
        "for",
        "for=198.51.100.7;proto",
    ],
)
def test_forwarded_elements_without_an_address_stop_the_walk(element: str) -> None:
    headers = fwd(f"for=192.0.2.1, {element}, for=10.5.5.5")
    assert client_address("10.0.0.1", headers, TRUSTED, header="forwarded").ip == "10.5.5.5"


@pytest.mark.parametrize("element", ['for="198.51.100.7', 'for=198.51.100.7"'])
def test_a_stray_quote_breaks_the_header_from_there_on(element: str) -> None:
    # The quote runs to the end of the header, swallowing the trusted hop's own
    # element: nothing right of it can be read, so the peer is the client.
    headers = fwd(f"for=192.0.2.1, {element}, for=10.5.5.5")
    assert client_address("10.0.0.1", headers, TRUSTED, header="forwarded").ip == "10.0.0.1"


def test_forwarded_quoted_strings_may_hold_separators() -> None:
    headers = fwd('for="198.51.100.7";ext="a,b;c\\"d", for=10.2.2.2')
    found = client_address("10.0.0.1", headers, TRUSTED, header="forwarded")
    assert found.ip == "198.51.100.7"


def test_forwarded_keys_are_case_insensitive() -> None:
    headers = fwd("For=198.51.100.7;Proto=https")
    found = client_address("10.0.0.1", headers, TRUSTED, header="forwarded")
    assert found == ClientAddress("198.51.100.7", True)


# -- config-side parsing --------------------------------------------------------------------


def test_trusted_proxies_reject_bad_ranges_with_a_hint() -> None:
    with pytest.raises(ValueError, match=r"did you mean '10\.0\.0\.0/8'"):
        TrustedProxies.parse(["10.0.0.1/8"])
    with pytest.raises(ValueError, match=r"invalid IP address or CIDR range 'example\.com'"):
        TrustedProxies.parse(["example.com"])


def test_parse_address_takes_no_host_names() -> None:
    assert parse_address("localhost") is None
    assert parse_address("localhost:80") is None
    assert parse_address("[198.51.100.7]") == ipaddress.ip_address("198.51.100.7")


# -- properties -----------------------------------------------------------------------------

_ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
_trusted_ip = st.integers(0, 2**24 - 1).map(lambda n: str(ipaddress.IPv4Address(10 << 24 | n)))
_entry = st.one_of(_ipv4, _trusted_ip, st.text(max_size=12).filter(lambda t: "," not in t))


@given(st.lists(_entry, max_size=6), _ipv4, st.lists(_trusted_ip, max_size=4))
def test_property_the_client_cannot_be_chosen_by_what_it_sends(
    spoofed: list[str], real: str, hops: list[str]
) -> None:
    """Whatever the client puts in front, the trusted hops' entries decide."""
    if TRUSTED.trusts(real):
        return
    chain = ", ".join([*spoofed, real, *hops])
    assert client_address("10.0.0.1", xff(chain), TRUSTED).ip == real


@given(st.lists(_entry, max_size=6), _ipv4)
def test_property_an_untrusted_peer_is_always_the_client(entries: list[str], peer: str) -> None:
    if TRUSTED.trusts(peer):
        return
    headers = [*xff(", ".join(entries)), *fwd(", ".join(f"for={e}" for e in entries))]
    for header in ("x-forwarded-for", "forwarded"):
        assert client_address(peer, headers, TRUSTED, header=header).ip == peer


@given(st.text(max_size=200), st.sampled_from(["x-forwarded-for", "forwarded"]))
def test_property_any_header_value_gives_an_address(value: str, header: str) -> None:
    found = client_address("10.0.0.1", [(header, value)], TRUSTED, header=header)
    ipaddress.ip_address(found.ip)
