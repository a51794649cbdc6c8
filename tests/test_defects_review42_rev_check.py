"""Review 42: `LimitDependency.check()` of an unnamed limit, where its place on the route
is read off the app's routes (review 41), with dependency overrides, mounts and hosts.

- `app.dependency_overrides` replacing an app-wide unnamed limit (a test taking it out):
  the route's own limit at the same rate is the first a request runs, and counts on
  `<route>:<rate>`; `check()` read the routes' dependencies as declared and asked
  `<route>:<rate>#2`, a counter nothing charges: "allowed, 2 remaining" for a client the
  route refuses, for good (a request taught nothing: only a place after the first was
  learned). Learned `#2` before the override, the same after it.
- A check inside a mounted app (`app.mount("/v1", sub)`): the middleware names the route
  `/v1/export`, the mounted app's routes say `/export`, so `route="/v1/export"` found no
  place and, where the app's routes put the limit in different places, the first
  limit's counter was read. Under a `Host`, the same with the host pattern.
"""

from __future__ import annotations

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.requests import Request

from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


async def get(app: FastAPI, path: str, host: str = "app") -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 1234))
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as http:
        return await http.get(path)


def overridden_app(store: MemoryStore, clock: FakeClock, override: bool) -> tuple[FastAPI, object]:
    fidelity = Fidelity()
    app_wide = fidelity.limit("2/min")
    own = fidelity.limit("2/min")
    app = FastAPI(dependencies=[Depends(app_wide)])

    @app.get("/export", dependencies=[Depends(own)])
    async def export() -> dict[str, str]:
        return {}

    @app.get("/quota")
    async def quota(request: Request) -> dict[str, object]:
        check = await own.check(request, route="/export")
        return {"allowed": check.allowed, "counter": check.limits[0].name}

    async def no_limit() -> None:
        return None

    if override:
        app.dependency_overrides[app_wide] = no_limit
    app.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=clock, store=store, telemetry=False
    )
    fidelity.install(app)
    return app, app_wide


async def test_check_with_the_app_wide_limit_overridden_reads_the_counter_requests_charge() -> None:
    app, _ = overridden_app(MemoryStore(), FakeClock(), override=True)
    assert (await get(app, "/quota")).json() == {"allowed": True, "counter": "/export:2/min"}
    statuses = [(await get(app, "/export")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    # before: {"allowed": True, "counter": "/export:2/min#2"}, before and after
    assert (await get(app, "/quota")).json() == {"allowed": False, "counter": "/export:2/min"}


async def test_check_follows_an_override_set_after_requests_taught_the_place() -> None:
    app, app_wide = overridden_app(MemoryStore(), FakeClock(), override=False)
    assert (await get(app, "/export")).status_code == 200  # learns `#2`
    assert (await get(app, "/quota")).json()["counter"] == "/export:2/min#2"

    async def no_limit() -> None:
        return None

    app.dependency_overrides[app_wide] = no_limit  # (a later test takes it out)
    statuses = [(await get(app, "/export")).status_code for _ in range(2)]
    assert statuses == [200, 429]  # the route's own counter: 1 + 1 of 2
    assert (await get(app, "/quota")).json() == {"allowed": False, "counter": "/export:2/min"}


def mounted_process(store: MemoryStore, clock: FakeClock, host: bool) -> FastAPI:
    """One process of a fleet: the limits in an app mounted at /v1 (or under a Host)."""
    fidelity = Fidelity()
    app_wide = fidelity.limit("2/min")
    own = fidelity.limit("2/min", key="global", burst=1)
    sub = FastAPI()
    name = "api.example.com/export" if host else "/v1/export"

    @sub.get("/export", dependencies=[Depends(app_wide), Depends(own)])
    async def export() -> dict[str, str]:
        return {}

    @sub.get("/import", dependencies=[Depends(own)])  # the same limit, first here
    async def import_() -> dict[str, str]:
        return {}

    @sub.get("/quota")
    async def quota(request: Request) -> dict[str, object]:
        check = await own.check(request, route=name)
        return {"allowed": check.allowed, "counter": check.limits[0].name}

    app = FastAPI()
    if host:
        app.host("api.example.com", sub)
    else:
        app.mount("/v1", sub)
    app.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=clock, store=store, telemetry=False
    )
    fidelity.install(app)
    return app


@pytest.mark.parametrize("host", [False, True], ids=["mount", "host"])
async def test_check_inside_a_mounted_app_reads_the_route_asked_about(host: bool) -> None:
    store, clock = MemoryStore(), FakeClock()
    first, second = mounted_process(store, clock, host), mounted_process(store, clock, host)
    prefix, at = ("", "api.example.com") if host else ("/v1", "app")
    assert (await get(first, prefix + "/export", at)).status_code == 200
    # the route's own limit (one for all clients, burst 1) is spent, in the fleet's
    # store: the other process, which has served nothing, says so
    answer = (await get(second, prefix + "/quota", at)).json()
    name = "api.example.com/export" if host else "/v1/export"
    # before: the first limit's counter, `<name>:2/min`, allowed
    assert answer == {"allowed": False, "counter": f"{name}:2/min#2"}
    assert (await get(second, prefix + "/export", at)).status_code == 429
