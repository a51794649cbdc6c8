"""A route breaker a policy swap turned off (`breaker = false`), in the gauge and the page.

tlf46 took an upstream breaker the swap removed out of the breaker gauge and the admin
page; a route breaker stayed (`[('/a', 'open')]` for good after the swap, the example
`FidelityBreakerOpen` alert firing on a breaker no request meets): one declared on the
endpoint in code is known only from its route's cached plan, which the swap clears, so
telling the two apart was left. Now the engine remembers which routes' breakers their
code declared (when it plans them): those stay, as they stay in force; a route the
policy alone gave a breaker, and that the new policy gives none, leaves both at once,
before its next request; planned again, its plan says.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import Engine, FidelityMiddleware, Policy
from fidelity_mw.admin import AdminApp
from fidelity_mw.overrides import mark
from fidelity_mw.policy import BreakerConfig
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT
from test_telemetry_helpers import metric_points, pipeline

pytestmark = pytest.mark.anyio

TIGHT: dict[str, Any] = {
    "consecutive_failures": 1,
    "min_calls": 1,
    "open_s": 3600.0,
    "open_min_s": 3600.0,
}


def _gauge(reader: Any) -> list[tuple[str, str]]:
    return sorted(
        (a[schema.SUBJECT], a[schema.BREAKER_STATE])
        for a, point in metric_points(reader, schema.METRIC_BREAKER_STATE)
        if point.value == 1 and a.get(schema.BREAKER_SCOPE) == "route"
    )


async def _page(admin: AdminApp, engine: Engine) -> list[tuple[str, str]]:
    doc = await admin.state(engine)
    return sorted((b["subject"], b["state"]) for b in doc["breakers"] if b["kind"] == "route")


async def fails(request: Request) -> PlainTextResponse:
    return PlainTextResponse("down", status_code=500)


async def fails_too(request: Request) -> PlainTextResponse:
    return PlainTextResponse("down", status_code=500)


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_route_breaker_the_swap_turned_off_leaves_the_gauge_and_the_page(
    store: str, request: pytest.FixtureRequest
) -> None:
    state: dict[str, Any] = {}
    if store == "redis":
        request.getfixturevalue("redis_clock")
        state = {"state": {"url": request.getfixturevalue("redis_url"), **PATIENT}}
    app = Starlette(
        routes=[
            Route("/a", fails),  # the policy's `[breaker]`
            Route("/b", fails),  # its `[[route]]` entry's
            Route(
                "/c", mark(fails_too, breaker=BreakerConfig(**TIGHT))
            ),  # declared on the endpoint in code
        ]
    )
    before = Policy.from_dict(
        {"breaker": TIGHT, "route": [{"match": "/b", "name": "b", "breaker": TIGHT}], **state}
    )
    after = Policy.from_dict(
        {"breaker": False, "route": [{"match": "/b", "name": "b", "breaker": False}], **state}
    )
    clock = FakeClock()
    engine = Engine(before, clock=clock)
    p = pipeline()
    wrapped = FidelityMiddleware(app, engine=engine, observer=p.telemetry)
    admin = AdminApp(engine)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(wrapped), base_url="http://t"
        ) as client:
            for path in ("/a", "/b", "/c"):
                assert (await client.get(path)).status_code == 500  # opens it
                assert (await client.get(path)).status_code == 503  # open (Redis: seen so)
            opened = [("/a", "open"), ("/c", "open"), ("b", "open")]
            assert _gauge(p.metrics) == opened
            assert await _page(admin, engine) == opened
            engine.policy = after
            clock.advance(60.0)
            # before: all three, for good
            assert _gauge(p.metrics) == [("/c", "open")]
            assert await _page(admin, engine) == [("/c", "open")]
            # planned again: no breaker on /a and b, /c's still open
            assert (await client.get("/a")).status_code == 500
            assert (await client.get("/b")).status_code == 500
            assert (await client.get("/c")).status_code == 503
            assert _gauge(p.metrics) == [("/c", "open")]
            assert await _page(admin, engine) == [("/c", "open")]
            # swapped back: shown again, as the store kept them
            engine.policy = before
            assert _gauge(p.metrics) == opened
            assert await _page(admin, engine) == opened
    finally:
        await engine.aclose()
        p.shutdown()
