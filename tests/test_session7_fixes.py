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
