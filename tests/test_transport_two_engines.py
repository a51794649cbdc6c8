"""A transport used both inside requests (the middleware's engine) and outside them (its
own): each engine's upstream plans keep what they learned across the switches."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport
from fidelity_mw.admin.view import balancers
from fidelity_mw.engine import Engine
from fidelity_mw.policy import Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

INSTANCES = ("http://10.0.0.1:8001", "http://10.0.0.2:8002", "http://10.0.0.3:8003")
SLOW = "10.0.0.1:8001"


def _policy() -> Policy:
    cfg = UpstreamConfig(host="payments", instances=INSTANCES, retry=RetryConfig(attempts=1))
    return Policy(upstreams=(cfg,))


async def test_switching_engines_keeps_each_engines_balancer_knowledge() -> None:
    """Calls alternating between inside and outside requests rebuilt the host's plan on
    every switch: the balancer forgot each instance's latency (and in-flight count, and a
    429 pause) and sent the next call to the slow instance as to an unmeasured one."""
    clock = FakeClock()
    seen: list[tuple[bool, str]] = []
    inside = [False]

    def fleet(request: httpx.Request) -> httpx.Response:
        key = f"{request.url.host}:{request.url.port}"
        seen.append((inside[0], key))
        # (the fast instances answer calls from outside requests a little slower: the
        # two engines' plans learn different latencies)
        clock.advance(2.0 if key == SLOW else 0.01 if inside[0] else 0.02)
        return httpx.Response(200)

    transport = FidelityTransport(
        httpx.MockTransport(fleet),
        engine=Engine(_policy(), clock=clock, rng=seeded_random(3), store=MemoryStore()),
        telemetry=False,
    )
    client = httpx.AsyncClient(transport=transport)

    async def handler(request: Request) -> PlainTextResponse:
        inside[0] = True
        try:
            response = await client.get("http://payments/pay")
        finally:
            inside[0] = False
        return PlainTextResponse(str(response.status_code))

    app = FidelityMiddleware(
        Starlette(routes=[Route("/", handler)]),
        policy=_policy(),
        clock=clock,
        rng=seeded_random(5),
        telemetry=False,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://svc"
    ) as front:
        for _ in range(40):
            assert (await front.get("/")).text == "200"
            assert (await client.get("http://payments/pay")).status_code == 200
    await client.aclose()
    # each engine tries each instance (the slow one too) while it learns, then avoids it
    slow = Counter(where for where, key in seen if key == SLOW)
    assert slow[True] <= 3
    assert slow[False] <= 3
    # the middleware's admin view shows its own plan's instances (parked: the last call
    # was outside a request), not the transport's own engine's
    (plan,) = transport._upstreams.values()
    assert plan.policy is transport.engine.policy
    assert plan.parked is not None
    assert plan.parked.policy is app.engine.policy
    rows, _ = balancers(app.engine, clock.monotonic())
    inside = {i.key: i.latency_s for i in plan.parked.instances or ()}
    assert {r["instance"]: r["latency_ms"] for r in rows} == {
        key: round(latency * 1000.0, 3) for key, latency in inside.items()
    }
    assert inside != {i.key: i.latency_s for i in plan.instances or ()}


async def test_a_host_keeps_at_most_one_parked_plan() -> None:
    """Policies that come and go (a reloaded policy is a new object each time) must not
    chain plans: the table holds each host's current plan and at most one earlier one."""
    clock = FakeClock()
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(200)),
        engine=Engine(_policy(), clock=clock, rng=seeded_random(3), store=MemoryStore()),
        telemetry=False,
    )
    engines = [
        Engine(_policy(), clock=clock, rng=seeded_random(n), store=MemoryStore()) for n in range(5)
    ]
    url = httpx.URL("http://payments/pay")
    plans = {id(e): transport.upstream(e, url) for e in engines}  # one each, in turn
    assert len(set(map(id, plans.values()))) == 5
    for engine in [engines[3], engines[4], engines[3], engines[4]]:
        up = transport.upstream(engine, url)
        assert up.policy is engine.policy
        chain, parked = 0, up.parked
        while parked is not None:
            chain, parked = chain + 1, parked.parked
        assert chain == 1
    # 3 and 4 alternated on their own plans; 3's was parked while 4 ran, and back
    assert transport.upstream(engines[3], url) is plans[id(engines[3])]
    assert transport.upstream(engines[4], url) is plans[id(engines[4])]
