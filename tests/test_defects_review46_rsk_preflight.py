"""Review 46 (rsk46), CORS preflights and our answers through the app's CORS layer.

- A preflight was looked up as OPTIONS: an endpoint's `@fidelity.deadline` /
  `@fidelity.breaker`, or a `[[route]]` entry with `methods = ["GET"]`, names the GET
  route, so the preflight for that GET got the policy's defaults on the route's name (a
  30 s deadline for the route's 1.5 s: in a full queue it waited 30 s, where the call
  it asks for is cut at 1.5 s). Now it is the route's for the method it asks about
  (`Access-Control-Request-Method`), as docs/inbound.md says ("the route's breaker,
  bulkhead and deadline apply to preflights as to any request").
- An `on_reject` hook's own `Vary` replaced the CORS layer's `Vary: Origin`: a cache
  kept one origin's refusal (its `Access-Control-Allow-Origin`) for every origin.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from fidelity_mw import BreakerConfig, FidelityMiddleware, Policy, RateLimit
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.policy import ConcurrencyConfig
from fidelity_mw.testing import FakeClock

UI = "https://ui.example"
PREFLIGHT = {"origin": UI, "access-control-request-method": "GET"}


def _send(app: Any, requests: list[tuple[str, str, dict[str, str]]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return [
                await client.request(method, path, headers=headers)
                for method, path, headers in requests
            ]

    return asyncio.run(run())


class Captured:
    """The middleware, keeping each request's decision context."""

    def __init__(self, mw: FidelityMiddleware) -> None:
        self.mw = mw
        self.contexts: list[Any] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.mw(scope, receive, send)
        if scope["type"] == "http":
            self.contexts.append(scope["state"]["fidelity"])


def _app(policy: Policy, *, limits: bool) -> tuple[Captured, FidelityMiddleware]:
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/x")
    @fidelity.deadline(1500)
    @fidelity.breaker(min_calls=7)
    async def x() -> dict[str, int]:
        return {}

    app.add_middleware(CORSMiddleware, allow_origins=[UI])
    if limits:
        policy = Policy(
            rate_limits=(RateLimit(name="one", rate="1/min"),),
            routes=policy.routes,
            concurrency=policy.concurrency,
        )
    mw = FidelityMiddleware(app, policy=policy, clock=FakeClock(), telemetry=False)
    return Captured(mw), mw


@pytest.mark.parametrize("limits", [False, True], ids=["no-limits", "limited-route"])
def test_a_preflight_gets_the_endpoint_overrides_of_the_route_it_asks_for(limits: bool) -> None:
    """Old code: the preflight's deadline was the policy's 30 s and its breaker the
    policy.s (min_calls 20), on the GET route's name."""
    app, mw = _app(Policy(), limits=limits)
    pre, served = _send(app, [("OPTIONS", "/x", PREFLIGHT), ("GET", "/x", {"origin": UI})])
    assert pre.status_code == 200
    assert served.status_code == 200  # the preflight cost nothing
    pre_ctx, get_ctx = app.contexts
    assert pre_ctx.route == get_ctx.route == "/x"
    assert pre_ctx.deadline_at - pre_ctx.started_at == pytest.approx(1.5)
    assert get_ctx.deadline_at - get_ctx.started_at == pytest.approx(1.5)
    scope = {
        "type": "http",
        "method": "OPTIONS",
        "path": "/x",
        "root_path": "",
        "headers": [(b"origin", UI.encode()), (b"access-control-request-method", b"GET")],
    }
    plan = mw.engine.preflight_plan_for(scope)
    assert isinstance(plan.breaker, BreakerConfig)
    assert plan.breaker.min_calls == 7
    assert plan.limits == ()


