"""Review 13 (a cost per request for the middleware's limits, the router's 405): defects,
each with the test that failed before its fix.

- A client that went away while a cost function read its body (`await request.json()`
  meets `http.disconnect`: Starlette raises ClientDisconnect) was taken for a function
  that failed: the request cost the whole burst (a client that reconnects and retries
  its upload met 429 for a whole refill), an ERROR with a traceback was logged, and the
  app ran for nobody. Now nothing is charged, nothing logged, the app does not run, and
  the outcome is `disconnected`, as for any client gone mid-body.
- The route's deadline was armed only when the app started: a cost function waiting on
  a slow body (or a slow lookup) held the request, and its bulkhead slot, for as long
  as the client liked, where the same request on a constant-cost route is a 504 at the
  deadline. The deadline now bounds the cost functions too.
- The plans of costed requests were cached up to 256 per plan, and plans are cached
  per (method, path), up to 10 000: a costed route with a path parameter
  (`/t/{tenant}/batch`) and batches of many sizes held up to 2.5 million plans (about
  300 KB per path measured, 3 GB at the bound). The cache is now bounded over all
  routes.
- The router's-405 refund took a path to be the router's own 405 when a route served it
  with another method, without looking at what serves it with this one: a catch-all
  `Mount("/", app=legacy)` after the route (a migration's usual shape) is the app that
  serves the request, and its own 405 was refunded. The 405 is the router's only when
  the route that matched the path without the method is the one that serves another.
- `check_limits(request)` in an endpoint, for the request itself, applied a limit's cost
  function to a body-less copy of it: a function that reads the body failed (an ERROR
  with a traceback) and the check answered for the burst, "no", where the admission
  right after admits the request. It is applied to `request` itself now (whose body
  the app read is kept on it).
- The load-time refusal of an async key function for the middleware missed an object
  whose `__call__` is async (accepted: each request keyed by its coroutine's text, no
  limit at all), and cannot see a plain function that returns a coroutine. The first is
  refused at load now; the second counts the request by its address, and says so.
- Compiled, a key function's answer was checked as its declared `str | None`: a user id
  returned as an int was a TypeError, logged as the function's failure, and the request
  counted by its address, where the interpreted build keys by its text. Both key by it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

from _asgi import http_scope as asgi_scope
from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.policy import DeadlineConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio


class Recorder:
    def __init__(self) -> None:
        self.contexts: list[Any] = []

    def start(self, ctx: Any, scope: Any) -> None:
        return None

    def end(self, ctx: Any, scope: Any, token: Any) -> None:
        self.contexts.append(ctx)


async def body_items(request: Any) -> int:
    """A batch costs one unit per item (the body read before the app)."""
    return len(await request.json())


def http_scope(path: str = "/batch", method: str = "POST") -> dict[str, Any]:
    return asgi_scope(
        path,
        method,
        headers=[(b"host", b"t"), (b"content-type", b"application/json")],
        client=("10.0.0.1", 5000),
        server=("t", 80),
    )


class App:
    """Reads the whole body, answers 200; remembers that it ran."""

    def __init__(self) -> None:
        self.ran = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.ran += 1
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def costed_middleware(
    clock: FakeClock, app: App, **policy: Any
) -> tuple[FidelityMiddleware, MemoryStore, Recorder]:
    store = MemoryStore(rng=seeded_random(1))
    recorder = Recorder()
    middleware = FidelityMiddleware(
        app,
        policy=Policy(
            breaker=None,
            rate_limits=[RateLimit(name="items", rate="10/min", burst=10, cost=body_items)],
            **policy,
        ),
        clock=clock,
        store=store,
        observer=recorder,
        telemetry=False,
    )
    return middleware, store, recorder


# ---------------------------------------------------------------- a client gone mid-body


async def test_a_client_gone_while_the_cost_function_reads_is_not_charged(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    app = App()
    middleware, store, recorder = costed_middleware(clock, app)
    messages = [
        {"type": "http.request", "body": b"[1, 2,", "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        await middleware(http_scope(), receive, send)
    assert app.ran == 0  # nobody to answer: the app does no work for it
    assert sent == []
    assert not store.limits.tats  # nothing charged: the bucket is whole
    assert "cost function" not in caplog.text  # not the function's failure
    (ctx,) = recorder.contexts
    assert ctx.outcome == "disconnected"
    assert ctx.client_disconnected
    assert [d.layer for d in ctx.decisions if d.layer == "ratelimit"] == []

    # the client reconnects and sends its batch whole: admitted, as if it came first
    body = b"[1, 2, 3]"
    whole = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_whole() -> dict[str, Any]:
        return whole.pop(0)

    await middleware(http_scope(), receive_whole, send)
    assert sent[0]["status"] == 200
    assert (b"ratelimit", b'"items";r=7;t=6') in sent[0]["headers"]


# ---------------------------------------------------------------- the deadline


async def test_the_deadline_bounds_a_cost_function_waiting_on_the_body(clock: FakeClock) -> None:
    app = App()
    middleware, store, recorder = costed_middleware(
        clock, app, deadline=DeadlineConfig(default_ms=1000)
    )
    first = [{"type": "http.request", "body": b"[1,", "more_body": True}]
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if first:
            return first.pop(0)
        await never.wait()  # the rest of the body never comes
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    task = asyncio.create_task(middleware(http_scope(), receive, send))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()  # reading the body
    clock.advance(1.5)
    for _ in range(5):
        await asyncio.sleep(0)
        if task.done():
            break
    assert task.done(), "the request outlived its deadline"
    await task
    assert sent[0]["status"] == 504
    assert app.ran == 0
    assert not store.limits.tats  # no cost known: nothing charged
    (ctx,) = recorder.contexts
    assert (ctx.decided_by, ctx.outcome) == ("deadline", "expired")
    assert [(d.layer, d.verdict) for d in ctx.decisions] == [
        ("deadline", "allow"),
        ("deadline", "reject"),
    ]


async def test_a_cost_function_within_the_deadline_is_admitted_as_before(
    clock: FakeClock,
) -> None:
    app = App()
    middleware, _, _ = costed_middleware(clock, app, deadline=DeadlineConfig(default_ms=1000))
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        answer = await c.post("/batch", json=[1, 2])
        clock.advance(5.0)  # the deadline's timer, disarmed, must not touch later requests
        later = await c.post("/batch", json=[1])
    assert (answer.status_code, later.status_code) == (200, 200)
    assert app.ran == 2


# ---------------------------------------------------------------- the costed plans' cache


def test_the_plans_of_costed_requests_are_bounded_over_all_routes() -> None:
    from fidelity_mw import routeplan
    from fidelity_mw.routeplan import RoutePlan, costed_plan

    limit = RateLimit(name="items", rate="1000/min", cost=body_items)
    plans = [RoutePlan(f"/t/{i}/batch", None, (limit,), None, None) for i in range(40)]
    for plan in plans:
        for cost in range(1, 201):
            sub = costed_plan(plan, (cost,))
            assert sub.specs[0].cost == cost
            assert sub.route == plan.route
    held = sum(len(plan.costed) for plan in plans)
    assert 0 < held <= routeplan._MAX_COSTED_ALL < 40 * 200
    # what is cached is right: each plan's own route and cost
    for plan in plans:
        for costs, sub in plan.costed.items():
            assert sub.route == plan.route
            assert (sub.specs[0].cost,) == costs


# ---------------------------------------------------------------- the router's 405


async def test_a_catch_all_mounted_apps_own_405_is_charged(clock: FakeClock) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def items(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def legacy(scope: Any, receive: Any, send: Any) -> None:
        """The old app, mounted under everything: it serves POST /items (its answer)."""
        await send({"type": "http.response.start", "status": 405, "headers": []})
        await send({"type": "http.response.body", "body": b"not here"})

    app = Starlette(routes=[Route("/items", items), Mount("/", app=legacy)])
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(breaker=None, rate_limits=[RateLimit(rate="2/min")]),
        clock=clock,
        store=MemoryStore(rng=seeded_random(1)),
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        posts = [(await c.post("/items")).status_code for _ in range(3)]
    assert posts == [405, 405, 429]  # the mounted app's own answer, charged


async def test_the_routers_405_under_a_mount_still_gives_the_units_back(clock: FakeClock) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def items(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def legacy(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"legacy"})

    app = Starlette(routes=[Mount("/api", routes=[Route("/items", items)]), Mount("/", app=legacy)])
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(breaker=None, rate_limits=[RateLimit(rate="2/min")]),
        clock=clock,
        store=MemoryStore(rng=seeded_random(1)),
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        posts = [(await c.post("/api/items")).status_code for _ in range(3)]
        gets = [(await c.get("/api/items")).status_code for _ in range(3)]
    assert posts == [405, 405, 405]  # the mount's router: no route serves POST
    assert gets == [200, 200, 429]


# ---------------------------------------------------------------- check_limits


async def test_check_limits_on_the_request_itself_applies_its_cost_function_to_its_body(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint asks whether the same request again would be admitted: the cost
    function read a body-less copy of it (RuntimeError: no receive channel), logged an
    ERROR with a traceback, and the check said the burst, "no", where the admission
    right after admits it."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from fidelity_mw import check_limits

    async def batch(request: Any) -> JSONResponse:
        items = await request.json()
        again = await check_limits(request)  # this same batch, once more?
        (status,) = again.limits
        return JSONResponse({"stored": len(items), "again": [again.allowed, status.cost]})

    app = Starlette(routes=[Route("/batch", batch, methods=["POST"])])
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(
            breaker=None,
            rate_limits=[RateLimit(name="items", rate="10/min", burst=10, cost=body_items)],
        ),
        clock=clock,
        store=MemoryStore(rng=seeded_random(1)),
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
            first = (await c.post("/batch", json=[1, 2, 3])).json()
        second = await c.post("/batch", json=[1, 2, 3])
    assert first == {"stored": 3, "again": [True, 3]}
    assert second.status_code == 200  # as the check said
    assert "cost function" not in caplog.text


# ---------------------------------------------------------------- an async key function


class TenantLookup:
    """A key as an object whose `__call__` is async (a client of an auth service)."""

    async def __call__(self, scope: Any) -> str:
        return "t1"


def test_an_async_callable_object_as_a_middleware_key_is_refused_at_load() -> None:
    """`inspect.iscoroutinefunction` says no of an object with an async `__call__`: it
    was accepted, and each request keyed by its coroutine's text (no limit at all)."""
    from fidelity_mw import PolicyError

    with pytest.raises(PolicyError) as caught:
        RateLimit(rate="2/min", key=TenantLookup())
    assert "coroutine function" in str(caught.value)


