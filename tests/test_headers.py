"""Parsing what callers send: deadlines and forwarding chains. Junk yields None, never raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fidelity_mw.headers import (
    client_address,
    forwarded_chain,
    in_networks,
    networks,
    parse_attempt,
    parse_deadline,
    parse_grpc_timeout,
    parse_timeout_ms,
)

# ---------------------------------------------------------------- deadlines


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1500", 1.5),
        (b"0", 0.0),
        (b"250", 0.25),
        (b"007", 0.007),
        (b"86400000", 86_400.0),
    ],
)
def test_timeout_ms(value: bytes, seconds: float) -> None:
    assert parse_timeout_ms(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"   ",
        b"abc",
        b"-5",
        b"-0.001",
        b"nan",
        b"NaN",
        b"inf",
        b"-inf",
        b"Infinity",
        b"1e400",  # overflows to infinity
        b"0x10",
        b"10ms",
        b"1,000",
        b"\xff\xfe",
        "\uff11\uff10\uff10".encode(),  # full-width digits: not ASCII
        "٣".encode(),
        b"1" * 65,  # absurdly long
        b"\x00",
        # Issue 12 #23: Python number syntax is not the header's grammar
        b"1_000",
        b"1e3",
        b"+5",
        b"\t7",
        b"-0",
        b"-1",
        b" 5",
        b"5 ",
        b"2.5",
        b"0.0",
    ],
)
def test_timeout_ms_junk(value: bytes) -> None:
    assert parse_timeout_ms(value) is None


def test_timeout_ms_huge_but_finite() -> None:
    # The middleware caps it at the route's limit; the parser only refuses nonsense.
    assert parse_timeout_ms(b"99999999999999999999") == pytest.approx(1e17)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"250m", 0.25),
        (b"1500u", 0.0015),
        (b"100n", 1e-7),
        (b"99999999S", 99_999_999.0),  # 8 digits, the gRPC maximum
        (b"0S", 0.0),
    ],
)
def test_grpc_timeout(value: bytes, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"S",
        b"5",
        b"5s",  # units are case-sensitive: s is not a unit
        b"5h",
        b"5 S",
        b"-5S",
        b"+5S",
        b"1.5S",
        b"123456789S",  # 9 digits
        b"5SS",
        b"0x5S",
        "\uff15S".encode(),
        "²S".encode(),
        b"\xc3\xa9S",
        b" 5S",
        b"5S ",
        b"\t5S",
        b"1_0S",
        b"-0S",
    ],
)
def test_grpc_timeout_junk(value: bytes) -> None:
    assert parse_grpc_timeout(value) is None


def test_parse_deadline_dispatches_on_the_header_name() -> None:
    assert parse_deadline("grpc-timeout", b"2S") == 2.0
    assert parse_deadline("x-request-timeout-ms", b"2000") == 2.0
    assert parse_deadline("x-envoy-expected-rq-timeout-ms", b"2000") == 2.0
    assert parse_deadline("x-request-timeout-ms", b"2S") is None
    assert parse_deadline("grpc-timeout", b"2000") is None


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(["grpc-timeout", "x-request-timeout-ms"]), value=st.binary(max_size=80))
def test_deadline_parsers_never_raise(name: str, value: bytes) -> None:
    seconds = parse_deadline(name, value)
    assert seconds is None or (seconds >= 0 and seconds != float("inf"))


@pytest.mark.parametrize(
    ("value", "attempt"),
    [
        (b"1", 1),
        (b"3", 3),
        (b" 2 ", 2),
        (b"999", 999),
        (b"1000", None),
        (b"-1", None),
        (b"x", None),
    ],
)
def test_parse_attempt(value: bytes, attempt: int | None) -> None:
    assert parse_attempt(value) == attempt


# ---------------------------------------------------------------- forwarding

PROXIES = networks(["10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("xff", "forwarded", "chain"),
    [
        (b"203.0.113.7", None, ["203.0.113.7"]),
        (b"203.0.113.7, 10.0.0.2", None, ["203.0.113.7", "10.0.0.2"]),
        (b"203.0.113.7:5000,10.0.0.2", None, ["203.0.113.7", "10.0.0.2"]),
        (b"[2001:db8::1]:443, 2001:db8::2", None, ["2001:db8::1", "2001:db8::2"]),
        (b"unknown, 10.0.0.2", None, ["", "10.0.0.2"]),
        (b"not an ip", None, [""]),
        (None, b"for=192.0.2.60;proto=http;by=203.0.113.43", ["192.0.2.60"]),
        (None, b'for="[2001:db8:cafe::17]:4711"', ["2001:db8:cafe::17"]),
        (None, b"for=192.0.2.43, for=198.51.100.17", ["192.0.2.43", "198.51.100.17"]),
        (None, b'For="_gazonk"', [""]),
        (None, b"for=unknown;by=10.0.0.1, for=10.0.0.9", ["", "10.0.0.9"]),
        (None, b"proto=https", []),
        (b"1.2.3.4" * 1000, None, []),  # oversized: ignored
    ],
)
def test_forwarded_chain(xff: bytes | None, forwarded: bytes | None, chain: list[str]) -> None:
    if forwarded is not None:
        assert forwarded_chain(forwarded, "forwarded") == chain
    else:
        assert forwarded_chain(xff) == chain


def test_only_the_configured_forwarding_header_is_read() -> None:
    """Issue 12 #1: the other header is client-controlled (the proxy does not touch it)."""
    assert forwarded_chain(b"for=192.0.2.1", "x-forwarded-for") == [""]
    assert forwarded_chain(b"198.51.100.1", "forwarded") == []
    assert client_address("10.0.0.2", b"198.51.100.1", PROXIES) == "198.51.100.1"


