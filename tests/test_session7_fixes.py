"""Fixes of the lead's own in the seventh review round (the helpers' are in
tests/test_defects_review7.py)."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, current
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


async def test_remaining_s_reads_the_middlewares_own_clock_by_default() -> None:
    """`ctx.remaining_s()` with no argument: the seconds left by the middleware's clock.
    It needed `now`, and the quickstart said to pass `time.monotonic()`, which is wrong
    whenever the middleware runs on another clock (a FakeClock in a test)."""
    clock = FakeClock()

    async def handler(request: Request) -> JSONResponse:
        ctx = current()
        assert ctx is not None
        clock.advance(0.25)  # the handler's own work
        return JSONResponse(
            {"default": ctx.remaining_s(), "explicit": ctx.remaining_s(clock.monotonic())}
        )

    app = Starlette(routes=[Route("/work", handler)])
    app.add_middleware(FidelityMiddleware, policy=Policy(), clock=clock, telemetry=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        got = (await client.get("/work", headers={"x-request-timeout-ms": "1000"})).json()
        no_deadline = Policy.from_dict({"deadline": {"default_ms": False}})
        bare = Starlette(routes=[Route("/work", handler)])
        bare.add_middleware(FidelityMiddleware, policy=no_deadline, clock=clock, telemetry=False)
    assert got == {"default": 0.75, "explicit": 0.75}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=bare), base_url="http://t"
    ) as client:
        assert (await client.get("/work")).json() == {"default": None, "explicit": None}


@pytest.mark.parametrize("state", ["memory", "redis", "tiered"])
async def test_a_429_reports_the_limits_that_would_admit_as_they_are(
    state: str, request: pytest.FixtureRequest
) -> None:
    """All-or-nothing: a request one limit refuses charges no other limit. The other
    limits' RateLimit fields said one unit fewer, as if it had (memory and Redis; the
    tiered store's slices already said it right)."""
    from fidelity_mw import RateLimit
    from fidelity_mw.policy import StateConfig

    url = "memory://" if state == "memory" else request.getfixturevalue("redis_url")
    if state == "tiered":
        url = "tiered+" + url
    policy = Policy(
        state=StateConfig(url=url, key_prefix=f"t7-{state}"),
        breaker=None,
        rate_limits=(
            # (per minute: Redis decides on its own clock, and on a loaded machine a
            # 10/s bucket refilled the first unit between the two requests: r=10)
            RateLimit(name="per-client", rate="1/minute", burst=1),
            RateLimit(name="shared", rate="10/minute", burst=10, key="global"),
        ),
    )

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({})

    app = Starlette(routes=[Route("/x", ok)])
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        first = await client.get("/x")
        second = await client.get("/x")
    assert (first.status_code, second.status_code) == (200, 429)
    fields = dict(item.strip().split(";", 1) for item in second.headers["ratelimit"].split(","))
    assert fields['"per-client"'].startswith("r=0;")
    assert fields['"shared"'].startswith("r=9;")  # the first request's unit only
