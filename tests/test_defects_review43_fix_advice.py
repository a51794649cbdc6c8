"""Review 43 (fix43): the advice after a retry's `breaker_open` give-up.

dis42 noticed: when an outbound retry gives up because the breakers of the instances
left are open, the hint (the `Retry-After` our answer carries) was the breakers' earliest
reopening alone; the `Retry-After` of the answer it was about to retry was dropped (a
budget give-up kept it). With the instance asking 9 s, the caller was told ~4 s, and came
back while nothing could serve it.

One rule now for every give-up (outbound.md, "`Retry-After` after a give-up"): never
before the `Retry-After` of the answer given up on (the one the caller is answered with:
the budget's rule, review 40), the breakers' and pauses' waits as before.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from fidelity_mw import FidelityMiddleware, FidelityTransport
from fidelity_mw.context import Decision, DecisionContext
from fidelity_mw.decide.breaker import OPEN
from fidelity_mw.engine import Engine
from fidelity_mw.outbound.advice import (
    FROM_UPSTREAM,
)
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

NOW = 100.0
BREAKER = BreakerConfig(open_s=30.0, open_min_s=4.0, open_jitter=0.0, min_calls=100)
RETRY = RetryConfig(attempts=3, base_ms=1, max_ms=2, advice_spread=0.0, advice_spread_min_s=0.0)
THREE = ("http://10.0.0.1:8001", "http://10.0.0.2:8002", "http://10.0.0.3:8003")


class Fleet:
    """Every instance answers 503, with `Retry-After: 9` (all, or those `asking`); the
    clock moves 0.25 s a call."""

    def __init__(self, clock: FakeClock, asking: tuple[str, ...] | None = None) -> None:
        self.clock = clock
        self.asking = asking
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(f"{request.url.host}:{request.url.port}")
        self.clock.advance(0.25)
        if self.asking is None or str(request.url).startswith(self.asking):
            return httpx.Response(503, headers={"retry-after": "9"})
        return httpx.Response(503)


def engine_for(clock: FakeClock, cfg: UpstreamConfig) -> tuple[Engine, MemoryStore]:
    store = MemoryStore(rng=seeded_random(3))
    engine = Engine(Policy(upstreams=(cfg,)), clock=clock, rng=seeded_random(7), store=store)
    return engine, store


def open_breakers(
    store: MemoryStore, clock: FakeClock, urls: tuple[str, ...], later: tuple[float, ...] = ()
) -> None:
    """Open each breaker for 4 s (plus its `later`)."""
    for n, url in enumerate(urls):
        key = "upstream:" + url.removeprefix("http://")
        at = clock.monotonic() + (later[n] if n < len(later) else 0.0)
        store.breaker_state(key, BREAKER).force(OPEN, at, seeded_random(0))


async def call(
    engine: Engine, fleet: Fleet, host: str, calls: int = 1, between: Callable[[], None] = list
) -> list[Decision]:
    """`calls` calls in turn through one transport (its instances' pauses are its own),
    `between` run after each; each call's last decision."""
    transport = FidelityTransport(httpx.MockTransport(fleet), engine=engine, telemetry=False)
    last: list[Decision] = []
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(calls):
            response = await client.get(f"http://{host}/pay")
            ctx: DecisionContext = response.extensions["fidelity_context"]
            last.append(ctx.decisions[-1])
            between()
    return last


# ---------------------------------------------------------------- the pure rule


async def test_a_service_of_one_passes_on_its_retry_after_on_a_breaker_open_give_up() -> None:
    # dis42's case: the instance (a service of one answers as a plain host) asks 9 s, its
    # breaker is open for 4 s: the retry is refused by the breaker; the caller is told 9 s
    # (before: 3.75 s, the breaker's reopening alone)
    clock = FakeClock()
    cfg = UpstreamConfig(host="pay", instances=THREE[:1], retry=RETRY, breaker=BREAKER)
    engine, store = engine_for(clock, cfg)
    open_breakers(store, clock, THREE[:1])
    fleet = Fleet(clock)
    (give_up,) = await call(engine, fleet, "pay")
    assert len(fleet.calls) == 1
    assert give_up.reason == "breaker_open"
    assert give_up.details is not None
    assert give_up.details["retry_hint_from"] == FROM_UPSTREAM
    assert give_up.details["retry_hint_s"] == pytest.approx(9.0)


async def test_a_breaker_refusal_passes_on_the_retry_after_of_the_answer_given_up_on() -> None:
    clock = FakeClock()
    cfg = UpstreamConfig(host="pay", instances=THREE, retry=RETRY, breaker=BREAKER)
    engine, store = engine_for(clock, cfg)
    fleet = Fleet(clock)
    # a first call meets each instance once: each asks 9 s and is paused for it; then
    # every breaker opens (4 s); the next call's one attempt (around the open breakers)
    # fails and its retry is refused by the breakers of the instances left
    first, give_up = await call(
        engine, fleet, "pay", calls=2, between=lambda: open_breakers(store, clock, THREE)
    )
    assert first.reason == "attempts"
    assert len(fleet.calls) == 4
    assert give_up.reason == "breaker_open"
    assert give_up.details is not None
    # the answer given up on asked 9 s, and the caller is answered with it (before: 8.25 s,
    # the instances' earliest pause, the answer's own word dropped)
    assert give_up.details["retry_hint_s"] == 9.0
    assert give_up.details["retry_hint_from"] == FROM_UPSTREAM


async def test_a_budget_give_up_passes_on_the_answers_retry_after_as_before() -> None:
    # the rule the breaker's refusal now follows (unchanged here, review 40): one of three
    # instances asked 9 s, the budget refuses the retry to another: the caller is answered
    # with that 503 and told its 9 s (this test passes on the old code too)
    clock = FakeClock()
    retry = RetryConfig(
        attempts=3, base_ms=1, max_ms=2, budget_ratio=0.0, budget_min_per_s=0.0,
        advice_spread=0.0, advice_spread_min_s=0.0,
    )  # fmt: skip
    cfg = UpstreamConfig(host="pay", instances=THREE, retry=retry, breaker=BREAKER)
    engine, _ = engine_for(clock, cfg)
    fleet = Fleet(clock)
    (give_up,) = await call(engine, fleet, "pay")
    assert len(fleet.calls) == 1
    assert give_up.reason == "budget"
    assert give_up.details is not None
    assert give_up.details["retry_hint_s"] == 9.0
    assert give_up.details["retry_hint_from"] == FROM_UPSTREAM


async def test_the_callers_retry_after_through_the_middleware() -> None:
    # what the caller of our app sees: the app answers 503 after the give-up, and the
    # middleware adds the advice (before: `Retry-After: 4`, now 9)
    clock = FakeClock()
    cfg = UpstreamConfig(host="pay", instances=THREE[:1], retry=RETRY, breaker=BREAKER)
    engine, store = engine_for(clock, cfg)
    open_breakers(store, clock, THREE[:1])
    fleet = Fleet(clock)
    upstream = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(fleet), engine=engine, telemetry=False)
    )

    async def work(request: Request) -> Response:
        answer = await upstream.get("http://pay/x")
        return JSONResponse({"upstream": answer.status_code}, 503)

    app = FidelityMiddleware(Router(routes=[Route("/work", work)]), engine=engine, telemetry=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://front"
    ) as client:
        response = await client.get("/work")
    await upstream.aclose()
    assert response.status_code == 503
    assert response.headers["x-fidelity-retry"] == "exhausted"
    assert response.headers["retry-after"] == "9"
