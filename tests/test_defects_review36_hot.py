"""The middleware's plans by method, then path (hot36): the engine's plans, found without a
tuple key per request, and the same plan a request got before for every method, root path
and host."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.testing import FakeClock


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _middleware(app: Any) -> FidelityMiddleware:
    while not isinstance(app, FidelityMiddleware):
        app = app.app
    return app


def test_alternating_methods_on_one_path_keep_their_own_limits() -> None:
    # a limit on POST alone: GET and POST to the same path, one after the other, each
    # with its own plan (the POST limit refuses the second POST, never a GET)
    app = Starlette(routes=[Route("/items", _ok, methods=["GET", "POST"])])
    policy = Policy(
        rate_limits=[
            RateLimit(name="writes", rate="1/s", burst=1, match="/items", methods=["POST"])
        ]
    )
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)

    async def run() -> list[tuple[str, int]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            got = []
            for method in ("GET", "POST", "GET", "POST", "GET"):
                response = await client.request(method, "/items")
                got.append((method, response.status_code))
            await client.get("/")  # build the middleware stack before looking at it
            return got

    got = asyncio.run(run())
    assert got == [("GET", 200), ("POST", 200), ("GET", 200), ("POST", 429), ("GET", 200)]
    middleware = _middleware(app.middleware_stack)
    kept = {
        m: {p: plan.limits for p, plan in paths.items()}
        for m, paths in middleware._by_method.items()
    }
    assert [lim.name for lim in kept["POST"]["/items"]] == ["writes"]
    assert kept["GET"]["/items"] == ()
    # the very plans the engine keeps by (method, path)
    engine_plans = middleware.engine._plans
    for method, paths in middleware._by_method.items():
        for path, plan in paths.items():
            assert engine_plans[(method, path)] is plan


def test_host_routed_plans_are_never_kept_by_path() -> None:
    # two hosts, one path: each host's own limit; the middleware keeps neither by path
    # (the engine keeps them by host)
    app = Starlette(
        routes=[
            Host("a.example", Starlette(routes=[Route("/x", _ok, name="a")])),
            Host("b.example", Starlette(routes=[Route("/x", _ok, name="b")])),
        ]
    )
    policy = Policy(rate_limits=[RateLimit(name="per-client", rate="100/s", match="/x")])
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        codes = []
        async with httpx.AsyncClient(transport=transport) as client:
            for host in ("a.example", "b.example", "a.example", "b.example"):
                codes.append((await client.get(f"http://{host}/x")).status_code)
        return codes

    assert asyncio.run(run()) == [200, 200, 200, 200]
    middleware = _middleware(app.middleware_stack)
    assert not any(middleware._by_method.values())
