"""Mounted sub-apps (`app.mount("/v2", v2)`): each route under the mount is a route of its
own (identity, breaker, a dependency's default counter, decorator overrides), as a route
of the app itself is; before, everything under a mount was one route."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from fidelity_mw import FidelityMiddleware, Policy, current
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.routes import framework_template
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def with_middleware(app: Any, clock: FakeClock, policy: Policy | None = None) -> Any:
    app.add_middleware(
        FidelityMiddleware,
        policy=policy or Policy(),
        clock=clock,
        rng=seeded_random(2),
        telemetry=False,
    )
    return app


async def test_a_dependency_counts_each_route_of_a_mounted_app_on_its_own(
    clock: FakeClock,
) -> None:
    fidelity = Fidelity()
    v2 = FastAPI()

    @v2.get("/orders", dependencies=[Depends(fidelity.limit("2/min"))])
    async def orders() -> dict[str, str | None]:
        ctx = current()
        return {"route": None if ctx is None else ctx.route}

    @v2.get("/invoices", dependencies=[Depends(fidelity.limit("2/min"))])
    async def invoices() -> dict[str, str]:
        return {}

    fidelity.install(v2)
    app = FastAPI()
    app.mount("/v2", v2)
    with_middleware(app, clock)
    async with client(app) as c:
        first = await c.get("/v2/orders")
        statuses = [(await c.get(p)).status_code for p in ("/v2/orders", "/v2/invoices")]
    assert first.json() == {"route": "/v2/orders"}
    assert first.headers["ratelimit"].startswith('"/v2/orders:2/min";r=1;')
    # /v2/invoices has a counter of its own: /v2/orders' two requests did not spend it
    assert statuses == [200, 200]


async def test_each_route_of_a_mounted_app_has_its_own_breaker(clock: FakeClock) -> None:
    v2 = FastAPI()

    @v2.get("/broken")
    async def broken() -> PlainTextResponse:
        return PlainTextResponse("no", status_code=500)

    @v2.get("/fine")
    async def fine() -> dict[str, bool]:
        return {"ok": True}

    app = FastAPI()
    app.mount("/v2", v2)
    policy = Policy.from_dict(
        {"breaker": {"min_calls": 2, "failure_ratio": 0.5, "open_jitter": 0, "open_s": 5}}
    )
    with_middleware(app, clock, policy)
    async with client(app) as c:
        broken_answers = [(await c.get("/v2/broken")).status_code for _ in range(3)]
        fine_answer = (await c.get("/v2/fine")).status_code
    assert broken_answers == [500, 500, 503]  # its breaker opened
    assert fine_answer == 200  # the sibling's did not


async def test_a_breaker_decorator_in_a_mounted_app_applies(clock: FakeClock) -> None:
    fidelity = Fidelity()
    v2 = FastAPI()

    @v2.get("/flaky")
    @fidelity.breaker(min_calls=2, failure_ratio=0.5, open_jitter=0.0, open_s=5.0, open_min_s=5.0)
    async def flaky() -> PlainTextResponse:
        return PlainTextResponse("no", status_code=500)

    app = FastAPI()
    app.mount("/v2", v2)
    with_middleware(app, clock, Policy(breaker=None))  # no breaker but the decorator's
    async with client(app) as c:
        answers = [(await c.get("/v2/flaky")).status_code for _ in range(3)]
    assert answers == [500, 500, 503]


async def ok(request: Request) -> JSONResponse:
    ctx = current()
    return JSONResponse({"route": None if ctx is None else ctx.route})


async def opaque(scope: Any, receive: Any, send: Any) -> None:
    await JSONResponse({"route": scope["state"]["fidelity"].route})(scope, receive, send)


def test_starlette_mounts_name_their_routes_and_keep_their_own_name_otherwise() -> None:
    app = Starlette(
        routes=[
            Mount(
                "/v2", routes=[Route("/orders/{id}", ok), Mount("/deep", routes=[Route("/x", ok)])]
            ),
            Mount("/admin", app=opaque),
        ]
    )

    def name(path: str, method: str = "GET") -> str | None:
        return framework_template({"type": "http", "path": path, "method": method, "app": app})

    assert name("/v2/orders/7") == "/v2/orders/{id}"
    assert name("/v2/deep/x") == "/v2/deep/x"
    assert name("/v2/orders/7", "POST") == "/v2/orders/{id}"  # 405: the same route
    assert name("/v2/nothing") == "/v2/*"  # no sub-route serves it: the mount's name
    assert name("/admin/anything") == "/admin/*"  # an app without routes to look into


async def test_a_starlette_mount_under_the_middleware(clock: FakeClock) -> None:
    app = Starlette(routes=[Mount("/v2", routes=[Route("/orders/{id}", ok)])])
    with_middleware(app, clock)
    async with client(app) as c:
        assert (await c.get("/v2/orders/1")).json() == {"route": "/v2/orders/{id}"}
