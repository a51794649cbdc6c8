"""Review 29 of the IPv6 client keys (`client_ipv6_prefix`): each defect found, and the
points checked and kept, as tests."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request

from fidelity_mw import Policy, RateLimit
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.headers import ClientKeys, client_key
from fidelity_mw.testing import FakeClock
from test_client_ipv6 import Harness, _get

# ---------------------------------------------------------------- NAT64 / SIIT


def test_the_nat64_well_known_prefix_counts_as_its_embedded_ipv4_address() -> None:
    # 64:ff9b::/96 (RFC 6052) holds an IPv4 host in its last 32 bits: behind a stateless
    # NAT46 (SIIT) every IPv4 client of the internet arrived in one /64, one bucket
    assert client_key("64:ff9b::198.51.100.7") == "198.51.100.7"
    assert client_key("64:ff9b::c633:6408", 128) == "198.51.100.8"
    assert client_key("64:ff9b:1::198.51.100.7") == "64:ff9b:1::/64"  # (RFC 8215: local)
    h = Harness()
    assert h.status("64:ff9b::198.51.100.7") == 200
    assert h.key == "198.51.100.7"
    assert h.status("64:ff9b::198.51.100.8") == 200  # another IPv4 client, its own bucket
    assert h.status("198.51.100.7") == 429  # the same client, however it came


# ---------------------------------------------------------------- one text per address


def test_a_prefix_of_128_keys_an_address_written_two_ways_once() -> None:
    # uppercase hex, leading zeros, a zone: the same address, one key (the forwarded
    # addresses were normalised, the peer's were not: two buckets for one client)
    assert client_key("2001:DB8:0:0::0001", 128) == "2001:db8::1"
    assert client_key("fe80::1%eth0", 128) == "fe80::1"
    h = Harness(client_ipv6_prefix=128)
    assert h.status("2001:DB8::1") == 200
    assert h.key == "2001:db8::1"
    assert h.status("2001:db8:0::0001") == 429


# ---------------------------------------------------------------- the cache


def test_junk_is_not_kept_in_the_client_key_cache() -> None:
    keys = ClientKeys(64)
    for i in range(100):
        junk = f"not:an:address:{i}" + "x" * 1000
        assert keys.key(junk) == junk
    assert keys._keys == {}
    assert keys.key("2001:db8::1") == "2001:db8::/64"
    assert keys._keys == {"2001:db8::1": "2001:db8::/64"}


def test_a_long_zone_is_keyed_but_not_kept() -> None:
    # `fe80::1%<8000 chars>` is a valid address: a header key holding such values kept
    # 8192 of them (tens of MB); the key itself holds no zone
    keys = ClientKeys(64)
    for i in range(100):
        assert keys.key(f"fe80::{i:x}%" + "z" * 8000) == "fe80::/64"
    assert keys._keys == {}
    assert ClientKeys(128).key("fe80::1%" + "z" * 8000) == "fe80::1"


# ---------------------------------------------------------------- header:x-real-ip


def test_a_header_key_holding_an_ipv6_address_counts_its_prefix() -> None:
    # operations.md's key for a proxy on a unix socket: `header:x-real-ip`; keyed by the
    # full address, an IPv6 client rotating inside its /64 was never limited
    limits = [RateLimit(name="per-client", rate="1/h", burst=1, key="header:x-real-ip")]
    h = Harness(limits=limits)
    real = b"x-real-ip"
    assert h.status(None, [(real, b"2001:db8:1:2::1")]) == 200
    assert h.key == "h:2001:db8:1:2::/64"
    assert h.status(None, [(real, b"2001:db8:1:2::2")]) == 429
    assert h.status(None, [(real, b"::ffff:198.51.100.7")]) == 200
    assert h.key == "h:198.51.100.7"
    assert h.status(None, [(real, b"198.51.100.7")]) == 429
    assert h.status(None, [(real, b"tenant:a")]) == 200  # other values as they are
    assert h.key == "h:tenant:a"
    assert h.status(None, [(real, b"tenant:b")]) == 200


@pytest.mark.anyio
async def test_forms_header_key_holding_an_ipv6_address_counts_its_prefix() -> None:
    fidelity = Fidelity(policy=Policy(), clock=FakeClock())
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(fidelity.limit("1/h", key="header:x-real-ip"))])
    async def x(request: Request) -> dict[str, Any]:
        return {"key": fidelity.context(request).client_key}

    first = await _get(app, None, {"x-real-ip": "2001:db8:1:2::1"})
    assert first.json() == {"key": "h:2001:db8:1:2::/64"}
    assert (await _get(app, None, {"x-real-ip": "2001:db8:1:2::2"})).status_code == 429
    assert (await _get(app, None, {"x-real-ip": "tenant:a"})).json() == {"key": "h:tenant:a"}


# ---------------------------------------------------------------- kept: proxies by full address


def test_a_trusted_proxy_in_the_clients_64_is_checked_by_its_full_address() -> None:
    h = Harness(trusted_proxies=["2001:db8:1:2::10/128"])
    xff = b"x-forwarded-for"
    # the proxy forwards a client of another /64: that client is keyed
    assert h.status("2001:db8:1:2::10", [(xff, b"2001:db8:9:9::1")]) == 200
    assert h.key == "2001:db8:9:9::/64"
    # a neighbour in the proxy's /64 is not the proxy: its header is not believed
    assert h.status("2001:db8:1:2::11", [(xff, b"2001:db8:9:9::2")]) == 200
    assert h.key == "2001:db8:1:2::/64"
    assert h.status("2001:db8:1:2::12", [(xff, b"2001:db8:7:7::1")]) == 429


# ---------------------------------------------------------------- the map says it


def test_the_map_says_a_client_ip_limit_counts_an_ipv6_client_by_its_prefix() -> None:
    from fidelity_mw.tools.statemap import from_policy

    def data(**policy: Any) -> str:
        limits = [RateLimit(name="per-client", rate="1/s")]
        smap = from_policy(Policy(rate_limits=limits, **policy), "p.toml")
        (row,) = [r for r in smap.layers if r.layer == "ratelimit"]
        return row.data

    assert "an IPv6 client by its /64" in data()
    assert "an IPv6 client by its /56" in data(client_ipv6_prefix=56)
    assert "IPv6" not in data(client_ipv6_prefix=128)
