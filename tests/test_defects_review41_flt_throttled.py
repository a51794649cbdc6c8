"""Review 41 (flt41, item 2): an app's own 502 after the transport gave up on an upstream's 429.

C throttling B (429 with `Retry-After`), B's transport retrying after the wait and giving
up: when B's app let the 429 out (`raise_for_status()`), the middleware answered the
upstream's 502 and its route breaker counted nothing (flt40). When the app caught it and
answered a 502 of its own (or let the 429 response decide its own 502), the route breaker
counted each as the route's failure and, after 2, shed the route (503) though nothing of
B's failed. The transport now marks the request (`ctx.upstream_throttled`) when it gives
up on a 429 after retrying, and the app's gateway answer for it is nobody's failure, as
the raised one. The app's own 500 after it stays the app's (a 500 is not a gateway's
report of its upstream: `inbound.refusals.reports_upstream`).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock, seeded_random


def _service(style: str, upstream_status: int = 429) -> Starlette:
    """A route calling an upstream that always answers `upstream_status` (`Retry-After: 1`);
    the route breaker opens after 2 consecutive failures. `style`: how the app answers
    the give-up: "status" (reads the status, answers 502), "caught" (catches
    `raise_for_status()`, answers 502), "own500" (catches it, answers 500)."""
    clock = FakeClock()

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(upstream_status, headers={"retry-after": "1"})

    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(upstream), clock=clock, telemetry=False)
    )

    async def route(request: Request) -> Response:
        answer = await client.get("http://up/")
        if style == "status":
            if answer.status_code in (429, 503):
                return Response(b"upstream busy", 502)
            return Response(b"ok")
        try:
            answer.raise_for_status()
        except httpx.HTTPStatusError:
            return Response(b"upstream busy", 502 if style == "caught" else 500)
        return Response(b"ok")

    retry = RetryConfig(attempts=3, base_ms=1, max_ms=1, retry_after_max_s=5.0)
    counting = BreakerConfig(min_calls=1000, consecutive_failures=1000)
    policy = Policy(
        breaker=BreakerConfig(consecutive_failures=2, min_calls=2, open_s=30.0, open_min_s=30.0),
        upstreams=(UpstreamConfig(host="up", retry=retry, breaker=counting),),
    )
    app = Starlette(routes=[Route("/", route)])
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, rng=seeded_random(1), telemetry=False
    )
    return app


def _statuses(app: Starlette, n: int) -> list[tuple[int, str | None]]:
    async def go() -> list[tuple[int, str | None]]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            out = []
            for _ in range(n):
                r = await client.get("/")
                out.append((r.status_code, r.headers.get("x-fidelity-decided-by")))
            return out

    return asyncio.run(go())


@pytest.mark.parametrize("style", ["status", "caught"])
def test_the_apps_own_502_for_a_429_given_up_on_is_no_route_failure(style: str) -> None:
    # before: [502, 502, then (503, "breaker") x 3]: the route breaker shed the route
    assert _statuses(_service(style), 5) == [(502, None)] * 5


def test_the_apps_own_500_after_it_stays_the_apps() -> None:
    # a 500 is the app's own answer, not a gateway's report: counted, as before
    got = _statuses(_service("own500"), 4)
    assert got == [(500, None), (500, None), (503, "breaker"), (503, "breaker")]


def test_the_apps_own_502_for_a_503_given_up_on_is_left_to_the_upstreams_breaker() -> None:
    # A 503 given up on: the upstream's breaker counts 503s (its `min_calls` here keeps it
    # closed), so it owns them and the route breaker leaves them alone: unchanged
    assert _statuses(_service("status", 503), 4) == [(502, None)] * 4
