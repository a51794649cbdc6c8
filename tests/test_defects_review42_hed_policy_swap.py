"""Review 42 (hed42): a policy swapped in (`engine.policy = X`), and two engines on one Policy.

rev41 left them: the engine cached its route plans (and what it read of the policy once:
trusted proxies, the limits and routes that name HEAD) and the middleware its own (its
plans by method, the request reader, the admission's header fields, the bulkheads' and
websockets' readers), so a limit or a route `scope` swapped in took effect only after a
restart, while the transports took the new policy at their next call (documented for
`failure_penalty`). Now the swap takes effect everywhere on the next request
(`Engine.policy_swapped`); the state store stays the one built.

And the transports kept one upstream plan per host and policy, so two engines sharing
one Policy object (a transport's own and a middleware's, both built from one
`Policy.from_toml`) shared a plan: what the balancer learned under one engine (an
instance's failures, its latency, calls in flight) steered the other engine's calls.
Plans are now marked with the engine they were built for (`Engine.plan_mark`).
"""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport
from fidelity_mw.engine import Engine
from fidelity_mw.policy import (
    BreakerConfig,
    ConcurrencyConfig,
    Policy,
    RateLimit,
    RetryConfig,
    RouteConfig,
    UpstreamConfig,
)
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def _app(policy: Policy, clock: FakeClock) -> FidelityMiddleware:
    app = Starlette(routes=[Route("/x", _ok), Route("/y", _ok)])
    return FidelityMiddleware(app, policy=policy, clock=clock, telemetry=False)


async def _statuses(app: FidelityMiddleware, path: str, n: int) -> list[int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return [(await client.get(path)).status_code for _ in range(n)]


async def test_a_limit_swapped_in_applies_to_the_next_request() -> None:
    clock = FakeClock()
    app = _app(Policy(), clock)
    assert await _statuses(app, "/x", 3) == [200] * 3  # the route's plan is cached now
    app.engine.policy = Policy(rate_limits=(RateLimit(name="tight", rate="2/minute"),))
    assert await _statuses(app, "/x", 3) == [200, 200, 429]
    # and swapped out again: no limit
    app.engine.policy = Policy()
    assert await _statuses(app, "/x", 3) == [200] * 3


async def test_a_route_breakers_scope_swapped_in_is_the_plans() -> None:
    clock = FakeClock()
    route = RouteConfig(match="/x", breaker=BreakerConfig())
    app = _app(Policy(routes=(route,)), clock)
    await _statuses(app, "/x", 1)
    before = app.engine.plan_for({"type": "http", "method": "GET", "path": "/x"})
    app.engine.policy = Policy(
        routes=(RouteConfig(match="/x", breaker=BreakerConfig(scope="process")),)
    )
    await _statuses(app, "/x", 1)
    after = app.engine.plan_for({"type": "http", "method": "GET", "path": "/x"})
    assert after is not before
    assert before.breaker is not None
    assert after.breaker is not None
    assert (before.breaker.scope, after.breaker.scope) == ("fleet", "process")


async def test_a_bulkhead_changed_by_a_swap_is_a_new_one_an_unchanged_one_stays() -> None:
    clock = FakeClock()
    routes = (RouteConfig(match="/x", concurrency=ConcurrencyConfig(limit=1)),)
    app = _app(Policy(routes=routes), clock)
    await _statuses(app, "/x", 1)
    first = app.engine.bulkheads["/x"]
    app.engine.policy = Policy(routes=routes, rate_limits=(RateLimit(rate="100/s"),))
    await _statuses(app, "/x", 1)
    assert app.engine.bulkheads["/x"] is first  # its settings unchanged: the same one
    wider = (RouteConfig(match="/x", concurrency=ConcurrencyConfig(limit=5)),)
    app.engine.policy = Policy(routes=wider)
    await _statuses(app, "/x", 1)
    assert app.engine.bulkheads["/x"] is not first
    assert app.engine.bulkheads["/x"].spec.limit == 5


def test_a_swap_to_something_not_a_policy_is_refused() -> None:
    engine = Engine(Policy())
    with pytest.raises(TypeError, match="Policy"):
        engine.policy = "fidelity.toml"  # type: ignore[assignment]


# ---------------------------------------------------------------- two engines, one Policy

INSTANCES = ("http://10.0.0.1:8001", "http://10.0.0.2:8002")
BAD = "10.0.0.1:8001"


class Net:
    """Two instances; the first answers 500 while `failing`."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.failing = True

    def __call__(self, request: httpx.Request) -> httpx.Response:
        key = f"{request.url.host}:{request.url.port}"
        self.seen.append(key)
        return httpx.Response(500 if key == BAD and self.failing else 200)


async def test_two_engines_sharing_one_policy_keep_their_own_plans() -> None:
    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="payments",
                instances=INSTANCES,
                retry=RetryConfig(attempts=1),
                breaker=None,
            ),
        )
    )
    clock = FakeClock()
    own = Engine(policy, clock=clock, rng=seeded_random(5), store=MemoryStore())
    net = Net()
    transport = FidelityTransport(httpx.MockTransport(net), engine=own, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        # the transport's own engine: the first instance fails, and the balancer
        # weighs it up for a while (its failure penalty)
        for _ in range(10):
            await client.get("http://payments/pay")
        assert BAD in net.seen
        net.failing = False
        net.seen.clear()

        async def handler(request: Request) -> Response:
            for _ in range(20):
                await client.get("http://payments/pay")
            return PlainTextResponse("ok")

        # another engine on the same Policy object (its own store, the same clock):
        # its calls know nothing of what the first engine's calls saw
        app = FidelityMiddleware(
            Starlette(routes=[Route("/h", handler)]),
            policy=policy,
            clock=clock,
            rng=seeded_random(5),
            store=MemoryStore(),
            telemetry=False,
        )
        assert app.engine is not own
        assert app.engine.policy is own.policy
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as inbound:
            assert (await inbound.get("/h")).status_code == 200
    # the middleware engine's calls spread over both instances: no failure was seen there
    print(f"\nto the instance that failed under the other engine: {net.seen.count(BAD)} of 20")
    assert net.seen.count(BAD) >= 4, net.seen
    plan = transport._upstreams[("payments", None)]
    assert plan.mark is app.engine.plan_mark
    parked = plan.parked
    assert parked is not None
    assert parked.mark is own.plan_mark
