"""Review 41: `LimitDependency.check()` of a route's second unnamed limit at one rate.

Two unnamed `fidelity.limit` dependencies of one route at the same rate count apart:
the second FastAPI runs counts on `<route>:<rate>#2` (review 39). A limit learned that
`#2` name on the route's first request in its process; `check()` before that read the
first limit's counter. With shared state (Redis; here one store under two apps, as two
processes of a fleet, or a process restarted) a process that had served nothing yet
answered for the wrong counter: a client the route's own limit refuses was told it
would be admitted. `check()` now finds the limit's place on the route's dependencies
(in the order FastAPI runs them) before any request.

And `check(request, route=...)` of a limit keyed by `route` read the asking route's key
(`route:/quota`), not the route asked about: always admitted, whatever that route's
counter held.
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


def process(store: MemoryStore, clock: FakeClock) -> FastAPI:
    """One process of the fleet: its own forms and app, the fleet's store."""
    fidelity = Fidelity()
    app = FastAPI(dependencies=[Depends(fidelity.limit("3/min"))])  # app-wide, per client
    own = fidelity.limit("3/min", key="global", burst=1)  # the route's, for all clients

    @app.get("/orders", dependencies=[Depends(own)])
    async def orders() -> dict[str, str]:
        return {"orders": "none"}

    @app.get("/room")
    async def room(request: Request) -> dict[str, bool]:
        return {"allowed": (await own.check(request, route="/orders")).allowed}

    app.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=clock, store=store, telemetry=False
    )
    fidelity.install(app)
    return app


async def get(app: FastAPI, path: str, client: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(client, 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        return await http.get(path)


async def test_check_before_the_routes_first_request_reads_the_second_counter() -> None:
    store, clock = MemoryStore(), FakeClock()
    first, second = process(store, clock), process(store, clock)
    assert (await get(first, "/orders", "10.0.0.1")).status_code == 200
    # the route's own limit (one for all clients, burst 1) is spent: another client
    # asking the other process, which has served no /orders yet, is not admitted
    assert (await get(second, "/room", "10.0.0.2")).json() == {"allowed": False}
    assert (await get(second, "/orders", "10.0.0.2")).status_code == 429
    # the app-wide limit's counter for that client is its own: still free after a refusal
    assert (await get(second, "/room", "10.0.0.3")).json() == {"allowed": False}


async def test_check_of_the_first_limit_still_reads_its_own() -> None:
    store, clock = MemoryStore(), FakeClock()
    fidelity = Fidelity()
    shared = fidelity.limit("3/min")
    app = FastAPI(dependencies=[Depends(shared)])

    @app.get("/orders", dependencies=[Depends(fidelity.limit("3/min", key="route", burst=1))])
    async def orders() -> dict[str, str]:
        return {}

    @app.get("/room")
    async def room(request: Request) -> dict[str, bool]:
        return {"allowed": (await shared.check(request, route="/orders")).allowed}

    app.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=clock, store=store, telemetry=False
    )
    fidelity.install(app)
    assert (await get(app, "/room", "10.0.0.1")).json() == {"allowed": True}
    for _ in range(3):  # the route's own limit refuses after one; the first is given back
        await get(app, "/orders", "10.0.0.1")
    assert (await get(app, "/room", "10.0.0.1")).json() == {"allowed": True}


async def test_check_of_a_limit_keyed_by_route_reads_the_route_asked_about() -> None:
    fidelity = Fidelity()
    per_route = fidelity.limit("2/min", key="route")

    app = FastAPI()

    @app.get("/export", dependencies=[Depends(per_route)])
    async def export() -> dict[str, str]:
        return {}

    @app.get("/quota")
    async def quota(request: Request) -> dict[str, int]:
        return {"remaining": (await per_route.check(request, route="/export")).limits[0].remaining}

    app.add_middleware(FidelityMiddleware, policy=Policy(), clock=FakeClock(), telemetry=False)
    fidelity.install(app)
    assert (await get(app, "/quota", "10.0.0.1")).json() == {"remaining": 2}
    assert (await get(app, "/export", "10.0.0.2")).status_code == 200
    assert (await get(app, "/quota", "10.0.0.3")).json() == {"remaining": 1}
