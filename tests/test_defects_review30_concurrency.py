"""Review 30: the bulkhead, the adaptive concurrency limit, priorities and the fleet-aware
fallback, as a demanding user of Envoy's adaptive concurrency, Netflix concurrency-limits
and Polly/Resilience4j bulkheads would use them. Fake clock throughout, except where a real
server is the point."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from _asgi import http_scope
from _loopback import LoopbackServer
from test_bulkhead import Service, concurrency_decisions

with warnings.catch_warnings():  # Starlette 1.x asks for httpx2; httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient
from fidelity_mw import BreakerConfig, FidelityMiddleware, Policy, RateLimit
from fidelity_mw.context import LAYER_CONCURRENCY
from fidelity_mw.decide.concurrency import (
    CRITICAL,
    DEFAULT,
    SHEDDABLE,
    ConcurrencyLimiter,
    ConcurrencySpec,
)
from fidelity_mw.policy import ConcurrencyConfig
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


class Slow:
    """One route that takes `work_s` of the fake clock and then yields to the loop (where a
    deadline that passed meanwhile cuts it); the loop keeps up."""

    def __init__(self, policy: Policy, clock: FakeClock, work_s: float) -> None:
        self.contexts: list[Any] = []

        async def work(request: Request) -> Response:
            await asyncio.sleep(0)  # (the loop is idle: the lag probe runs on time)
            clock.advance(work_s)
            await asyncio.sleep(0)
            return PlainTextResponse("ok")

        app = Starlette(routes=[Route("/w", work)])
        self.mw = FidelityMiddleware(app, policy=policy, clock=clock, telemetry=False)

        async def capture(scope: Any, receive: Any, send: Any) -> None:
            await self.mw(scope, receive, send)
            if scope["type"] == "http":
                self.contexts.append(scope["state"]["fidelity"])

        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=capture, client=("127.0.0.1", 5000)),
            base_url="http://svc",
        )


async def test_a_callers_impossible_deadline_does_not_shrink_the_adaptive_limit(
    clock: FakeClock,
) -> None:
    """Any client may send `x-request-timeout-ms: 1`. A request cut by a deadline shorter
    than the route's tolerated latency says the caller asked for the impossible, not that the
    route is overloaded: it must not shrink the limit every other client shares."""
    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=20, adaptive=True, max_limit=100)
    )
    svc = Slow(policy, clock, work_s=0.01)
    for _ in range(20):  # the floor: 10 ms
        assert (await svc.client.get("/w")).status_code == 200
    limiter = svc.mw.engine.bulkheads["/w"]
    assert limiter.limit == 20
    for _ in range(30):
        cut = await svc.client.get("/w", headers={"x-request-timeout-ms": "1"})
        assert cut.status_code == 504
    assert limiter.limit == 20
    assert limiter.in_flight == 0


def test_a_drop_counts_only_when_the_request_had_more_than_the_tolerated_latency() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=20, adaptive=True, max_limit=100))
    for _ in range(20):  # the floor: 10 ms
        assert lim.try_acquire(CRITICAL).admitted
        lim.release(0.01)
    assert lim.limit == 20
    for _ in range(10):  # cut at 5 ms (the caller's deadline): nothing to learn
        lim.try_acquire(CRITICAL)
        lim.release(0.005, dropped=True)
    assert lim.limit == 20
    for _ in range(10):  # cut at 100 ms, ten times the floor: overload
        lim.try_acquire(CRITICAL)
        lim.release(0.1, dropped=True)
    assert lim.limit == round(20 * 0.9**10)
    for _ in range(5):  # how long it ran not known: a drop, as before
        lim.try_acquire(CRITICAL)
        lim.release(dropped=True)
    assert lim.limit == max(1, round(20 * 0.9**15))


def test_while_the_floor_is_measured_a_drop_sooner_than_the_samples_so_far_is_no_evidence() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=100, adaptive=True))
    lim.try_acquire(CRITICAL)
    lim.release(0.01)
    for _ in range(10):
        lim.try_acquire(CRITICAL)
        lim.release(0.002, dropped=True)
    for _ in range(19):
        lim.try_acquire(CRITICAL)
        lim.release(0.01)
    assert lim.limit == 100


async def _priority_seen(mw: FidelityMiddleware, peer: str, headers: dict[str, str]) -> str:
    seen: list[Any] = []

    async def capture(scope: Any, receive: Any, send: Any) -> None:
        await mw(scope, receive, send)
        seen.append(scope["state"]["fidelity"])

    transport = httpx.ASGITransport(app=capture, client=(peer, 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        assert (await client.get("/w", headers=headers)).status_code == 200
    (decision,) = [d for d in seen[-1].decisions if d.layer == LAYER_CONCURRENCY]
    return str(decision.details["priority"])


async def test_a_priority_header_forwarded_by_a_trusted_proxy_is_judged_by_its_client(
    clock: FakeClock,
) -> None:
    """Behind an ingress on a private address (a trusted peer by default), every external
    client's `x-priority: critical` reached the bulkhead from a trusted peer: a client could
    promote itself past `sheddable` and `default`. Where `trusted_proxies` says the peer is a
    proxy, the header is believed only when the client it forwards for is a trusted peer."""
    policy = Policy(
        breaker=None,
        priority_header="x-priority",
        trusted_proxies=("10.0.0.0/24",),
        concurrency=ConcurrencyConfig(limit=4),
    )
    mw = Slow(policy, clock, work_s=0.0).mw
    critical = {"x-priority": "critical"}
    external = {**critical, "x-forwarded-for": "203.0.113.7"}
    internal = {**critical, "x-forwarded-for": "10.1.2.3"}
    assert await _priority_seen(mw, "10.0.0.5", external) == "default"
    assert await _priority_seen(mw, "10.0.0.5", internal) == "critical"
    # a trusted peer that is no proxy, or a proxy's own request: believed as before
    assert await _priority_seen(mw, "10.9.9.9", external) == "critical"
    assert await _priority_seen(mw, "10.0.0.5", critical) == "critical"
    # an external client that names a trusted address itself is not believed for it
    spoofed = {**critical, "x-forwarded-for": "10.1.2.3, 203.0.113.7"}
    assert await _priority_seen(mw, "10.0.0.5", spoofed) == "default"


def _wait_until(condition: Any, timeout_s: float = 10.0) -> bool:
    """Poll (bounded, with slack for a busy machine) until `condition()` holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return bool(condition())


