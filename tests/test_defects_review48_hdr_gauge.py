"""Review 48 (hdr48): the breaker gauge after a probe closed the breaker.

On a store the gauge cannot read (Redis) it shows the state the decisions revealed. A
probe's decision says `half_open`; the probe's success closed the breaker in the store,
but no decision said so: the gauge kept `half_open` until the breaker's next attempt
(round 47 measured 5-13 of 60 requests so). The store's answer to the probe's outcome
says the state afterwards: it now reaches the gauge. Held on every store kind, for a
host breaker, a service's instance and a route breaker, through the middleware.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import Engine, FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock
from redis_clock import RedisClock
from redis_server import PATIENT
from test_telemetry_helpers import metric_points, pipeline

pytestmark = [pytest.mark.anyio]


def _gauge(reader: Any) -> dict[tuple[str, str], str]:
    return {
        (a[schema.SUBJECT], a.get(schema.BREAKER_SCOPE)): a[schema.BREAKER_STATE]
        for a, point in metric_points(reader, schema.METRIC_BREAKER_STATE)
        if point.value == 1
    }


def _state(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "memory":
        return {"url": "memory://"}
    url: str = request.getfixturevalue("redis_url")
    if kind == "tiered":
        url = url.replace("redis://", "tiered+redis://")
    return {"url": url, **PATIENT}


class _Rig:
    """A route `/r` (its route breaker opens on one 500) calling `http://api/x` (its host
    breaker opens on one 503) and the service `payments` (one instance)."""

    def __init__(self, state: dict[str, Any], redis_clock: RedisClock | None) -> None:
        self.clock = FakeClock()
        self.redis_clock = redis_clock
        if redis_clock is not None:
            redis_clock.set(self.clock.monotonic())
        opens = {"consecutive_failures": 1, "min_calls": 1}
        policy = Policy.from_dict(
            {
                "state": state,
                "breaker": {**opens, "failure_statuses": [500]},
                "upstream": [
                    {"host": "api", "retry": {"attempts": 1}, "breaker": opens},
                    {
                        "host": "payments",
                        "instances": ["http://10.0.0.7:8080"],
                        "retry": {"attempts": 1},
                        "breaker": opens,
                    },
                ],
            }
        )
        self.engine = Engine(policy, clock=self.clock)
        self.p = pipeline()
        self.failing = True
        self.client = httpx.AsyncClient(
            transport=FidelityTransport(
                httpx.MockTransport(self._upstream), engine=self.engine, observer=self.p.telemetry
            )
        )
        app = Starlette(routes=[Route("/r", self._route)])
        self.app = FidelityMiddleware(app, engine=self.engine, observer=self.p.telemetry)

    def _upstream(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if self.failing else 200)

    async def _route(self, request: Request) -> PlainTextResponse:
        if "fail" in request.query_params:  # the app's own failure: the route breaker's
            return PlainTextResponse("", 500)
        codes = []
        for url in ("http://api/x", "http://payments/x"):
            try:
                codes.append((await self.client.get(url)).status_code)
            except httpx.HTTPError:
                codes.append(0)
        return PlainTextResponse(" ".join(map(str, codes)))

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        if self.redis_clock is not None:
            self.redis_clock.set(self.clock.monotonic())

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.engine.aclose()
        self.p.shutdown()


OPEN = {
    ("/r", "route"): "open",
    ("api", "upstream"): "open",
    ("10.0.0.7:8080", "upstream"): "open",
}
CLOSED = {key: "closed" for key in OPEN}


@pytest.mark.parametrize("kind", ["memory", "redis", "tiered"])
async def test_the_gauge_shows_closed_once_a_probe_closed_the_breaker(
    kind: str, request: pytest.FixtureRequest
) -> None:
    if kind != "memory":
        request.applymarker(pytest.mark.redis)
    redis_clock = request.getfixturevalue("redis_clock") if kind != "memory" else None
    rig = _Rig(_state(kind, request), redis_clock)
    try:
        transport = httpx.ASGITransport(app=rig.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as outer:
            assert (await outer.get("/r")).text == "503 503"  # opens both upstreams'
            # at once, before any refusal said so (before, on Redis: the host's `closed`;
            # tiered decides on its copy, which has the failures at its next sync)
            opened = _gauge(rig.p.metrics)
            if kind != "tiered":
                assert opened[("api", "upstream")] == "open", opened
                assert opened[("10.0.0.7:8080", "upstream")] == "open", opened
            assert (await outer.get("/r?fail=1")).status_code == 500  # and the route's
            refused = await outer.get("/r")
            for _ in range(200):  # tiered: once its outcomes reached Redis (a sync)
                if refused.status_code == 503 or kind != "tiered":
                    break
                rig.advance(0.001)
                await asyncio.sleep(0.01)
                refused = await outer.get("/r")
            assert refused.status_code == 503
            assert refused.headers["x-fidelity-decided-by"] == "breaker"
            assert _gauge(rig.p.metrics) == OPEN
            rig.failing = False
            rig.advance(60.0)  # past any open period: the next calls are probes
            response = await outer.get("/r")
            assert (response.status_code, response.text) == (200, "200 200")
            # the probes succeeded and closed every breaker (one success closes it)
            before_next_attempt = _gauge(rig.p.metrics)  # before: half_open, all three
            response = await outer.get("/r")
            assert response.status_code == 200
            assert before_next_attempt == CLOSED
            assert _gauge(rig.p.metrics) == CLOSED
    finally:
        await rig.aclose()