async def test_a_key_function_that_returns_a_coroutine_counts_by_the_client_ip(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain function that returns a coroutine (a lambda around an async lookup) cannot
    be told at load: its coroutine, as text, was a fresh key per request."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def lookup(scope: Any) -> str:
        return "t1"

    held = []  # each coroutine kept alive: a freed one's address (its text) is reused

    def key(scope: Any) -> Any:
        coroutine = lookup(scope)
        held.append(coroutine)
        return coroutine

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", ok)])
    store = MemoryStore(rng=seeded_random(1))
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(breaker=None, rate_limits=[RateLimit(name="t", rate="2/min", key=key)]),
        clock=clock,
        store=store,
        telemetry=False,
    )
    with caplog.at_level(logging.ERROR, logger="fidelity_mw"):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("10.0.0.7", 1)), base_url="http://t"
        ) as c:
            statuses = [(await c.get("/x")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # one counter: the client's address
    assert set(store.limits.tats) == {"t|10.0.0.7"}
    assert "returned an awaitable" in caplog.text


async def test_a_key_function_that_returns_a_number_keys_by_its_text_in_both_builds(
    clock: FakeClock,
) -> None:
    """Compiled, the key's declared `str | None` was checked: a user id as an int was a
    TypeError, logged as the function's failure, and counted by the client's address;
    interpreted, its text was the key."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    def user_id(scope: Any) -> Any:
        return 42

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", ok)])
    store = MemoryStore(rng=seeded_random(1))
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(breaker=None, rate_limits=[RateLimit(name="u", rate="2/min", key=user_id)]),
        clock=clock,
        store=store,
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/x")).status_code == 200
    assert set(store.limits.tats) == {"u|k:42"}
