"""Review 18: the middleware's cost functions (`RateLimit(cost=fn)`), loose ends.

1. A cost function raising Starlette's `HTTPException` (a 413 for a body too large) was
   logged as a failure, charged the burst, and the app still ran. Now the middleware
   answers it itself (status, detail, headers, as Starlette's default handler), charges
   nothing, does not run the app, and records it. (One raised where the deadline's
   cancellation was swallowed is the deadline's 504, no cancellation left pending.)
2. `check_limits(request, path=<another route>)` with a cost function that reads the
   body priced the check at the burst and logged an ERROR: now a ValueError naming the
   limit and saying to pass `cost=`.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from _asgi import http_scope
from fidelity_mw import (
    DecisionContext,
    FidelityMiddleware,
    Policy,
    RateLimit,
    check_limits,
)
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.contexts: list[DecisionContext] = []

    def start(self, ctx: DecisionContext, scope: Any) -> None:
        return None

    def end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
        self.contexts.append(ctx)


async def batch_items(request: Request) -> int:
    """One unit per item; a batch over 10 items is the app's 413, a malformed one 400."""
    items = await request.json()
    if not isinstance(items, list):
        raise HTTPException(400, "a batch is a JSON list")
    if len(items) > 10:
        raise HTTPException(413, "at most 10 items", headers={"x-max-items": "10"})
    return len(items)


def app_with(
    clock: FakeClock, cost: Any = batch_items, **extra: Any
) -> tuple[Starlette, Recorder, list[str], MemoryStore]:
    ran: list[str] = []

    async def batch(request: Request) -> JSONResponse:
        ran.append("batch")
        return JSONResponse({"stored": len(await request.json())})

    async def quota(request: Request) -> JSONResponse:
        check = await check_limits(request, path="/batch", method="POST")
        return JSONResponse({"allowed": check.allowed, "cost": check.limits[0].cost})

    app = Starlette(routes=[Route("/batch", batch, methods=["POST"]), Route("/quota", quota)])
    recorder = Recorder()
    store = MemoryStore(rng=seeded_random(1))
    policy = Policy(
        breaker=None,
        rate_limits=[
            RateLimit(name="items", rate="20/min", burst=20, cost=cost, match="/batch", **extra)
        ],
    )
    app.add_middleware(
        FidelityMiddleware,
        policy=policy,
        clock=clock,
        store=store,
        observer=recorder,
        telemetry=False,
    )
    return app, recorder, ran, store


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


# ---- 1. a cost function's HTTPException is the answer


async def test_a_cost_functions_http_exception_is_answered_and_charges_nothing(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, recorder, ran, _ = app_with(clock)
    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        async with client(app) as c:
            big = await c.post("/batch", json=list(range(11)))
            bad = await c.post("/batch", json={"not": "a list"})
            after = await c.post("/batch", json=list(range(10)))
            again = await c.post("/batch", json=list(range(10)))
    assert (big.status_code, big.text) == (413, "at most 10 items")
    assert big.headers["x-max-items"] == "10"
    assert big.headers["content-type"].startswith("text/plain")
    assert "x-fidelity-decided-by" not in big.headers  # the app's answer, not ours
    assert (bad.status_code, bad.text) == (400, "a batch is a JSON list")
    assert ran == ["batch", "batch"]  # the app ran only for the two it admitted
    # nothing was charged: the whole burst (20) is left for the next two
    assert (after.status_code, again.status_code) == (200, 200)
    assert after.headers["ratelimit"].startswith('"items";r=10;')
    assert "cost function" not in caplog.text  # no failure logged
    ctx = recorder.contexts[0]
    assert (ctx.status, ctx.outcome, ctx.decided_by) == (413, "served", "app")
    # the limit was never asked: no ratelimit decision (a "reject" there would count
    # as a limit refusal in every dashboard of them)
    assert [d for d in ctx.decisions if d.layer == "ratelimit"] == []


async def test_a_cost_functions_5xx_http_exception_is_a_failed_outcome(
    clock: FakeClock,
) -> None:
    def unavailable(request: Any) -> int:
        raise HTTPException(503, "pricing is down", headers={"retry-after": "5"})

    app, recorder, ran, _ = app_with(clock, unavailable)
    async with client(app) as c:
        answer = await c.post("/batch", json=[1])
    assert (answer.status_code, answer.text, answer.headers["retry-after"]) == (
        503,
        "pricing is down",
        "5",
    )
    assert ran == []
    assert (recorder.contexts[0].outcome, recorder.contexts[0].status) == ("failed", 503)


async def test_a_cost_functions_http_exception_without_a_body_status(
    clock: FakeClock,
) -> None:
    def not_modified(request: Any) -> int:
        raise HTTPException(304)

    app, _, ran, _ = app_with(clock, not_modified)
    async with client(app) as c:
        answer = await c.post("/batch", json=[1])
    assert (answer.status_code, answer.content) == (304, b"")
    assert ran == []


async def test_a_cost_functions_http_exception_skips_on_reject(clock: FakeClock) -> None:
    shaped: list[int] = []

    def on_reject(ctx: Any, problem: Any) -> Response:
        shaped.append(1)
        return Response("shaped", status_code=429)

    ran: list[str] = []

    async def batch(request: Request) -> Response:
        ran.append("batch")
        return Response("ok")

    app = Starlette(routes=[Route("/batch", batch, methods=["POST"])])
    policy = Policy(
        breaker=None,
        rate_limits=[
            RateLimit(name="items", rate="20/min", burst=20, cost=batch_items, match="/batch")
        ],
    )
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, telemetry=False, on_reject=on_reject
    )
    async with client(app) as c:
        big = await c.post("/batch", json=list(range(11)))
    assert (big.status_code, big.text, shaped, ran) == (413, "at most 10 items", [], [])


