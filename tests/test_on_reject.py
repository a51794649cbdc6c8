"""`on_reject`: rejection responses shaped by the application, RFC 9457 by default."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import (
    BreakerConfig,
    Decision,
    DecisionContext,
    FidelityMiddleware,
    Policy,
    RateLimit,
)
from fidelity_mw.decide.breaker import OPEN
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

ONE_PER_MINUTE = Policy(breaker=None, rate_limits=(RateLimit(name="tight", rate="1/min"),))


def make_app(policy: Policy, clock: FakeClock, on_reject: Any, **options: Any) -> Starlette:
    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/ok", ok)])
    app.add_middleware(
        FidelityMiddleware,
        policy=policy,
        clock=clock,
        rng=seeded_random(1),
        telemetry=False,
        on_reject=on_reject,
        **options,
    )
    return app


async def two_requests(app: Starlette, **kwargs: Any) -> tuple[httpx.Response, httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = await client.get("/ok", **kwargs)
        second = await client.get("/ok", **kwargs)
    return first, second


async def test_hook_shapes_the_rate_limit_rejection_and_keeps_retry_after(
    clock: FakeClock,
) -> None:
    seen: list[tuple[DecisionContext, Decision]] = []

    def on_reject(ctx: DecisionContext, decision: Decision) -> Response:
        seen.append((ctx, decision))
        return JSONResponse({"error": "slow down", "limit": decision.subject}, status_code=429)

    first, second = await two_requests(make_app(ONE_PER_MINUTE, clock, on_reject))
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json() == {"error": "slow down", "limit": "tight"}
    assert second.headers["content-type"] == "application/json"
    # the hook did not set them: the client still learns when to come back
    assert second.headers["retry-after"] == "60"
    assert second.headers["ratelimit-policy"] == '"tight";q=1;w=60'
    assert second.headers["ratelimit"].startswith('"tight";r=0')
    # still marked as our refusal: a caller's breaker does not count it against us
    assert second.headers["x-fidelity-decided-by"] == "ratelimit"
    [(ctx, decision)] = seen
    assert (decision.layer, decision.verdict, decision.reason) == (
        "ratelimit",
        "reject",
        "over_limit",
    )
    assert ctx.status == 429


async def test_hook_headers_win_and_its_status_is_recorded(clock: FakeClock) -> None:
    contexts: list[DecisionContext] = []

    async def on_reject(ctx: DecisionContext, decision: Decision) -> Response:
        contexts.append(ctx)
        return PlainTextResponse("busy", status_code=503, headers={"Retry-After": "7"})

    _first, second = await two_requests(make_app(ONE_PER_MINUTE, clock, on_reject))
    assert second.status_code == 503
    assert second.text == "busy"
    assert second.headers.get_list("retry-after") == ["7"]
    assert contexts[0].status == 503


@pytest.mark.parametrize(
    "hook",
    [
        pytest.param(lambda ctx, d: None, id="declines"),
        pytest.param(lambda ctx, d: 1 / 0, id="raises"),
        pytest.param(lambda ctx, d: {"not": "a response"}, id="not-a-response"),
    ],
)
async def test_default_problem_body_when_the_hook_declines_or_fails(
    clock: FakeClock, hook: Any
) -> None:
    _first, second = await two_requests(make_app(ONE_PER_MINUTE, clock, hook))
    assert second.status_code == 429
    assert second.headers["content-type"] == "application/problem+json"
    body = second.json()
    assert body["type"] == "urn:fidelity-mw:problem:rate-limited"
    assert body["status"] == 429
    assert body["limit"] == "tight"


async def test_a_response_that_fails_before_starting_falls_back_to_the_default(
    clock: FakeClock,
) -> None:
    class Broken(Response):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            raise RuntimeError("template missing")

    _first, second = await two_requests(
        make_app(ONE_PER_MINUTE, clock, lambda ctx, d: Broken("x", status_code=418))
    )
    assert second.status_code == 429
    assert second.json()["type"] == "urn:fidelity-mw:problem:rate-limited"


async def test_hook_sees_the_breaker_shed_and_the_expired_deadline(clock: FakeClock) -> None:
    store = MemoryStore(rng=seeded_random(2))
    breaker = BreakerConfig(min_calls=1, open_jitter=0.0, open_min_s=5.0)  # a fixed 5 s
    decisions: list[Decision] = []

    def on_reject(ctx: DecisionContext, decision: Decision) -> Response:
        decisions.append(decision)
        return PlainTextResponse(f"{decision.layer}:{decision.reason}", status_code=599)

    app = make_app(Policy(breaker=breaker), clock, on_reject, store=store)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        expired = await client.get("/ok", headers={"x-request-timeout-ms": "0"})
        store.breaker_state("route:/ok", breaker).force(OPEN, clock.monotonic(), seeded_random())
        shed = await client.get("/ok")
    assert (expired.status_code, expired.text) == (599, "deadline:expired_on_arrival")
    assert (shed.status_code, shed.text) == (599, "breaker:breaker_open")
    assert shed.headers["retry-after"] == "5"  # kept from the default rejection
    assert [d.verdict for d in decisions] == ["reject", "shed"]


async def test_without_a_hook_the_body_is_rfc_9457(clock: FakeClock) -> None:
    _first, second = await two_requests(make_app(ONE_PER_MINUTE, clock, None))
    assert second.headers["content-type"] == "application/problem+json"
    body = json.loads(second.content)
    assert set(body) >= {"type", "title", "status", "detail"}


async def test_hook_shapes_refusals_that_escape_the_app_and_capacity_sheds(
    clock: FakeClock,
) -> None:
    """Our answers to a control refusal escaping the app (an upstream's open breaker)
    and to a full bulkhead go through the same hook as the other rejections."""
    from fidelity_mw import CircuitOpen
    from fidelity_mw.policy import ConcurrencyConfig

    seen: list[Decision] = []

    def on_reject(ctx: DecisionContext, decision: Decision) -> Response:
        seen.append(decision)
        return JSONResponse({"why": decision.layer}, status_code=decision_status(ctx))

    def decision_status(ctx: DecisionContext) -> int:
        return 503 if ctx.decided_by != "deadline" else 504

    async def calls_upstream(request: Request) -> Response:
        raise CircuitOpen("open", host="payments.internal", retry_after_s=2.0)

    app = Starlette(routes=[Route("/pay", calls_upstream)])
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(breaker=None),
        clock=clock,
        telemetry=False,
        on_reject=on_reject,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        refused = await client.get("/pay")
    assert refused.status_code == 503
    assert refused.json() == {"why": seen[-1].layer}
    assert refused.headers["retry-after"] == "2"  # kept from our own answer
    assert refused.headers["x-fidelity-decided-by"] == seen[-1].layer

    gate = asyncio.Event()

    async def slow(request: Request) -> Response:
        await gate.wait()
        return PlainTextResponse("ok")

    full = Starlette(routes=[Route("/w", slow)])
    full.add_middleware(
        FidelityMiddleware,
        policy=Policy(breaker=None, concurrency=ConcurrencyConfig(limit=1)),
        clock=clock,
        telemetry=False,
        on_reject=on_reject,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=full), base_url="http://t"
    ) as client:
        held = asyncio.create_task(client.get("/w"))
        for _ in range(100):
            await asyncio.sleep(0)
        shed = await client.get("/w")
        gate.set()
        assert (await held).status_code == 200
    assert shed.status_code == 503
    assert shed.json() == {"why": "concurrency"}
    assert shed.headers["retry-after"] == "1"
    assert seen[-1].layer == "concurrency"
