"""Client keys of IPv6 clients (`client_ipv6_prefix`) and the client-address edge cases.

An IPv6 client is given a whole /64 (or more) and picks addresses inside it at will:
keyed by its /128 address, a per-client limit was no limit for it. A `client_ip` key now
counts an IPv6 client by its /`client_ipv6_prefix` network (64 by default), an
IPv4-mapped address (`::ffff:1.2.3.4`, what a dual-stack socket reports) by its IPv4
address; `trusted_proxies` / `trusted_peers` written in IPv4-mapped form match; the
FastAPI forms key as the middleware does and say once when a request has no address.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from hypothesis import given, settings
from hypothesis import strategies as st

from _asgi import http_scope
from fidelity_mw import DecisionContext, FidelityMiddleware, Policy, RateLimit
from fidelity_mw.context import context_from_scope
from fidelity_mw.errors import PolicyError
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.headers import ClientKeys, client_key, in_networks, networks
from fidelity_mw.testing import FakeClock

Message = dict[str, Any]


def _scope(
    client: tuple[str, int] | None, headers: Sequence[tuple[bytes, bytes]] = ()
) -> dict[str, Any]:
    return http_scope("/api/x", headers=list(headers), client=client, server=("127.0.0.1", 8000))


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class Harness:
    def __init__(self, **policy: Any) -> None:
        limits = policy.pop("limits", None) or [RateLimit(name="per-client", rate="1/h", burst=1)]
        self.mw = FidelityMiddleware(
            _ok, policy=Policy(rate_limits=limits, **policy), clock=FakeClock(), telemetry=False
        )
        self.contexts: list[DecisionContext] = []

    def status(self, peer: str | None, headers: Sequence[tuple[bytes, bytes]] = ()) -> int:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        client = (peer, 4711) if peer is not None else None
        scope = _scope(client, headers)
        asyncio.run(self.mw(scope, receive, send))
        ctx = context_from_scope(scope)
        assert ctx is not None
        self.contexts.append(ctx)
        return int(next(m for m in sent if m["type"] == "http.response.start")["status"])

    @property
    def key(self) -> str | None:
        return self.contexts[-1].client_key


# ---------------------------------------------------------------- the key itself


def test_client_key_of_each_kind_of_address() -> None:
    assert client_key("198.51.100.7") == "198.51.100.7"
    assert client_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 48) == "2001:db8:1::/48"
    assert client_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 128) == (
        "2001:db8:1:2:aaaa:bbbb:cccc:dddd"
    )
    assert client_key("::ffff:198.51.100.7") == "198.51.100.7"
    assert client_key("::ffff:198.51.100.7", 128) == "198.51.100.7"
    assert client_key("fe80::1%eth0") == "fe80::/64"  # a zone is no part of the key
    for junk in ("unknown", "", "not:an:address", "1:2:3:4:5:6:7:8:9"):
        assert client_key(junk) == junk


def test_client_keys_are_kept_per_address_and_bounded() -> None:
    keys = ClientKeys(64)
    assert keys.key("2001:db8::1") == "2001:db8::/64"
    assert keys._keys == {"2001:db8::1": "2001:db8::/64"}
    assert keys.key("203.0.113.1") == "203.0.113.1"
    assert "203.0.113.1" not in keys._keys  # IPv4 is never looked up
    for i in range(10_000):
        keys.key(f"2001:db8::{i:x}")
    assert len(keys._keys) <= 8192


@pytest.mark.parametrize("prefix", [31, 129, "64", True])
def test_client_ipv6_prefix_is_held_to_32_to_128(prefix: Any) -> None:
    with pytest.raises(PolicyError, match="client_ipv6_prefix"):
        Policy(client_ipv6_prefix=prefix)


def test_client_ipv6_prefix_loads_from_toml(tmp_path: Any) -> None:
    assert Policy().client_ipv6_prefix == 64
    path = tmp_path / "fidelity.toml"
    path.write_text("version = 1\nclient_ipv6_prefix = 56\n")
    assert Policy.from_toml(path).client_ipv6_prefix == 56


# ---------------------------------------------------------------- the middleware


def test_two_addresses_in_one_64_share_a_bucket_and_two_64s_do_not() -> None:
    h = Harness()
    assert h.status("2001:db8:1:2::1") == 200
    assert h.key == "2001:db8:1:2::/64"
    assert h.status("2001:db8:1:2:ffff:ffff:ffff:fffe") == 429  # the same /64
    assert h.status("2001:db8:1:3::1") == 200  # the next /64
    assert h.key == "2001:db8:1:3::/64"


def test_a_prefix_of_128_keys_every_address_apart_as_before() -> None:
    h = Harness(client_ipv6_prefix=128)
    assert h.status("2001:db8:1:2::1") == 200
    assert h.key == "2001:db8:1:2::1"
    assert h.status("2001:db8:1:2::2") == 200
    assert h.status("2001:db8:1:2::1") == 429


def test_a_prefix_of_48_keys_the_48() -> None:
    h = Harness(client_ipv6_prefix=48)
    assert h.status("2001:db8:1:2::1") == 200
    assert h.status("2001:db8:1:ffff::1") == 429
    assert h.key == "2001:db8:1::/48"


def test_an_ipv4_mapped_peer_counts_as_its_ipv4_address() -> None:
    h = Harness()
    assert h.status("198.51.100.7") == 200
    assert h.status("::ffff:198.51.100.7") == 429
    assert h.key == "198.51.100.7"
    assert h.status("::ffff:198.51.100.8") == 200


def test_ipv4_keys_are_unchanged() -> None:
    h = Harness()
    assert h.status("198.51.100.7") == 200
    assert h.key == "198.51.100.7"
    assert h.status("198.51.100.8") == 200


def test_the_prefix_applies_with_several_limits_too() -> None:
    limits = [
        RateLimit(name="per-client", rate="1/h", burst=1),
        RateLimit(name="api", rate="100/h", key="header:x-api-key"),
    ]
    h = Harness(limits=limits)
    assert h.status("2001:db8::1") == 200
    assert h.status("2001:db8::2") == 429
    assert h.key == "2001:db8::/64"


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (b"x-forwarded-for", b"2001:db8:5:6::1, 10.0.0.3"),
        (b"forwarded", b'for="[2001:db8:5:6::1]:4711", for=10.0.0.3'),
    ],
)
def test_a_forwarded_ipv6_client_is_keyed_by_its_prefix(header: bytes, value: bytes) -> None:
    h = Harness(trusted_proxies=["10.0.0.0/8"], forwarded_header=header.decode())
    assert h.status("10.0.0.2", [(header, value)]) == 200
    assert h.key == "2001:db8:5:6::/64"
    other = value.replace(b"::1", b":abcd::9")
    assert h.status("10.0.0.2", [(header, other)]) == 429


def test_ipv6_proxies_and_a_mapped_forwarded_client() -> None:
    h = Harness(trusted_proxies=["2001:db8:ffff::/48"])
    xff = b"x-forwarded-for"
    assert h.status("2001:db8:ffff::2", [(xff, b"::ffff:203.0.113.9")]) == 200
    assert h.key == "203.0.113.9"
    assert h.status("2001:db8:ffff::2", [(xff, b"203.0.113.9")]) == 429
    # an untrusted IPv6 peer is the client, by its prefix
    assert h.status("2001:db8:7::1", [(xff, b"203.0.113.50")]) == 200
    assert h.key == "2001:db8:7::/64"


@settings(max_examples=60, deadline=None)
@given(
    peer=st.one_of(st.ip_addresses().map(str), st.text(max_size=40)),
    forwarded=st.binary(max_size=80),
)
def test_any_address_and_forwarded_header_never_crash(peer: str, forwarded: bytes) -> None:
    h = Harness(trusted_proxies=["::/0", "0.0.0.0/0"])
    status = h.status(peer, [(b"x-forwarded-for", forwarded)])
    assert status == 200
    assert h.key is not None  # (a peer of "" keys as "", as before)


# ---------------------------------------------------------------- trusted networks


def test_networks_written_ipv4_mapped_match_ipv4_and_mapped_peers() -> None:
    mapped = networks(["::ffff:10.0.0.0/104"])
    assert in_networks("10.1.2.3", mapped)
    assert in_networks("::ffff:10.1.2.3", mapped)
    assert not in_networks("11.1.2.3", mapped)
    assert not in_networks("::ffff:11.1.2.3", mapped)
    plain = networks(["10.0.0.0/8"])
    assert in_networks("::ffff:10.1.2.3", plain)
    assert in_networks("::1", networks(["::1/128"]))


def test_a_mapped_trusted_proxy_network_is_believed() -> None:
    h = Harness(trusted_proxies=["::ffff:10.0.0.0/104"])
    xff = b"x-forwarded-for"
    assert h.status("10.0.0.2", [(xff, b"203.0.113.1")]) == 200
    assert h.key == "203.0.113.1"
    assert h.status("::ffff:10.0.0.2", [(xff, b"203.0.113.1")]) == 429


# ---------------------------------------------------------------- the FastAPI forms


def _forms_app(fidelity: Fidelity) -> FastAPI:
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(fidelity.limit("1/h"))])
    async def x(request: Request) -> dict[str, str | None]:
        ctx = fidelity.context(request)
        return {"key": ctx.client_key}

    return app


async def _get(app: FastAPI, peer: str | None, headers: dict[str, str] | None = None) -> Any:
    transport = httpx.ASGITransport(app=app, client=(peer, 1) if peer else ("", 0))
    if peer is None:

        async def no_client(scope: Any, receive: Any, send: Any) -> None:
            scope["client"] = None
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=no_client)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get("/x", headers=headers)


@pytest.mark.anyio
async def test_forms_key_an_ipv6_client_by_its_prefix() -> None:
    app = _forms_app(Fidelity(policy=Policy(), clock=FakeClock()))
    first = await _get(app, "2001:db8:1:2::1")
    assert first.status_code == 200
    assert first.json() == {"key": "2001:db8:1:2::/64"}
    assert (await _get(app, "2001:db8:1:2::2")).status_code == 429
    assert (await _get(app, "2001:db8:1:3::1")).status_code == 200
    assert (await _get(app, "198.51.100.1")).json() == {"key": "198.51.100.1"}
    assert (await _get(app, "::ffff:198.51.100.1")).status_code == 429


@pytest.mark.anyio
async def test_forms_with_128_and_behind_proxies() -> None:
    policy = Policy(client_ipv6_prefix=128, trusted_proxies=["::ffff:10.0.0.0/104"])
    app = _forms_app(Fidelity(policy=policy, clock=FakeClock()))
    xff = {"x-forwarded-for": "2001:db8::1"}
    assert (await _get(app, "10.0.0.2", xff)).json() == {"key": "2001:db8::1"}
    assert (await _get(app, "10.0.0.2", {"x-forwarded-for": "2001:db8::2"})).status_code == 200
    assert (await _get(app, "10.0.0.2", xff)).status_code == 429


@pytest.mark.anyio
async def test_forms_say_once_that_a_request_had_no_client_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fidelity_mw")
    app = _forms_app(Fidelity(policy=Policy(), clock=FakeClock()))
    assert (await _get(app, "198.51.100.1")).status_code == 200
    assert not [r for r in caplog.records if "client address" in r.getMessage()]
    assert (await _get(app, None)).json() == {"key": "unknown"}
    assert (await _get(app, None)).status_code == 429  # one bucket for all of them
    said = [r for r in caplog.records if "client address" in r.getMessage()]
    assert len(said) == 1
    assert "unix socket" in said[0].getMessage()
    assert "header:" in said[0].getMessage()


# ---------------------------------------------------------------- a Redis store


@pytest.mark.redis
def test_a_redis_store_counts_a_64_in_one_key(redis_url: str) -> None:
    import redis

    from fidelity_mw import StateConfig
    from redis_server import QUIET

    state = StateConfig(url=redis_url, timeout_ms=1000, connect_timeout_ms=1000, **QUIET)
    policy = Policy(state=state, rate_limits=[RateLimit(name="per-client", rate="1/h", burst=1)])
    mw = FidelityMiddleware(_ok, policy=policy, telemetry=False)
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()

    async def run() -> list[int]:
        statuses = []
        try:
            for peer in ("2001:db8:9:9::1", "2001:db8:9:9::2", "2001:db8:9:a::1"):
                sent: list[Message] = []

                async def receive() -> Message:
                    return {"type": "http.request", "body": b"", "more_body": False}

                async def send(message: Message, sent: list[Message] = sent) -> None:
                    sent.append(message)

                await mw(_scope((peer, 4711)), receive, send)
                statuses.append(sent[0]["status"])
        finally:
            await mw.engine.aclose()
        return statuses

    assert asyncio.run(run()) == [200, 429, 200]
    with redis.Redis.from_url(redis_url) as client:
        limit_keys = [k for k in client.scan_iter() if k.startswith(b"{fmw}:rl:")]
    assert len(limit_keys) == 2  # one per /64


# ---------------------------------------------------------------- a websocket handshake


def test_websocket_handshakes_from_one_64_share_a_bucket() -> None:
    import warnings

    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    with warnings.catch_warnings():  # Starlette 1.x asks for httpx2; httpx works
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient, WebSocketDenialResponse

    async def accept(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", accept)])
    limit = RateLimit(name="sockets", rate="1/h", burst=1, match="/ws")
    app.add_middleware(
        FidelityMiddleware, policy=Policy(rate_limits=[limit]), clock=FakeClock(), telemetry=False
    )

    def opens(peer: str) -> bool:
        client = TestClient(app, client=(peer, 4711))
        try:
            with client.websocket_connect("/ws"):
                return True
        except WebSocketDenialResponse:
            return False

    assert opens("2001:db8:4:4::1")
    assert not opens("2001:db8:4:4::99")  # the same /64
    assert opens("2001:db8:4:5::1")
