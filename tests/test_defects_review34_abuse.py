"""Review 34: abuse and resource bounds of the newer features, as a hostile client, a
hostile or broken upstream and a careless operator. Each test failed before its fix.

Slow clients: the time the app spends waiting on its client (a body that trickles in,
a response the client reads slowly) is the client's doing, not the route's. Counted as
the route's latency, a handful of slow connections opened the route breaker's slow-call
rule for every client and drove the adaptive concurrency limit to its floor (or moved
the floor itself), so that the same few connections then held every slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse

from _asgi import http_scope
from fidelity_mw import BreakerConfig, FidelityMiddleware, Policy
from fidelity_mw.decide.breaker import CLOSED
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.outbound.transport import _MAX_UPSTREAMS, FidelityTransport
from fidelity_mw.policy import ConcurrencyConfig, DeadlineConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

SLOW_S = 5.0  # how long the hostile client takes to send its body, or to read a chunk
WORK_S = 0.01  # what the app itself takes


def _scope(method: str = "GET", path: str = "/w") -> dict[str, Any]:
    return http_scope(
        path,
        method,
        headers=[(b"content-length", b"4")] if method == "POST" else [],
        client=("192.0.2.1", 5000),
    )


def _app(clock: FakeClock, chunks: int = 1) -> Any:
    """Reads the whole body, works WORK_S, answers in `chunks` body messages."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            more = message.get("more_body", False)
        clock.advance(WORK_S)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(chunks):
            last = i == chunks - 1
            await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": not last})

    return app


async def _call(
    mw: Any,
    clock: FakeClock,
    *,
    slow_body: bool = False,
    slow_reader: bool = False,
) -> list[Mapping[str, Any]]:
    """One request. A slow body: the client takes SLOW_S to send it. A slow reader: each
    body message but the last waits SLOW_S for the client to take it (a server's `send`
    waits while its write buffer is full)."""
    sent: list[Mapping[str, Any]] = []
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if given:
            return {"type": "http.disconnect"}
        given = True
        if slow_body:
            clock.advance(SLOW_S)
        return {"type": "http.request", "body": b"data", "more_body": False}

    async def send(message: Mapping[str, Any]) -> None:
        if slow_reader and message["type"] == "http.response.body" and message.get("more_body"):
            clock.advance(SLOW_S)
        sent.append(message)

    await mw(_scope("POST" if slow_body else "GET"), receive, send)
    return sent


def _into(sent: list[Mapping[str, Any]]) -> Any:
    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)

    return send


def _slow_call_policy() -> Policy:
    return Policy(
        breaker=BreakerConfig(
            min_calls=3, slow_call_ms=1000, slow_call_ratio=0.5, open_s=10, open_jitter=0.0
        )
    )


@pytest.mark.parametrize("how", ["slow_body", "slow_reader"])
async def test_slow_clients_do_not_open_the_route_breaker_by_slow_calls(
    clock: FakeClock, how: str
) -> None:
    mw = FidelityMiddleware(
        _app(clock, chunks=3), policy=_slow_call_policy(), clock=clock, telemetry=False
    )
    for _ in range(10):
        sent = await _call(mw, clock, **{how: True})
        assert sent[0]["status"] == 200
    # every other client: still served
    sent = await _call(mw, clock)
    assert sent[0]["status"] == 200
    store = mw.engine.store
    assert isinstance(store, MemoryStore)
    assert store.breakers["route:!unmatched"].state == CLOSED


