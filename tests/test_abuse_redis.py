"""Client input cannot steer Redis key names (a real redis-server, started by the suite).

Hostile values go in through every door that reaches a state key: API-key
headers (braces that would move the Cluster hash tag, glob characters,
CR/LF, RESP fragments, other tenants' key names, 1 MB, non-UTF-8 bytes),
forwarded client addresses behind a trusted proxy, paths, a custom key
function, and outbound hosts. Afterwards every key on the server (SCAN) has
the fixed shape ``{prefix}:<kind>:<32 hex>``, no key or hash field contains
any of the hostile text, and there are no more keys than logical subjects.
"""

from __future__ import annotations

import asyncio
import collections
import re
from typing import Any

import httpx
import pytest
import redis

from _asgi import http_scope
from fidelity_mw import (
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RouteConfig,
    StateConfig,
)
from redis_server import QUIET

pytestmark = pytest.mark.redis

KEY_SHAPE = re.compile(rb"^\{fmw\}:[a-z]{2}:[0-9a-f]{32}$")
HOSTILE = [
    b"{fmw}:rl:00000000000000000000000000000000",
    b"}{other-tag}",
    b"*",
    b"?[a-z]*",
    b"key\r\nFLUSHALL\r\n",
    b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$1\r\ny\r\n",
    b"fmw:rl:victim",
    b"\xff\xfe\x00binary",
    b"../../etc/passwd",
    b"A" * (1024 * 1024),
]
MARKERS = [b"FLUSHALL", b"other-tag", b"victim", b"passwd", b"binary", b"AAAAAAAA", b"evil"]


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _scope(path: str, peer: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return http_scope(path, headers=headers, client=(peer, 1234), server=("127.0.0.1", 8000))


def _custom_key(scope: Any) -> str:
    for name, value in scope["headers"]:
        if name == b"x-tenant":
            return "evil:" + value.decode("latin-1")
    return "none"


def _all_keys(client: redis.Redis) -> list[bytes]:
    return sorted(client.scan_iter(match=None, count=1000))


@pytest.mark.parametrize("scheme", ["redis", "tiered+redis"])
def test_hostile_input_never_shapes_a_redis_key(redis_url: str, scheme: str) -> None:
    url = redis_url.replace("redis", scheme, 1)
    policy = Policy(
        state=StateConfig(url=url, timeout_ms=1000, connect_timeout_ms=1000, **QUIET),
        rate_limits=(
            RateLimit(name="ip", rate="1/h", burst=1000),
            RateLimit(name="api", rate="1/h", burst=1000, key="header:X-Api-Key"),
            RateLimit(name="tenant", rate="1/h", burst=1000, key=_custom_key),
            RateLimit(name="route", rate="1/h", burst=1000, key="route"),
        ),
        routes=(RouteConfig(match="/api/*", name="api"),),
        trusted_proxies=("10.0.0.0/8",),
    )
    mw = FidelityMiddleware(_ok, policy=policy, telemetry=False)
    statuses: list[int] = []
    paths = ["/api/x", "/{fmw}:br:zz", "/*", "/\r\nDEL x", "/" + "p" * 5000]

    async def call(scope: dict[str, Any]) -> None:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await mw(scope, receive, send)
        starts = [m for m in sent if m["type"] == "http.response.start"]
        assert len(starts) == 1
        statuses.append(starts[0]["status"])

    async def run() -> None:
        try:
            for i, value in enumerate(HOSTILE):
                for path in paths:
                    headers = [
                        (b"x-api-key", value),
                        (b"x-tenant", value),
                        (b"x-forwarded-for", value + b", 192.0.2.%d" % (i + 1)),
                    ]
                    await call(_scope(path, "10.0.0.1", headers))
            # outbound: hosts are breaker and budget keys
            inner = httpx.MockTransport(lambda request: httpx.Response(200))
            transport = FidelityTransport(inner=inner, engine=mw.engine, telemetry=False)
            async with httpx.AsyncClient(transport=transport) as client:
                for host in ["evil.example", "victim.example", "xn--passwd-9ua.example"]:
                    await client.get(f"http://{host}/x")
        finally:
            await mw.engine.aclose()

    asyncio.run(run())
    assert set(statuses) == {200}

    with redis.Redis.from_url(redis_url) as client:
        keys = _all_keys(client)
        assert keys, "the store wrote nothing: the test would prove nothing"
        kinds = collections.Counter(k[6:8] for k in keys)
        for key in keys:
            assert KEY_SHAPE.match(key), key
            assert not any(m in key for m in MARKERS), key
            kind = client.type(key)
            if kind == b"hash":
                for field in client.hkeys(key):
                    assert len(field) <= 8, (key, field)  # fixed short field names
                    assert not any(m in field for m in MARKERS)
            elif kind == b"zset":
                for member in client.zrange(key, 0, -1):
                    assert len(member) <= 64, (key, member)  # probe lease ids
                    assert not any(m in member for m in MARKERS)
        # one key per logical subject, never per byte of input: the 10 hostile
        # values give 10 client addresses (the proxy-appended ones), 10 API keys
        # and 10 tenants; the 5 paths give 2 routes ('api' and unmatched)
        assert kinds[b"rl"] == 3 * len(HOSTILE) + 2, kinds
        assert kinds[b"br"] <= 2 + 3  # 2 routes, 3 upstream hosts
        assert kinds[b"bu"] <= 3
        assert set(kinds) <= {b"rl", b"br", b"bp", b"bu"}
