"""Review 42 (hed42): a hedged call's retry while its hedge is still out.

flt41 found on the real chain (tests/test_defects_review41_flt_hops_hedge.py): when the
call's first attempt fails while its hedge is out to the only instance left, the retry
went to that same instance, which then did the request's work twice at once (C2 took
31-32 calls for 16 requests). Envoy's previous-hosts predicate gives way to a tried host
when no other is left; with the call's own hedge still out to it, the retry now waits for
that hedge's answer instead: a good one ends the call (no third request), a failure lets
the retry be decided again, knowing it.

The upstream is an httpx.MockTransport whose handlers block on events (two real tasks
race); the hedge delay and the backoffs run on a FakeClock.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityTransport
from fidelity_mw.context import DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.policy import HedgeConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

C0, C1, C2 = "10.0.0.1:8001", "10.0.0.2:8002", "10.0.0.3:8003"
TICKS = 200  # event-loop turns the old code needed (a few) to send its duplicate retry


class Upstream:
    """The first attempt (to the instance that looks fastest) hangs until the hedge is out,
    then answers 503; the hedge hangs until the first attempt's failure had its chance to
    be retried, then answers `hedge_status`; any later attempt answers `later_status`."""

    def __init__(self, hedge_status: int = 200, later_status: int = 200) -> None:
        self.seen: list[str] = []
        self.hedge_status = hedge_status
        self.later_status = later_status
        self.hedge_out = asyncio.Event()
        self.events: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        where = f"{request.url.host}:{request.url.port}"
        self.seen.append(where)
        n = len(self.seen)
        if n == 1:
            await self.hedge_out.wait()
            self.events.append("first failed")
            return httpx.Response(503)
        if n == 2:
            self.hedge_out.set()
            for _ in range(TICKS):  # the first attempt fails meanwhile, and is retried (or not)
                await asyncio.sleep(0)
            self.events.append(f"hedge answered {self.hedge_status}")
            return httpx.Response(self.hedge_status)
        self.events.append(f"attempt {n} to {where}")
        return httpx.Response(self.later_status)


def transport(upstream: Any, instances: tuple[str, ...]) -> FidelityTransport:
    clock = FakeClock()
    cfg = UpstreamConfig(
        host="svc",
        instances=tuple(f"http://{i}" for i in instances),
        retry=RetryConfig(attempts=3, base_ms=1, max_ms=2),
        hedge=HedgeConfig(after_ms=50),
    )
    engine = Engine(
        Policy(upstreams=(cfg,)), clock=clock, rng=seeded_random(3), store=MemoryStore()
    )
    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    # The first instance looks much the fastest: the first attempt goes there.
    found = t.upstream(engine, httpx.URL("http://svc/")).instances or []
    for n, instance in enumerate(found):
        instance.latency_s = 0.001 if n == 0 else 0.5
        instance.latency_at = clock.monotonic()
    return t


def context(response: httpx.Response) -> DecisionContext:
    ctx = response.extensions["fidelity_context"]
    assert isinstance(ctx, DecisionContext)
    return ctx


def outstanding(t: FidelityTransport) -> list[int]:
    return [i.outstanding for i in t.upstream(t.engine, httpx.URL("http://svc/")).instances or []]


async def test_the_retry_waits_for_the_hedge_to_the_last_instance_and_the_hedge_wins() -> None:
    upstream = Upstream(hedge_status=200)
    t = transport(upstream, (C0, C1))
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://svc/x")
    assert response.status_code == 200
    # one request each: no duplicate to the instance the hedge was at work on
    assert upstream.seen == [C0, C1], upstream.seen
    ctx = context(response)
    waits = [d for d in ctx.decisions if d.verdict == "wait"]
    assert [(d.layer, d.reason, d.details["waiting"]) for d in waits] == [
        ("retry", "hedge_in_flight", 1)
    ]
    # no retry was decided, so none was counted on the budget, nor given back
    assert not [d for d in ctx.decisions if d.verdict in ("retry", "refund")], ctx.decisions
    assert ctx.attempts["svc"] == 2
    assert outstanding(t) == [0, 0]


async def test_when_the_hedge_fails_too_the_retry_goes_out_after_its_answer() -> None:
    upstream = Upstream(hedge_status=503, later_status=200)
    t = transport(upstream, (C0, C1))
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://svc/x")
    assert response.status_code == 200
    assert len(upstream.seen) == 3, upstream.seen
    # the retry only after the hedge answered: never two requests to one instance at once
    assert upstream.events[:2] == ["first failed", "hedge answered 503"], upstream.events
    ctx = context(response)
    assert [d.verdict for d in ctx.decisions if d.layer == "retry"] == [
        "allow",
        "hedge",
        "wait",
        "retry",
    ]
    assert ctx.attempts["svc"] == 3
    assert outstanding(t) == [0, 0]


async def test_with_an_instance_not_tried_the_retry_goes_there_at_once() -> None:
    # Envoy's previous-hosts predicate: another instance is left, no reason to wait.
    upstream = Upstream(hedge_status=200)
    t = transport(upstream, (C0, C1, C2))
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://svc/x")
    assert response.status_code == 200
    first, hedge, retry = upstream.seen
    assert first == C0, upstream.seen
    assert {hedge, retry} == {C1, C2}, upstream.seen
    ctx = context(response)
    assert not [d for d in ctx.decisions if d.verdict == "wait"]
    assert outstanding(t) == [0, 0, 0]


async def test_a_call_cancelled_while_its_retry_waits_leaves_nothing_taken() -> None:
    upstream = Upstream(hedge_status=200)
    t = transport(upstream, (C0, C1))
    async with httpx.AsyncClient(transport=t) as client:
        task = asyncio.ensure_future(client.get("http://svc/x"))
        await upstream.hedge_out.wait()
        for _ in range(40):  # the first failed, its retry waits (the hedge holds its answer)
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert upstream.seen == [C0, C1]
    assert outstanding(t) == [0, 0]
