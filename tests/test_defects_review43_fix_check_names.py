"""Review 43 (fix43): `LimitDependency.check()` where route names collide between an
outer app and a mounted app with its own middleware.

rev42 left it: a middleware names the routes of the app it wraps by that app's paths,
so a mounted app with a `FidelityMiddleware` of its own names its route `/export`
while the outer app (its own middleware, its own `/export`) names its route `/export`
too. `check(route="/export")` inside the mounted app read the places off the outermost
router first, found the outer app's `/export`, and read that route's counter: the limit
is the first unnamed 2/min limit there and the second on the mounted route, so it asked
`/export:2/min` (a counter this route's limit never charges: "allowed" for a client it
refuses). Now the names are read as the middleware serving the check gives them (the
walk whose name for the check's own route is the context's route comes first).
"""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.requests import Request

from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


async def get(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        return await http.get(path)


def nested_apps() -> FastAPI:
    fidelity = Fidelity()
    app_wide = fidelity.limit("2/min")
    own = fidelity.limit("2/min", key="global", burst=1)
    clock = FakeClock()

    outer = FastAPI()

    @outer.get("/export", dependencies=[Depends(own)])  # the limit first here
    async def outer_export() -> dict[str, str]:
        return {}

    @outer.get("/quota")
    async def outer_quota(request: Request) -> dict[str, object]:
        check = await own.check(request, route="/export")
        return {"allowed": check.allowed, "counter": check.limits[0].name}

    sub = FastAPI()

    @sub.get("/export", dependencies=[Depends(app_wide), Depends(own)])  # second here
    async def sub_export() -> dict[str, str]:
        return {}

    @sub.get("/quota")
    async def sub_quota(request: Request) -> dict[str, object]:
        check = await own.check(request, route="/export")  # its own `/export`
        return {"allowed": check.allowed, "counter": check.limits[0].name}

    sub.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=clock, store=MemoryStore(), telemetry=False
    )
    fidelity.install(sub)
    outer.mount("/v1", sub)
    outer.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=clock, store=MemoryStore(), telemetry=False
    )
    fidelity.install(outer)
    return outer


async def test_check_inside_a_mounted_app_with_its_own_middleware_reads_its_own_route(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = nested_apps()
    with caplog.at_level(logging.WARNING, "fidelity_mw"):
        assert (await get(app, "/v1/export")).status_code == 200
    # (two middlewares on one request: said, as ever)
    assert any("two FidelityMiddleware" in r.getMessage() for r in caplog.records)
    # the mounted route's own limit (burst 1) is spent: its check says so
    answer = (await get(app, "/v1/quota")).json()
    assert answer == {"allowed": False, "counter": "/export:2/min#2"}  # before: "/export:2/min"
    assert (await get(app, "/v1/export")).status_code == 429
    # the outer app's `/export` is its own route, first limit there: untouched
    assert (await get(app, "/quota")).json() == {"allowed": True, "counter": "/export:2/min"}


async def test_a_check_before_any_request_of_the_mounted_route_reads_its_place() -> None:
    # nothing learned yet in the mounted app: the place is read off the routes, and the
    # outer app's `/export` (the limit first there) is not the route asked about
    app = nested_apps()
    assert (await get(app, "/export")).status_code == 200  # the outer app's route
    answer = (await get(app, "/v1/quota")).json()
    assert answer["counter"] == "/export:2/min#2"  # before: "/export:2/min"
    assert (await get(app, "/quota")).json()["counter"] == "/export:2/min"


async def test_each_app_keeps_the_place_its_own_requests_taught() -> None:
    # requests of both `/export` routes in turn: each check reads its own route's place
    app = nested_apps()
    for path in ("/v1/export", "/export", "/v1/export", "/export"):
        await get(app, path)
        sub = (await get(app, "/v1/quota")).json()["counter"]
        outer = (await get(app, "/quota")).json()["counter"]
        assert (sub, outer) == ("/export:2/min#2", "/export:2/min"), path