def test_a_queued_request_whose_client_left_leaves_the_queue_and_never_runs() -> None:
    """Under uvicorn a client that closes its connection does not cancel its request: a
    request queued for a slot kept its place, then took a slot and ran the app for nobody
    (at overload, when clients give up, the queue fills with such requests). Its place is
    given up when the client leaves; a queued request whose client stays is served, its
    body intact."""
    gate = threading.Event()
    ran: list[str] = []

    async def work(request: Request) -> Response:
        ran.append(request.query_params["n"])
        if request.query_params.get("hold"):
            await asyncio.to_thread(gate.wait, 10.0)
        return PlainTextResponse(f"{request.query_params['n']}:{(await request.body()).decode()}")

    app = Starlette(routes=[Route("/w", work, methods=["GET", "POST"])])
    policy = Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=1, max_queue=4, queue_timeout_ms=30_000),
    )
    mw = FidelityMiddleware(app, policy=policy, telemetry=False)
    with LoopbackServer(mw) as server:
        limiter = None

        def connect(request: bytes) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(request)
            return sock

        held = connect(b"GET /w?hold=1&n=held HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _wait_until(lambda: ran == ["held"])
        limiter = mw.engine.bulkheads["/w"]
        gone = connect(b"GET /w?n=gone HTTP/1.1\r\nHost: x\r\n\r\n")
        stays = connect(b"POST /w?n=stays HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
        assert _wait_until(lambda: limiter.waiting == 2)
        gone.close()
        assert _wait_until(lambda: limiter.waiting == 1)
        gate.set()
        assert held.recv(1000).startswith(b"HTTP/1.1 200")
        reply = b""
        while b"stays:body" not in reply:
            chunk = stays.recv(1000)
            assert chunk
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200")
        held.close()
        stays.close()
        assert _wait_until(lambda: limiter.in_flight == 0)
        assert ran == ["held", "stays"]


async def test_a_client_that_leaves_while_queued_is_recorded_and_its_place_freed(
    clock: FakeClock,
) -> None:
    """The same on a hand-driven ASGI call: the record says why, nothing is answered."""
    release = asyncio.Event()
    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["query_string"].decode())
        if scope["query_string"] == b"hold":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=1, max_queue=2, queue_timeout_ms=60_000)
    )
    mw = FidelityMiddleware(app, policy=policy, clock=clock, telemetry=False)

    def call(query: bytes, left: asyncio.Event) -> tuple[Any, list[Any], dict[str, Any]]:
        sent: list[Any] = []
        scope = http_scope("/w", query_string=query, server=("svc", 80))
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            sent.append(message)

        return mw(scope, receive, send), sent, scope

    stay = asyncio.Event()
    held, _, _ = call(b"hold", stay)
    held_task = asyncio.ensure_future(held)
    for _ in range(100):
        await asyncio.sleep(0)
    leaves = asyncio.Event()
    queued, queued_sent, queued_scope = call(b"gone", leaves)
    queued_task = asyncio.ensure_future(queued)
    [limiter] = mw.engine.bulkheads.values()
    for _ in range(100):
        await asyncio.sleep(0)
    assert limiter.waiting == 1
    leaves.set()
    await queued_task
    assert limiter.waiting == 0
    assert queued_sent == []
    ctx = queued_scope["state"]["fidelity"]
    (decision,) = [d for d in ctx.decisions if d.layer == LAYER_CONCURRENCY]
    assert (decision.verdict, decision.reason) == ("shed", "client_gone")
    assert (ctx.outcome, ctx.client_disconnected) == ("disconnected", True)
    release.set()
    await held_task
    assert ran == ["hold"]
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


