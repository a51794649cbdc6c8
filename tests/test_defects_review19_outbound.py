"""Outbound defects left alone by the last review, and a 429/503's Retry-After scoped to
the instance that sent it (out19): each test failed before its fix."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy, current
from fidelity_mw.context import DecisionContext
from fidelity_mw.policy import (
    DeadlineConfig,
    HedgeConfig,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

# (`record_now` stays: the middleware's route breakers need it; without a gate of its own
# the transport finds no in-process operations)
_IN_PROCESS = frozenset(
    ("outbound_gate_now", "outbound_begin_now", "breakers_open_until_now", "budget_refund_now")
)


class Remote:
    """A memory store without its in-process outbound operations (as Redis is): the loop
    awaits every gate and record. `hold(args)` runs before a gate when set (the reply is late)."""

    def __init__(self, hold: Callable[[tuple[Any, ...]], Awaitable[None]] | None = None) -> None:
        self.inner = MemoryStore()
        self.hold = hold

    def __getattr__(self, name: str) -> Any:
        if name in _IN_PROCESS:
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def outbound_gate(self, *args: Any) -> Any:
        if self.hold is not None:
            await self.hold(args)
        return await self.inner.outbound_gate(*args)


# ------------------------------------- 1. a hedged call and another call at once


def _gather_app(
    store: Any, budget: RetryConfig, b_done: asyncio.Event
) -> tuple[Starlette, list[Any]]:
    """One request makes two calls at once (`asyncio.gather`): a hedged call to `svc`,
    whose attempts answer 200 once the other call is over, and a call to `down`, which
    fails to connect every time: retried, given up (`attempts`), its error let out of
    the app (the middleware answers it 502, marked exhausted)."""
    seen: list[Any] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down":
            raise httpx.ConnectError("refused", request=request)
        await b_done.wait()
        for _ in range(5):  # (the hedge's gate, answered, is acted on first)
            await asyncio.sleep(0)
        return httpx.Response(200)

    outbound = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(upstream)))

    async def call_down() -> httpx.Response:
        try:
            return await outbound.get("http://down/x")
        finally:
            b_done.set()

    async def handler(request: Request) -> Response:
        seen.append(current())
        results = await asyncio.gather(
            outbound.get("http://svc/x"), call_down(), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return PlainTextResponse("not reached")

    app = Starlette(routes=[Route("/", handler)])
    policy = Policy(
        deadline=DeadlineConfig(default_ms=5000),
        upstreams=(
            UpstreamConfig(host="svc", retry=budget, hedge=HedgeConfig(after_ms=50)),
            UpstreamConfig(host="down", retry=RetryConfig(attempts=3, base_ms=1, max_ms=1)),
        ),
    )
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=FakeClock(), store=store, telemetry=False
    )
    return app, seen


async def _answer(app: Starlette) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get("/")


def _the_other_calls_give_up_stands(response: httpx.Response, ctx: DecisionContext) -> None:
    assert ctx.upstream_exhausted is True
    give_ups = [(d.subject, d.layer, d.reason) for d in ctx.decisions if d.verdict == "give_up"]
    assert ("down", "retry", "attempts") in give_ups
    assert response.status_code == 502
    assert response.headers["x-fidelity-retry"] == "exhausted"


async def test_a_refused_hedge_on_a_remote_store_keeps_another_calls_records() -> None:
    """Before: the hedge's gate marked the request's records, awaited the store, and on
    the budget's refusal deleted every record after the mark and set the flags back:
    the other call's give-up, recorded while the gate was in flight, went with them,
    and its connect error escaped the app as a bare 500 (no `exhausted` marker)."""
    b_done = asyncio.Event()

    async def hold(args: tuple[Any, ...]) -> None:
        if args[4] and args[2] == "budget:svc":  # the hedge's gate: answered late
            await b_done.wait()

    store = Remote(hold)
    # no retry (so no hedge) in svc's budget: the hedge is refused
    no_budget = RetryConfig(attempts=3, base_ms=1, max_ms=1, budget_ratio=0.0, budget_min_per_s=0.0)
    app, seen = _gather_app(store, no_budget, b_done)
    response = await _answer(app)
    ctx = seen[0]
    refused = [d for d in ctx.decisions if d.reason == "no_hedge"]
    assert [(d.layer, d.details["why"]) for d in refused] == [("budget", "budget")]
    _the_other_calls_give_up_stands(response, ctx)


async def test_a_hedged_calls_good_answer_keeps_another_calls_exhausted_flag() -> None:
    """Before: a hedged call ended by a good answer set the request's flags back to what
    they were when it began, taking the mark of a call that gave up meanwhile."""
    b_done = asyncio.Event()
    budget = RetryConfig(attempts=3, base_ms=1, max_ms=1)
    app, seen = _gather_app(MemoryStore(), budget, b_done)
    response = await _answer(app)
    ctx = seen[0]
    assert any(d.verdict == "hedge" for d in ctx.decisions)  # raced, and answered well
    _the_other_calls_give_up_stands(response, ctx)