async def test_an_app_that_is_slow_itself_still_makes_slow_calls(clock: FakeClock) -> None:
    """The control: the app's own time is the route's latency, whatever the client does."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        clock.advance(SLOW_S)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b"x"})

    mw = FidelityMiddleware(app, policy=_slow_call_policy(), clock=clock, telemetry=False)
    for _ in range(3):
        await _call(mw, clock, slow_body=True)
    sent = await _call(mw, clock)
    assert sent[0]["status"] == 503


def _adaptive_mw(clock: FakeClock, chunks: int = 1) -> FidelityMiddleware:
    policy = Policy(
        breaker=None,
        deadline=DeadlineConfig(default_ms=60_000),
        concurrency=ConcurrencyConfig(limit=10, adaptive=True, max_limit=100),
    )
    return FidelityMiddleware(_app(clock, chunks), policy=policy, clock=clock, telemetry=False)


@pytest.mark.parametrize("how", ["slow_body", "slow_reader"])
async def test_slow_clients_leave_the_adaptive_limit_and_its_floor_alone(
    clock: FakeClock, how: str
) -> None:
    mw = _adaptive_mw(clock, chunks=3)
    for _ in range(20):  # the floor is measured: WORK_S
        assert (await _call(mw, clock))[0]["status"] == 200
    limiter = mw.engine.bulkheads["!unmatched"]
    assert limiter.estimate is not None
    assert limiter.limit == 10
    assert limiter.estimate.baseline_s == pytest.approx(WORK_S)
    # 50 requests of a hostile client, one at a time: each took SLOW_S of its client's
    # making. Before the fix the limit fell to 1 (or, the floor replaced by SLOW_S after
    # enough of them, the limit no longer shrank under a real overload at all).
    for _ in range(50):
        assert (await _call(mw, clock, **{how: True}))[0]["status"] == 200
    assert limiter.limit == 10
    assert limiter.estimate.baseline_s == pytest.approx(WORK_S)


async def test_a_slow_body_cut_by_its_deadline_is_no_overload(clock: FakeClock) -> None:
    """A request whose body never came before its deadline: the client's, not a sign the
    route is overloaded (before the fix each one took 10 % off the adaptive limit)."""
    policy = Policy(
        breaker=None,
        deadline=DeadlineConfig(default_ms=1_000),
        concurrency=ConcurrencyConfig(limit=10, adaptive=True, max_limit=100),
    )
    mw = FidelityMiddleware(_app(clock), policy=policy, clock=clock, telemetry=False)
    for _ in range(20):
        assert (await _call(mw, clock))[0]["status"] == 200
    limiter = mw.engine.bulkheads["!unmatched"]
    assert limiter.limit == 10

    async def receive() -> dict[str, Any]:
        # the body trickles in past the deadline: the watch cancels the app meanwhile
        clock.advance(SLOW_S)
        await asyncio.sleep(0)  # (a server's receive waits on the loop: the cancel lands)
        return {"type": "http.request", "body": b"data", "more_body": False}

    for _ in range(20):
        sent: list[Mapping[str, Any]] = []
        await mw(_scope("POST"), receive, _into(sent))
        assert sent[0]["status"] == 504
    assert limiter.limit == 10


# ---------------------------------------------------------------- hosts the transport learns


class _Inner(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, request=request)


async def test_a_failing_resolver_keeps_no_entry_per_host_it_was_asked_for() -> None:
    """A resolver that raises for hosts it does not know (a KeyError from a lookup
    table), under a client that calls ever-new hosts (webhook URLs, an upstream that
    redirects to a new host each time): the failures said per host were kept per host,
    for good, past the bound of the upstream plans themselves."""

    def resolver(host: str) -> Sequence[str] | None:
        raise KeyError(host)

    transport = FidelityTransport(_Inner(), policy=Policy(), resolver=resolver, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        for i in range(3 * _MAX_UPSTREAMS):
            response = await client.get(f"http://h{i}.example.test/")
            assert response.status_code == 200
    assert len(transport._upstreams) <= _MAX_UPSTREAMS
    assert len(transport._bad_answers) <= _MAX_UPSTREAMS


async def test_a_slow_body_makes_no_slow_call_under_the_fastapi_route_class(
    clock: FakeClock,
) -> None:
    """The same without the middleware: the route class's breaker (FastAPI reads the
    body inside the handler it wraps)."""
    fidelity = Fidelity(policy=_slow_call_policy(), clock=clock)
    router = APIRouter(route_class=fidelity.route_class)

    @router.post("/w")
    async def endpoint(request: Request) -> PlainTextResponse:
        await request.body()
        clock.advance(WORK_S)
        return PlainTextResponse("ok")

    @router.get("/w")
    async def fast() -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = FastAPI()
    app.include_router(router)
    for _ in range(10):
        sent = await _call(app, clock, slow_body=True)
        assert sent[0]["status"] == 200
    assert (await _call(app, clock))[0]["status"] == 200
    store = fidelity.engine.store
    assert isinstance(store, MemoryStore)
    assert store.breakers["route:/w"].state == CLOSED


# ---------------------------------------------------------------- deadlines any client sends


async def test_a_deadline_the_caller_chose_just_past_the_tolerance_is_no_overload_drop(
    clock: FakeClock,
) -> None:
    """Any client may send `x-request-timeout-ms`. One just past what the route tolerates
    (1.5 x its floor), on a route whose latencies spread past that now and then, had each
    of its cut requests count as an overload drop (10 % off the limit), where the same
    latency without the header is a gradient sample (under 5 % here): a client shrank the
    limit for every other at twice the rate (more, the closer its deadline to the
    tolerance: 1.51 x the floor, and a request that took 1.52 x cost 10 %, not 0.3 %).
    Now such a request is the latency sample of the time it had, as any other."""

    def mw_for() -> FidelityMiddleware:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            clock.advance(1.7 * WORK_S)  # past the tolerance (1.5 x the floor), as a tail is
            await asyncio.sleep(0)  # (the deadline's cancel lands here, if it passed)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        async def measured(scope: Any, receive: Any, send: Any) -> None:
            await (app if scope["path"] == "/slow" else _app(clock))(scope, receive, send)

        policy = Policy(
            breaker=None,
            deadline=DeadlineConfig(default_ms=60_000),
            concurrency=ConcurrencyConfig(limit=10, adaptive=True, max_limit=100),
        )
        return FidelityMiddleware(measured, policy=policy, clock=clock, telemetry=False)

    async def get(mw: FidelityMiddleware, path: str, deadline_ms: str | None) -> int:
        scope = _scope("GET", path)
        if deadline_ms is not None:
            scope["headers"] = [(b"x-request-timeout-ms", deadline_ms.encode())]
        sent: list[Mapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        await mw(scope, receive, _into(sent))
        await asyncio.sleep(0)  # a server yields to its loop between requests (the lag probe)
        return int(sent[0]["status"])

    limits = []
    for deadline_ms in ("16", None):
        mw = mw_for()
        for _ in range(20):  # the floor: WORK_S
            assert await get(mw, "/w", None) == 200
        limiter = mw.engine.bulkheads["!unmatched"]
        assert limiter.estimate is not None
        assert limiter.estimate.baseline_s == pytest.approx(WORK_S)
        for _ in range(5):
            status = await get(mw, "/slow", deadline_ms)
            assert status == (504 if deadline_ms else 200)
        limits.append(limiter.estimate.value)
    cut, served = limits
    assert cut == pytest.approx(served)