async def test_every_path_out_of_the_app_gives_its_slot_back_once(clock: FakeClock) -> None:
    """An exception, a 204, a HEAD, a stream that fails after it started, a stream that
    ends, a websocket (which takes no slot): after them all nothing is in flight, and a
    streamed response holds its slot until its last body message."""
    more = asyncio.Event()

    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    async def empty(request: Request) -> Response:
        return Response(status_code=204)

    async def text(request: Request) -> Response:
        return PlainTextResponse("x")

    async def broken(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"a"
            raise RuntimeError("mid-body")

        return StreamingResponse(chunks())

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"a"
            await more.wait()
            yield b"b"

        return StreamingResponse(chunks())

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    app = Starlette(
        routes=[
            Route("/boom", boom),
            Route("/empty", empty),
            Route("/text", text, methods=["GET", "HEAD"]),
            Route("/broken", broken),
            Route("/stream", stream),
            WebSocketRoute("/ws", ws),
        ]
    )
    policy = Policy(
        breaker=None,
        rate_limits=[RateLimit(name="all", rate="1000/s")],
        concurrency=ConcurrencyConfig(limit=1),
    )
    mw = FidelityMiddleware(app, policy=policy, clock=clock, telemetry=False)
    transport = httpx.ASGITransport(app=mw, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        for _ in range(3):
            assert (await client.get("/boom")).status_code == 500
            assert (await client.get("/empty")).status_code == 204
            assert (await client.head("/text")).status_code == 200
            with contextlib.suppress(httpx.HTTPError):  # (the body is cut short)
                await client.get("/broken")
            more.set()
            assert (await client.get("/stream")).content == b"ab"
            more.clear()
    assert {route: lim.in_flight for route, lim in mw.engine.bulkheads.items()} == dict.fromkeys(
        ["/boom", "/empty", "/text", "/broken", "/stream"], 0
    )

    # A stream holds its slot until its last body message
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = http_scope("/stream", server=("svc", 80))
    streaming = asyncio.ensure_future(mw(scope, receive, send))
    for _ in range(200):
        if any(m.get("body") == b"a" for m in sent):
            break
        await asyncio.sleep(0)
    limiter = mw.engine.bulkheads["/stream"]
    assert limiter.in_flight == 1
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        assert (await client.get("/stream")).status_code == 503
        more.set()
        await streaming
        assert limiter.in_flight == 0

    # a websocket on a route with limits is admitted by them, and holds no slot
    with TestClient(mw) as test_client, test_client.websocket_connect("/ws"):
        assert all(lim.in_flight == 0 for lim in mw.engine.bulkheads.values())


async def test_a_queued_request_that_expects_100_continue_is_not_read(clock: FakeClock) -> None:
    """Reading it would make the server answer `100 Continue` and the client send a body
    the queue may yet refuse: such a request is not listened to while it waits."""
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["query_string"] == b"hold":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=1, max_queue=2, queue_timeout_ms=60_000)
    )
    mw = FidelityMiddleware(app, policy=policy, clock=clock, telemetry=False)
    reads: list[str] = []

    def scope(query: bytes, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
        return http_scope("/w", "POST", query_string=query, headers=headers, server=("svc", 80))

    def receive_for(name: str) -> Any:
        async def receive() -> dict[str, Any]:
            reads.append(name)
            return {"type": "http.request", "body": b"", "more_body": False}

        return receive

    async def send(message: Any) -> None:
        pass

    held = asyncio.ensure_future(mw(scope(b"hold", []), receive_for("held"), send))
    for _ in range(100):
        await asyncio.sleep(0)
    expect = [(b"content-length", b"4"), (b"Expect", b"100-Continue")]
    queued = asyncio.ensure_future(mw(scope(b"", expect), receive_for("queued"), send))
    [limiter] = mw.engine.bulkheads.values()
    for _ in range(100):
        await asyncio.sleep(0)
    assert limiter.waiting == 1
    assert reads == []
    release.set()
    await asyncio.gather(held, queued)
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


async def test_a_queue_full_of_lower_classes_does_not_turn_a_critical_request_away(
    clock: FakeClock,
) -> None:
    """Two critical requests fill a limit of 2; two sheddable ones fill the queue (they
    may use only half the limit, so no slot freed now would go to them). A critical
    request then found the queue full and was shed, and the slot freed next stayed idle.
    A better class takes the place of the worst waiter, which is refused (`displaced`)."""
    policy = Policy(
        breaker=None,
        priority_header="x-priority",
        concurrency=ConcurrencyConfig(
            limit=2, sheddable_share=0.5, max_queue=2, queue_timeout_ms=60_000
        ),
    )
    svc = Service(policy, clock)
    critical = {"x-priority": "critical"}
    sheddable = {"x-priority": "sheddable"}
    held = [asyncio.create_task(svc.client.get("/w?hold=1", headers=critical)) for _ in range(2)]
    await svc.in_flight(2)
    limiter = svc.mw.engine.bulkheads["/w"]
    waiting = [asyncio.create_task(svc.client.get("/w", headers=sheddable)) for _ in range(2)]
    for _ in range(500):
        if limiter.waiting == 2:
            break
        await asyncio.sleep(0)
    assert limiter.waiting == 2
    late = asyncio.create_task(svc.client.get("/w", headers=critical))
    # the later sheddable waiter gives its place up, and is told so at once
    displaced = await asyncio.wait_for(asyncio.shield(waiting[1]), 5)
    assert displaced.status_code == 503
    assert displaced.headers["retry-after"] == "1"
    ctx = next(c for c in svc.contexts if c.status == 503)
    (decision,) = concurrency_decisions(ctx)
    assert (decision.verdict, decision.reason) == ("shed", "displaced")
    assert decision.details["priority"] == "sheddable"
    assert limiter.waiting == 2
    assert not late.done()
    svc.gate.set()
    assert [r.status_code for r in await asyncio.gather(*held, late, waiting[0])] == [200] * 4
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


def test_a_newcomer_displaces_only_a_waiter_of_a_lower_class() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=1, max_queue=2))
    assert lim.try_acquire(CRITICAL).admitted
    first, second, third = object(), object(), object()
    assert not lim.enqueue(DEFAULT, first)
    assert not lim.enqueue(SHEDDABLE, second)
    assert not lim.can_queue()
    assert lim.displace(SHEDDABLE) is None  # the same class: no
    assert lim.displace(DEFAULT) is second  # the worst waiter, the latest of its class
    assert lim.can_queue()
    assert not lim.enqueue(DEFAULT, third)
    assert lim.displace(DEFAULT) is None
    assert lim.abandon(first)  # still waiting: it leaves
    assert lim.abandon(second)  # displaced: it holds no slot either, nothing to give back
    assert not lim.abandon(second)
    assert lim.release() == [third]


