"""Coordination across the inbound and outbound layers of one request.

A request that an outbound control layer refused before anything was sent (the
host breaker is open) and that the app then fails is that layer's decision:
the route breaker does not count it, and the client's rate-limit units are
given back. A real upstream failure is the host breaker's evidence, not the
route breaker's.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import (
    BreakerConfig,
    CircuitOpen,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RetryConfig,
    UpstreamConfig,
    current,
)
from fidelity_mw.decide.breaker import CLOSED, OPEN
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

HOST_BREAKER = BreakerConfig(consecutive_failures=1, open_s=60.0)
POLICY = Policy(
    rate_limits=(RateLimit(name="per-client", rate="3/s", burst=3),),
    breaker=BreakerConfig(consecutive_failures=1, open_s=60.0),
    upstreams=(
        UpstreamConfig(host="api.internal", retry=RetryConfig(attempts=1), breaker=HOST_BREAKER),
    ),
)


class Rig:
    def __init__(self, *, catch: bool) -> None:
        self.clock = FakeClock()
        self.upstream_calls = 0
        self.upstream_status = 200
        self.contexts: list[Any] = []

        def upstream(request: httpx.Request) -> httpx.Response:
            self.upstream_calls += 1
            return httpx.Response(self.upstream_status)

        client = httpx.AsyncClient(
            transport=FidelityTransport(httpx.MockTransport(upstream), telemetry=False)
        )

        async def quote(request: Request) -> Response:
            self.contexts.append(current())
            try:
                answer = await client.get("http://api.internal/quote")
            except CircuitOpen:
                if not catch:
                    raise
                return PlainTextResponse("upstream unavailable", status_code=503)
            return PlainTextResponse(
                "ok" if answer.is_success else "bad",
                status_code=(200 if answer.is_success else 502),
            )

        self.app = Starlette(routes=[Route("/quote", quote)])
        self.app.add_middleware(
            FidelityMiddleware,
            policy=POLICY,
            clock=self.clock,
            rng=seeded_random(5),
            telemetry=False,
        )
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
            base_url="http://front",
        )

    @property
    def store(self) -> MemoryStore:
        store = self.contexts[-1].engine.store
        assert isinstance(store, MemoryStore)
        return store

    def open_host_breaker(self) -> None:
        self.store.breaker_state("upstream:api.internal", HOST_BREAKER).force(
            OPEN, self.clock.monotonic(), seeded_random(1)
        )

    def route_breaker(self) -> str:
        return self.store.breakers["route:/quote"].state

    async def get(self) -> int:
        return (await self.http.get("/quote")).status_code


# Uncaught, the CircuitOpen is answered by the middleware as a 503 too (not a 500).
@pytest.mark.parametrize(("catch", "status"), [(True, 503), (False, 503)])
async def test_outbound_shed_costs_no_quota_and_is_no_route_failure(
    catch: bool, status: int
) -> None:
    rig = Rig(catch=catch)
    assert await rig.get() == 200  # one real call: the store and the breakers exist
    rig.open_host_breaker()
    # burst 3, one unit already used: without refunds the 3rd of these would be a 429
    statuses = [await rig.get() for _ in range(6)]
    assert statuses == [status] * 6
    assert rig.upstream_calls == 1  # the host breaker refused every call before sending
    assert rig.route_breaker() == CLOSED  # consecutive_failures=1, yet nothing counted
    ctx = rig.contexts[-1]
    assert ctx.decided_by == "breaker"
    assert ctx.outcome == "shed"
    refused = [d for d in ctx.decisions if d.layer == "breaker" and d.verdict == "reject"]
    assert [d.subject for d in refused] == ["api.internal"]


async def test_a_real_upstream_failure_is_its_host_breakers_evidence() -> None:
    rig = Rig(catch=True)
    assert await rig.get() == 200
    rig.upstream_status = 503  # the upstream answers: real evidence
    assert await rig.get() == 502
    assert rig.upstream_calls == 2
    # counted by the host breaker, which owns it; not a second time by the route breaker
    # (review 38: tests/test_defects_review38_hops.py; with `breaker = false` on the
    # upstream the route breaker counts it)
    assert rig.route_breaker() == CLOSED
    assert rig.contexts[-1].decided_by == "app"
    assert rig.contexts[-1].outcome == "failed"


async def test_quota_spent_by_served_requests_is_not_refunded() -> None:
    rig = Rig(catch=True)
    statuses = [await rig.get() for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]


# ---------------------------------------------------------------- outbound policy options


async def test_shared_budget_is_one_budget_for_all_instances() -> None:
    """Two instance URLs of one service: retries drawn on one are gone for the other."""
    retry = RetryConfig(
        attempts=3, base_ms=1, budget_ratio=0.0, budget_min_per_s=0.2, budget_window_s=10.0
    )  # 2 retries per 10 s for the whole budget

    def policy(shared: bool) -> Policy:
        return Policy(
            upstreams=(
                UpstreamConfig(host="up-*", retry=retry, breaker=None, shared_budget=shared),
            )
        )

    async def retries_granted(shared: bool) -> int:
        transport = FidelityTransport(
            httpx.MockTransport(lambda request: httpx.Response(503)),
            policy=policy(shared),
            clock=FakeClock(),
            telemetry=False,
        )
        granted = 0
        async with httpx.AsyncClient(transport=transport) as client:
            for host in ("up-a", "up-b"):
                response = await client.get(f"http://{host}/x")
                ctx = response.extensions["fidelity_context"]
                granted += sum(1 for d in ctx.decisions if d.verdict == "retry")
        return granted

    assert await retries_granted(shared=False) == 4  # 2 per instance
    assert await retries_granted(shared=True) == 2  # 2 for the service


async def test_slow_calls_count_for_the_host_breaker() -> None:
    clock = FakeClock()
    breaker = BreakerConfig(min_calls=2, slow_call_ms=500, slow_call_ratio=1.0, open_s=30.0)

    def slow_upstream(request: httpx.Request) -> httpx.Response:
        clock.advance(0.6)  # each answer takes 600 ms
        return httpx.Response(200)

    transport = FidelityTransport(
        httpx.MockTransport(slow_upstream),
        policy=Policy(upstreams=(UpstreamConfig(host="slow.internal", breaker=breaker),)),
        clock=clock,
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get("http://slow.internal/")).status_code == 200
        assert (await client.get("http://slow.internal/")).status_code == 200
        with pytest.raises(CircuitOpen):  # two slow calls of two: open
            await client.get("http://slow.internal/")


async def test_circuit_open_says_how_many_attempts_went_out() -> None:
    breaker = BreakerConfig(min_calls=100, open_s=30.0)  # our own failures will not open it

    class OthersOpenItMeanwhile(MemoryStore):
        def outbound_gate_now(self, *args: Any) -> Any:
            if args[4]:  # between our attempts, other requests trip it
                self.breaker_state("upstream:api.internal", breaker).force(
                    OPEN, args[5], seeded_random(2)
                )
            return super().outbound_gate_now(*args)

    store = OthersOpenItMeanwhile(rng=seeded_random(1))
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(503)),
        policy=Policy(
            upstreams=(
                UpstreamConfig(
                    host="api.internal", retry=RetryConfig(attempts=3, base_ms=1), breaker=breaker
                ),
            )
        ),
        clock=FakeClock(),
        store=store,
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(CircuitOpen) as mid_retry:
            await client.get("http://api.internal/")
        assert mid_retry.value.attempts_made == 1
        with pytest.raises(CircuitOpen) as before:  # still open: nothing is sent
            await client.get("http://api.internal/")
        assert before.value.attempts_made == 0
