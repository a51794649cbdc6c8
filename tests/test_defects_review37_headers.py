"""Malformed headers where tests/test_fuzz_inbound.py does not reach: the priority
header in front of a bulkhead (fixed and adaptive), RateLimit-shaped and
x-fidelity-* headers sent by a caller, and the same junk coming back from an upstream
the app calls through `FidelityTransport` inside the request (Retry-After, RateLimit,
X-RateLimit-*, x-fidelity-retry / -fault / -decided-by), with both RateLimit header
sets on and the caller trusted or not.

Whatever the bytes: the middleware never raises, every request gets exactly one
response, and none is a 500; a request the app did not see was answered by a layer
(429, 503, 504) with a problem body.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from _asgi import http_scope
from fidelity_mw import (
    ConcurrencyConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RetryConfig,
    RouteConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock, seeded_random

LAYER_STATUSES = {429, 503, 504}

junk = st.one_of(
    st.sampled_from(
        [
            b"",
            b" ",
            b"critical",
            b"CRITICAL",
            b"sheddable",
            b"default",
            b"critical, sheddable",
            b"0",
            b"-1",
            b"nan",
            b"1e309",
            b"9" * 40,
            b"\x00",
            b"\xff\xfe",
            b"exhausted",
            b"upstream",
            b"ratelimit",
            b'"per-client";r=0;t=1',
            b'"per-client";q=100;w=1',
            b'"x";r=-5;t=nan, "y";r=;t=',
            b";;;,,,==",
            b'"unterminated',
            b"Wed, 21 Oct 2015 07:28:00 GMT",
            b"Fri, 31 Dec 9999 23:59:59 GMT",
            b"Mon, 32 Foo 2023 99:99:99 GMT",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"ff-zz-00-01",
        ]
    ),
    st.binary(max_size=40),
    st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),
)
NAMES = [
    b"x-priority",
    b"X-Priority",
    b"x-fidelity-attempt",
    b"x-fidelity-retry",
    b"x-fidelity-fault",
    b"x-fidelity-decided-by",
    b"ratelimit",
    b"ratelimit-policy",
    b"x-ratelimit-limit",
    b"x-ratelimit-remaining",
    b"x-ratelimit-reset",
    b"retry-after",
    b"x-request-timeout-ms",
    b"grpc-timeout",
    b"traceparent",
    b"tracestate",
    b"baggage",
    b"idempotency-key",
    b"x-api-key",
]
headers = st.lists(st.tuples(st.sampled_from(NAMES), junk), max_size=8)
UPSTREAM_NAMES = [
    b"retry-after",
    b"ratelimit",
    b"ratelimit-policy",
    b"x-ratelimit-limit",
    b"x-ratelimit-remaining",
    b"x-ratelimit-reset",
    b"x-fidelity-retry",
    b"x-fidelity-fault",
    b"x-fidelity-decided-by",
    b"content-type",
]
upstream_answers = st.lists(
    st.tuples(
        st.sampled_from([200, 200, 429, 500, 502, 503, 504]),
        st.lists(st.tuples(st.sampled_from(UPSTREAM_NAMES), junk), max_size=5),
    ),
    min_size=1,
    max_size=4,
)


class Rig:
    """The middleware in front of an app that calls an upstream on /call and answers
    200 with what it got; the upstream replays scripted answers."""

    def __init__(self, adaptive: bool, trusted: bool) -> None:
        self.clock = FakeClock()
        self.answers: list[tuple[int, list[tuple[bytes, bytes]]]] = []
        self.app_calls = 0
        peers = ("10.0.0.0/8", "127.0.0.0/8") if trusted else ("192.0.2.0/24",)
        policy = Policy(
            priority_header="x-priority",
            trusted_peers=peers,
            rate_limit_header_names="both",
            rate_limits=(
                RateLimit(name="per-client", rate="50/s", burst=20),
                RateLimit(name="per-key", rate="30/s", burst=10, key="header:x-api-key"),
            ),
            concurrency=ConcurrencyConfig(limit=2, max_queue=1, adaptive=adaptive),
            routes=(
                RouteConfig(match="/lax*", enforce=False, deadline_ms=100),
                RouteConfig(match="/low*", priority="sheddable"),
            ),
            upstreams=(
                UpstreamConfig(
                    host="up.internal",
                    retry=RetryConfig(attempts=3, base_ms=1, max_ms=5, retry_after_max_s=2),
                ),
            ),
        )
        transport = FidelityTransport(httpx.MockTransport(self.upstream))
        self.client = httpx.AsyncClient(transport=transport)
        self.mw = FidelityMiddleware(
            self.app, policy=policy, clock=self.clock, rng=seeded_random(3), telemetry=False
        )

    def upstream(self, request: httpx.Request) -> httpx.Response:
        status, sent = self.answers.pop(0) if self.answers else (200, [])
        return httpx.Response(status, headers=sent, content=b"{}")

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.app_calls += 1
        await receive()
        for _ in range(3):  # hold the slot a few loop turns: requests sent together overlap
            await asyncio.sleep(0)
        body = b"ok"
        if scope["path"].startswith("/call"):
            response = await self.client.get("http://up.internal/x")
            body = str(response.status_code).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def rigs() -> dict[tuple[bool, bool], Rig]:
    return {(a, t): Rig(a, t) for a in (False, True) for t in (False, True)}


async def drive(rig: Rig, path: str, sent_headers: list[tuple[bytes, bytes]]) -> list[Any]:
    scope = http_scope(
        path,
        headers=[(name.lower(), value) for name, value in sent_headers],
        client=("10.1.2.3", 5555),
        server=("127.0.0.1", 8000),
    )
    sent: list[Any] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await rig.mw(scope, receive, send)
    return sent


requests = st.lists(
    st.tuples(st.sampled_from(["/call", "/call", "/plain", "/lax", "/low", "/lax/call"]), headers),
    min_size=1,
    max_size=4,
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    which=st.tuples(st.booleans(), st.booleans()),
    batch=requests,
    answers=upstream_answers,
    advance=st.sampled_from([0.0, 0.5, 3.0]),
)
def test_malformed_headers_never_make_a_500(
    rigs: dict[tuple[bool, bool], Rig],
    which: tuple[bool, bool],
    batch: list[tuple[str, list[tuple[bytes, bytes]]]],
    answers: list[tuple[int, list[tuple[bytes, bytes]]]],
    advance: float,
) -> None:
    """Requests sent together (so the bulkhead of limit 2, queue 1, reads the priority
    header under pressure), each with its own junk headers."""
    rig = rigs[which]
    rig.clock.advance(advance)
    rig.answers = list(answers) * len(batch)
    before = rig.app_calls

    async def together() -> list[list[Any]]:
        return list(await asyncio.gather(*(drive(rig, p, h) for p, h in batch)))

    layer_answers = 0
    for sent in asyncio.run(together()):
        starts = [m for m in sent if m["type"] == "http.response.start"]
        finals = [m for m in sent if m["type"] == "http.response.body" and not m.get("more_body")]
        assert len(starts) == 1, sent
        assert sent[0] is starts[0], sent
        assert len(finals) == 1, sent
        assert sent[-1] is finals[0], sent
        status = starts[0]["status"]
        event(f"status {status}")
        assert status != 500, sent
        # the app answers 200; an upstream give-up it let out is the middleware's 502/503/504
        assert status in (200, *LAYER_STATUSES, 502), sent
        body = b"".join(m.get("body", b"") for m in sent[1:])
        if status == 200 and body != b"ok":
            event(f"upstream answered {body.decode()}")
        if status != 200:
            problem = json.loads(body)
            assert problem["status"] == status
            layer_answers += 1
    # every request the app did not see was answered by a layer
    assert rig.app_calls - before >= len(batch) - layer_answers