async def test_a_queued_requests_wait_runs_on_the_injected_clock(clock: FakeClock) -> None:
    """The queue timeout and a deadline in the queue went by the event loop's real time
    while everything else (the deadline as the app runs, the limits) follows the clock
    the middleware was given: on a FakeClock a test had to sleep out the wait, and one
    that advanced the clock past it still saw the request queued."""
    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=1, max_queue=2, queue_timeout_ms=20_000)
    )
    svc = Service(policy, clock)
    held = asyncio.create_task(svc.client.get("/w?hold=1"))
    await svc.in_flight(1)
    limiter = svc.mw.engine.bulkheads["/w"]
    timed_out = asyncio.create_task(svc.client.get("/w"))
    expires = asyncio.create_task(svc.client.get("/w", headers={"x-request-timeout-ms": "5000"}))
    for _ in range(500):
        if limiter.waiting == 2:
            break
        await asyncio.sleep(0)
    assert limiter.waiting == 2
    clock.advance(5.0)  # the deadline of one
    assert (await asyncio.wait_for(expires, 5)).status_code == 504
    assert not timed_out.done()
    clock.advance(15.0)  # the queue timeout of the other (before its 30 s default deadline)
    refused = await asyncio.wait_for(timed_out, 5)
    assert refused.status_code == 503
    assert concurrency_decisions(svc.contexts[-1])[0].reason == "queue_timeout"
    svc.gate.set()
    assert (await held).status_code == 200
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


