"""Review 12 (limits): defects, each with the test that failed before its fix.

- A `Depends(fidelity.limit(...))` without a name is named `<route>:<rate>`; a route
  named with a "|" (a `[[route]]` name may hold one) gave a limit name with a "|",
  which policy names may not hold: its state key "<name>|<client key>" split at the
  wrong bar (the admin page, the decision summary). The route's "|" is written %7C.
- FastAPI answers HEAD on a GET route 405 from its router (Starlette's own routes
  serve it with the GET handler), and GET limits cover HEAD: under `charge = "served"`
  that 405, which never reached an endpoint, spent quota. The router's 405 now gives
  "served" limits their units back, as its trailing-slash redirect does; "always"
  limits keep the charge, and an endpoint's own 405 is charged as any answer.
- `RateLimit(key=async_fn)` was accepted, and the middleware (which calls a key
  function without awaiting) keyed each request by its coroutine's text: a fresh
  counter per request. It is refused at load now, saying why.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Response

from fidelity_mw import FidelityMiddleware, Policy, RateLimit, RouteConfig
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


class Recorder:
    def __init__(self) -> None:
        self.contexts: list[Any] = []

    def start(self, ctx: Any, scope: Any) -> None:
        return None

    def end(self, ctx: Any, scope: Any, token: Any) -> None:
        self.contexts.append(ctx)


# ---------------------------------------------------------------- a "|" in the default name


async def test_a_dependency_limit_named_by_a_route_with_a_bar_keeps_its_name_whole(
    clock: FakeClock,
) -> None:
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/items", dependencies=[Depends(fidelity.limit("5/min"))])
    async def items() -> dict[str, bool]:
        return {"ok": True}

    store = MemoryStore(rng=seeded_random(1))
    recorder = Recorder()
    policy = Policy(breaker=None, routes=[RouteConfig(match="/items", name="items|v2")])
    app.add_middleware(
        FidelityMiddleware,
        policy=policy,
        clock=clock,
        store=store,
        observer=recorder,
        telemetry=False,
    )
    fidelity.install(app)
    async with client(app) as c:
        answer = await c.get("/items")
    assert answer.status_code == 200
    name = "items%7Cv2:5/min"
    (decision,) = [d for d in recorder.contexts[0].decisions if d.layer == "ratelimit"]
    assert decision.subject == name
    assert answer.headers["ratelimit-policy"].startswith(f'"{name}";')
    (key,) = (await store.snapshot(clock.monotonic())).limiter_keys
    assert key.key.partition("|")[0] == name  # the state key splits where it should


# ---------------------------------------------------------------- the router's 405


def head_app(clock: FakeClock, charge: str = "served") -> FastAPI:
    app = FastAPI()

    @app.get("/items")
    async def items() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/own")
    async def own() -> Response:
        return Response(status_code=405)  # the endpoint's own answer

    policy = Policy(
        breaker=None,
        rate_limits=[RateLimit(name="reads", rate="2/min", methods=["GET"], charge=charge)],
    )
    app.add_middleware(
        FidelityMiddleware,
        policy=policy,
        clock=clock,
        store=MemoryStore(rng=seeded_random(1)),
        telemetry=False,
    )
    return app


async def test_the_routers_405_to_a_head_spends_no_served_quota(clock: FakeClock) -> None:
    app = head_app(clock)
    async with client(app) as c:
        heads = [(await c.head("/items")).status_code for _ in range(3)]
        gets = [(await c.get("/items")).status_code for _ in range(3)]
    assert heads == [405, 405, 405]  # FastAPI's router: no HEAD route
    assert gets == [200, 200, 429]  # the HEADs took nothing


async def test_the_routers_405_is_charged_by_an_always_limit(clock: FakeClock) -> None:
    app = head_app(clock, charge="always")
    async with client(app) as c:
        heads = [(await c.head("/items")).status_code for _ in range(3)]
    assert heads == [405, 405, 429]


async def test_an_endpoints_own_405_is_charged(clock: FakeClock) -> None:
    app = head_app(clock)
    async with client(app) as c:
        own = [(await c.get("/own")).status_code for _ in range(3)]
    assert own == [405, 405, 429]


async def test_starlette_serves_head_with_the_get_handler_and_charges_it(clock: FakeClock) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def items(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/items", items)])
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(breaker=None, rate_limits=[RateLimit(rate="2/min", methods=["GET"])]),
        clock=clock,
        telemetry=False,
    )
    async with client(app) as c:
        heads = [(await c.head("/items")).status_code for _ in range(3)]
    assert heads == [200, 200, 429]


# ---------------------------------------------------------------- an async key function


def test_an_async_key_function_for_the_middleware_is_refused_at_load() -> None:
    """The middleware calls `key(scope)` without awaiting: an async one keyed every
    request by its coroutine's text, a fresh counter each time (no limit at all)."""
    from fidelity_mw import PolicyError

    async def tenant(scope: Any) -> str:
        return "t1"

    with pytest.raises(PolicyError) as caught:
        RateLimit(rate="5/min", key=tenant)
    assert "coroutine function" in str(caught.value)
    assert RateLimit(rate="5/min", key=lambda scope: "t1").key is not None