def test_in_networks() -> None:
    assert in_networks("10.1.2.3", PROXIES)
    assert in_networks("fd00::1", PROXIES)
    assert not in_networks("11.0.0.1", PROXIES)
    assert not in_networks("::ffff:11.0.0.1", PROXIES)
    assert not in_networks("junk", PROXIES)
    assert not in_networks("", PROXIES)


def test_headers_ignored_when_the_peer_is_not_a_trusted_proxy() -> None:
    # A client talking to us directly can put anything in X-Forwarded-For.
    assert client_address("203.0.113.9", b"1.1.1.1", PROXIES) == "203.0.113.9"
    assert client_address("203.0.113.9", b"for=1.1.1.1", PROXIES, "forwarded") == "203.0.113.9"


def test_headers_ignored_without_trusted_proxies() -> None:
    assert client_address("10.0.0.2", b"1.1.1.1", ()) == "10.0.0.2"


def test_no_peer() -> None:
    assert client_address(None, b"1.1.1.1", PROXIES) == "unknown"


def test_no_header_from_a_trusted_proxy() -> None:
    assert client_address("10.0.0.2", None, PROXIES, "forwarded") == "10.0.0.2"


def test_trusted_proxy_forwards_the_client() -> None:
    assert client_address("10.0.0.2", b"203.0.113.7", PROXIES) == "203.0.113.7"
    assert client_address("10.0.0.2", b"for=203.0.113.7", PROXIES, "forwarded") == "203.0.113.7"


def test_right_to_left_walk_stops_at_the_first_untrusted_hop() -> None:
    # The client forged "6.6.6.6" on the left; the proxies appended the rest.
    xff = b"6.6.6.6, 203.0.113.7, 10.0.0.5, 10.0.0.4"
    assert client_address("10.0.0.2", xff, PROXIES) == "203.0.113.7"
    forwarded = b"for=6.6.6.6, for=203.0.113.7, for=10.0.0.5"
    assert client_address("10.0.0.2", forwarded, PROXIES, "forwarded") == "203.0.113.7"


def test_all_hops_trusted_gives_the_leftmost() -> None:
    assert client_address("10.0.0.2", b"10.0.0.9, 10.0.0.5", PROXIES) == "10.0.0.9"


def test_junk_hop_stops_the_walk_at_the_last_trusted_address() -> None:
    # We cannot vouch for anything left of a hop we cannot read.
    assert client_address("10.0.0.2", b"203.0.113.7, junk, 10.0.0.5", PROXIES) == "10.0.0.5"
    assert client_address("10.0.0.2", b"203.0.113.7, junk", PROXIES) == "10.0.0.2"
    assert client_address("10.0.0.2", b"for=unknown", PROXIES, "forwarded") == "10.0.0.2"
    assert client_address("10.0.0.2", b",,,", PROXIES) == "10.0.0.2"


def test_ipv6_chain() -> None:
    xff = b"2001:db8::7, fd00::5"
    assert client_address("fd00::1", xff, PROXIES) == "2001:db8::7"


def test_forged_leftmost_is_never_believed_through_a_single_proxy() -> None:
    assert client_address("10.0.0.2", b"1.1.1.1, 203.0.113.7", PROXIES) == "203.0.113.7"


@settings(max_examples=300, deadline=None)
@given(
    peer=st.one_of(st.none(), st.sampled_from(["10.0.0.2", "203.0.113.9", "fd00::1", "junk"])),
    xff=st.one_of(st.none(), st.binary(max_size=200)),
    forwarded=st.one_of(st.none(), st.binary(max_size=200)),
)
def test_client_address_never_raises(
    peer: str | None, xff: bytes | None, forwarded: bytes | None
) -> None:
    address = client_address(peer, xff, PROXIES)
    assert address == client_address(peer, xff, PROXIES, "x-forwarded-for")
    if peer is not None and in_networks(peer, PROXIES) and address != peer:
        assert address in forwarded_chain(xff)
    address = client_address(peer, forwarded, PROXIES, "forwarded")
    assert isinstance(address, str)
    assert address
    if peer is None:
        assert address == "unknown"
    elif not in_networks(peer, PROXIES):
        assert address == peer
    elif address != peer:
        # Anything taken from the headers is a real IP address in the chain.
        assert address in forwarded_chain(forwarded, "forwarded")


@settings(max_examples=200, deadline=None)
@given(
    hops=st.lists(
        st.sampled_from(["203.0.113.7", "198.51.100.1", "10.0.0.5", "10.9.9.9", "junk", "unknown"]),
        max_size=6,
    )
)
def test_walk_matches_a_simple_model(hops: list[str]) -> None:
    xff = ", ".join(hops).encode()
    expected = "10.0.0.2"
    for hop in reversed(hops):
        if hop in ("junk", "unknown"):
            break
        expected = hop
        if not hop.startswith("10."):
            break
    assert client_address("10.0.0.2", xff if hops else None, PROXIES) == expected