# ---- 2. check_limits for another route, with a function that reads the body


async def test_check_limits_for_another_route_with_a_body_cost_says_pass_cost(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app, _, _, _ = app_with(clock)
    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        async with client(app) as c:
            with pytest.raises(ValueError, match=r"'items'.*pass cost="):
                await c.get("/quota")
    assert "cost function" not in caplog.text  # the caller's usage: no ERROR log


async def test_check_limits_for_another_route_with_a_header_cost_still_works(
    clock: FakeClock,
) -> None:
    def header_units(request: Any) -> int:
        return int(request.headers.get("x-units", "1"))

    app, _, _, _ = app_with(clock, header_units)
    async with client(app) as c:
        answer = await c.get("/quota", headers={"x-units": "3"})
    assert answer.json() == {"allowed": True, "cost": 3}


# ---- 1b. a cost function that swallows the deadline's cancel and raises HTTPException


async def test_a_cost_function_answering_after_the_deadline_is_the_deadlines_504(
    clock: FakeClock,
) -> None:
    import asyncio

    from fidelity_mw.policy import DeadlineConfig

    never = asyncio.Event()

    async def stubborn(request: Any) -> int:
        try:
            await never.wait()  # a lookup that never answers
        except asyncio.CancelledError:  # swallowed: the function answers anyway
            raise HTTPException(400, "no price") from None
        return 1

    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append("app")

    recorder = Recorder()
    middleware = FidelityMiddleware(
        app,
        policy=Policy(
            breaker=None,
            deadline=DeadlineConfig(default_ms=1000),
            rate_limits=[RateLimit(name="items", rate="10/min", burst=10, cost=stubborn)],
        ),
        clock=clock,
        observer=recorder,
        telemetry=False,
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope(
        "/batch", "POST", headers=[(b"host", b"t")], client=("10.0.0.1", 5000), server=("t", 80)
    )

    async def request() -> int:
        await middleware(scope, receive, send)
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()  # no cancellation of ours left pending on the task

    task = asyncio.create_task(request())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    clock.advance(1.5)
    for _ in range(5):
        await asyncio.sleep(0)
        if task.done():
            break
    assert task.done(), "the request outlived its deadline"
    assert await task == 0
    assert sent[0]["status"] == 504  # the deadline's answer, as for a swallowed cancel
    assert ran == []
    (ctx,) = recorder.contexts
    assert (ctx.decided_by, ctx.outcome) == ("deadline", "expired")


async def test_check_limits_lets_a_cost_functions_http_exception_through(
    clock: FakeClock,
) -> None:
    """As the FastAPI form's `check()`: the app's own answer, not a failure priced at
    the burst."""

    def too_many(request: Any) -> int:
        raise HTTPException(413, "at most 10 items")

    app, _, _, _ = app_with(clock, too_many)
    async with client(app) as c:
        answer = await c.get("/quota")  # the app's handler of the HTTPException answers
    assert (answer.status_code, answer.text) == (413, "at most 10 items")
