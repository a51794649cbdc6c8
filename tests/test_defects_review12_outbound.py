"""Outbound and state defects left alone by review 11, and a review of the balancer
(out12): each test failed before its fix."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.context import SOURCE_FALLBACK
from fidelity_mw.engine import Engine
from fidelity_mw.policy import (
    BreakerConfig,
    DeadlineConfig,
    RetryConfig,
    StateConfig,
    UpstreamConfig,
)
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_server import PATIENT, QUIET, RedisServer

pytestmark = pytest.mark.anyio


def _client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


# ------------------------------------- 1. raise_for_status() on one of two calls at once


def _gather_app(raise_on: str, seen: list[Any]) -> Starlette:
    """Two calls to one upstream at once in one request (`asyncio.gather`): `/given-up`
    answers 503 every time (retried, then given up), `/other` answers only once the
    first call has given up: 500 (not retried: no give-up of its own), or first 503 and
    then 200 (its retry is recorded after the other call's give-up)."""
    gave_up = asyncio.Event()
    other: list[int] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/given-up":
            if request.headers["x-fidelity-attempt"] == "3":
                gave_up.set()  # (the loop records its give-up right after this answer)
            return httpx.Response(503)
        await gave_up.wait()
        await asyncio.sleep(0)
        other.append(1)
        if raise_on == "other":
            return httpx.Response(500)
        return httpx.Response(503 if len(other) == 1 else 200)

    outbound = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(upstream)))

    async def handler(request: Request) -> Response:
        seen.append(request.scope)
        first, second = await asyncio.gather(
            outbound.get("http://payments.internal/given-up"),
            outbound.get("http://payments.internal/other"),
        )
        (first if raise_on == "given-up" else second).raise_for_status()
        return PlainTextResponse("not reached")

    app = Starlette(routes=[Route("/", handler)])
    policy = Policy(
        deadline=DeadlineConfig(default_ms=5000),
        breaker=BreakerConfig(consecutive_failures=100),
        upstreams=(
            UpstreamConfig(
                host="*",
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=1),
                breaker=BreakerConfig(consecutive_failures=100),
            ),
        ),
    )
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


async def test_raise_for_status_on_the_call_given_up_on_while_another_retries() -> None:
    """Before: the mapping read the request's last decision for the upstream, which was
    the other call's retry: a bare 500."""
    seen: list[Any] = []
    async with _client(_gather_app("given-up", seen)) as client:
        got = await client.get("/")
    assert got.status_code == 502
    assert got.headers["x-fidelity-retry"] == "exhausted"
    assert json.loads(got.content)["type"].endswith("upstream-failed")


async def test_raise_for_status_on_an_unretried_500_beside_a_give_up_stays_the_apps() -> None:
    """Before: the other call's give-up, the last decision for the upstream, was read as
    this 500's: a 502 marked exhausted for a status we never retried."""
    seen: list[Any] = []
    async with _client(_gather_app("other", seen)) as client:
        got = await client.get("/")
    assert got.status_code == 500
    assert got.text == "Internal Server Error"


# ------------------------------------- 2. the tiered store's first-attempt fallback says why


@pytest.mark.redis
async def test_a_tiered_first_attempt_without_redis_says_why(own_redis: RedisServer) -> None:
    """Before: the first attempt's gate came from the exact store's fallback (the cache's
    `admit`) as a plain answer: the decision said `fallback` and not why, where the
    Redis store's says `fallback_why` (a retry's budget answer said it already)."""
    clock = FakeClock()
    policy = Policy(
        state=StateConfig(url="tiered+" + own_redis.url, **PATIENT, **QUIET),
        upstreams=(
            UpstreamConfig(
                host="*",
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=2),
                breaker=BreakerConfig(consecutive_failures=3, open_s=5.0, open_jitter=0.0),
            ),
        ),
    )
    store = TieredStore(config=policy.state, rng=seeded_random(3), clock=clock)
    engine = Engine(policy, clock=clock, store=store)
    t = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), engine=engine, telemetry=False
    )
    own_redis.stop()
    try:
        async with httpx.AsyncClient(transport=t) as client:
            for _ in range(2):  # the call that finds Redis down, and one while it is
                response = await client.get("http://svc.internal/x")
                decisions = response.extensions["fidelity_context"].decisions
                first = [d for d in decisions if d.layer == "retry"]
                assert [d.state_source for d in first] == [SOURCE_FALLBACK]
                assert first[0].details["fallback_why"] == "unreachable"  # type: ignore[index]
    finally:
        await store.aclose()