async def test_queue_sheds_cost_no_quota_and_are_no_breaker_outcome(clock: FakeClock) -> None:
    """A request refused from the queue (its wait ran out, or a better class took its
    place) spent no rate-limit units and left the breaker alone, as a shed at once does."""
    policy = Policy(
        breaker=BreakerConfig(consecutive_failures=1, min_calls=1),
        priority_header="x-priority",
        rate_limits=[RateLimit(name="per-client", rate="1/min", burst=3)],
        concurrency=ConcurrencyConfig(limit=1, max_queue=1, queue_timeout_ms=20_000),
    )
    svc = Service(policy, clock)
    held = asyncio.create_task(svc.client.get("/w?hold=1"))  # unit 1 of 3
    await svc.in_flight(1)
    limiter = svc.mw.engine.bulkheads["/w"]

    async def queued(headers: dict[str, str]) -> asyncio.Task[Any]:
        task = asyncio.create_task(svc.client.get("/w", headers=headers))
        for _ in range(500):
            if limiter.waiting == 1:
                break
            await asyncio.sleep(0)
        assert limiter.waiting == 1
        return task

    first = await queued({"x-priority": "sheddable"})
    second = await queued({"x-priority": "default"})  # takes the sheddable one's place
    assert (await asyncio.wait_for(first, 5)).status_code == 503
    clock.advance(20.0)  # and its own wait runs out
    assert (await asyncio.wait_for(second, 5)).status_code == 503
    assert [concurrency_decisions(c)[0].reason for c in svc.contexts] == [
        "displaced",
        "queue_timeout",
    ]
    svc.gate.set()
    assert (await held).status_code == 200
    # units 2 and 3 are still there, and no breaker opened
    assert [(await svc.client.get("/w")).status_code for _ in range(3)] == [200, 200, 429]