def test_a_preflight_gets_the_route_entry_that_names_the_asked_method() -> None:
    policy = Policy.from_dict(
        {"route": [{"match": "/x", "methods": ["GET"], "deadline_ms": 900, "name": "items"}]}
    )
    app, _ = _app(policy, limits=False)
    _send(app, [("OPTIONS", "/x", PREFLIGHT), ("GET", "/x", {"origin": UI})])
    pre_ctx, get_ctx = app.contexts
    # the entry's name for both, the endpoint's deadline over the entry's (old: the
    # preflight's route "/x", another breaker and bulkhead than its GET's)
    assert pre_ctx.route == get_ctx.route == "items"
    assert pre_ctx.deadline_at - pre_ctx.started_at == pytest.approx(1.5)


def test_a_preflight_asking_for_another_method_is_not_given_the_gets_route() -> None:
    """A preflight for a method no route of the path serves, or an odd token: no
    endpoint's override (and a plan per usual method only)."""
    app, mw = _app(Policy(), limits=False)
    asks = ["DELETE", "FROB", "get"]
    _send(
        app, [("OPTIONS", "/x", {"origin": UI, "access-control-request-method": m}) for m in asks]
    )
    deadlines = [ctx.deadline_at - ctx.started_at for ctx in app.contexts]
    assert deadlines[0] == pytest.approx(30.0)
    assert deadlines[1] == pytest.approx(30.0)
    assert deadlines[2] == pytest.approx(1.5)  # (the Fetch standard upper-cases `get`)
    asked = sorted(method for method, _ in mw.engine._plans if "preflight" in method)
    assert asked == ["OPTIONS preflight ", "OPTIONS preflight DELETE", "OPTIONS preflight GET"]


def test_a_queued_preflight_waits_no_longer_than_the_routes_deadline() -> None:
    """In a full queue the preflight waited out the queue timeout (10 s here, its own
    deadline 30 s) where the GET it asks for is cut at 1.5 s: now it is answered 504
    once the route's 1.5 s pass, as the GET would be."""
    fidelity = Fidelity()
    app = FastAPI()
    clock = FakeClock()
    release = asyncio.Event()

    @app.get("/x")
    @fidelity.deadline(1500)
    async def x() -> dict[str, int]:
        return {}

    @app.post("/x")  # (the same route "/x", its bulkhead; the policy's 30 s deadline)
    async def hold() -> dict[str, int]:
        await release.wait()
        return {}

    app.add_middleware(CORSMiddleware, allow_origins=[UI])
    policy = Policy(
        concurrency=ConcurrencyConfig(limit=1, max_queue=2, queue_timeout_ms=10_000),
        breaker=None,
    )
    mw = FidelityMiddleware(app, policy=policy, clock=clock, telemetry=False)

    async def run() -> tuple[int, int]:
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            held = asyncio.ensure_future(client.post("/x"))
            for _ in range(50):
                await asyncio.sleep(0)
            pre = asyncio.ensure_future(client.options("/x", headers=PREFLIGHT))
            [limiter] = mw.engine.bulkheads.values()
            for _ in range(200):
                await asyncio.sleep(0)
                if limiter.waiting:
                    break
            assert limiter.waiting == 1
            clock.advance(2.0)
            for _ in range(500):
                await asyncio.sleep(0)
                if pre.done():
                    break
            done = pre.done()
            release.set()
            answered = await pre
            first = await held
            assert done, "the preflight still waited 2 s after the route's 1.5 s deadline"
            return answered.status_code, first.status_code

    assert asyncio.run(run()) == (504, 200)


def test_an_on_reject_hooks_vary_is_merged_with_the_cors_layers() -> None:
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, int]:
        return {}

    def hook(ctx: Any, decision: Any) -> JSONResponse:
        return JSONResponse({"quota": True}, status_code=429, headers={"vary": "Accept"})

    app.add_middleware(CORSMiddleware, allow_origins=[UI, "https://b.example"])
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(rate_limits=(RateLimit(name="one", rate="1/min"),)),
        clock=FakeClock(),
        telemetry=False,
        on_reject=hook,
    )
    _, refused = _send(app, [("GET", "/", {"origin": UI}), ("GET", "/", {"origin": UI})])
    assert refused.status_code == 429
    assert refused.headers["access-control-allow-origin"] == UI
    # old: ["Accept"] alone
    assert refused.headers.get_list("vary") == ["Accept, Origin"]
