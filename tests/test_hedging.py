"""Hedged requests through FidelityTransport (outbound/hedge.py).

The upstream is an async httpx.MockTransport whose handlers block on events, so the
race between a slow attempt and its hedge is real (two tasks, one answers first); the
hedge delay runs on a FakeClock (its sleep only advances time).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelitySyncTransport, FidelityTransport
from fidelity_mw.context import DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.outbound.hedge import LatencyWindow, hedge_delay
from fidelity_mw.policy import HedgeConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

INSTANCES = ("http://10.0.0.1:8001", "http://10.0.0.2:8002", "http://10.0.0.3:8003")


class Tracked(httpx.AsyncByteStream):
    """A response body that remembers being closed."""

    def __init__(self) -> None:
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"ok"

    async def aclose(self) -> None:
        self.closed = True


class Upstream:
    """The first request hangs (until `release` is set, or forever); later ones answer."""

    def __init__(self, release_on_second: bool = False) -> None:
        self.seen: list[tuple[str, str]] = []  # (instance, x-fidelity-attempt)
        self.release = asyncio.Event()
        self.release_on_second = release_on_second
        self.cancelled = 0
        self.bodies: list[Tracked] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(
            (f"{request.url.host}:{request.url.port}", request.headers["x-fidelity-attempt"])
        )
        if len(self.seen) == 1:
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        elif self.release_on_second:
            self.release.set()  # the first attempt answers too, just after this one
        body = Tracked()
        self.bodies.append(body)
        return httpx.Response(200, stream=body)


def transport(
    upstream: Any, *, instances: tuple[str, ...] = INSTANCES, **retry: Any
) -> tuple[FidelityTransport, FakeClock]:
    clock = FakeClock()
    cfg = UpstreamConfig(
        host="payments",
        instances=instances,
        retry=RetryConfig(attempts=3, base_ms=1, max_ms=2, **retry),
        hedge=HedgeConfig(after_ms=50),
    )
    engine = Engine(
        Policy(upstreams=(cfg,)), clock=clock, rng=seeded_random(6), store=MemoryStore()
    )
    return FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False), clock


def context(response: httpx.Response) -> DecisionContext:
    ctx = response.extensions["fidelity_context"]
    assert isinstance(ctx, DecisionContext)
    return ctx


async def test_a_slow_attempt_is_hedged_to_another_instance_and_the_hedge_wins() -> None:
    upstream = Upstream()
    t, clock = transport(upstream, instances=INSTANCES[:2])
    # The first instance looks far faster: the balancer alone would pick it again.
    fast, slow = t.upstream(t.engine, httpx.URL("http://payments/")).instances or ()
    fast.latency_s, slow.latency_s = 0.001, 1.0
    fast.latency_at = slow.latency_at = clock.monotonic()
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
        assert response.status_code == 200
    first, second = upstream.seen
    assert first[0] == "10.0.0.1:8001"
    assert second[0] == "10.0.0.2:8002"  # another instance
    assert [first[1], second[1]] == ["1", "2"]  # x-fidelity-attempt counts the hedge
    assert upstream.cancelled == 1  # the loser was cancelled, not left running
    assert 0.05 in clock.sleeps  # hedged after the fixed delay
    ctx = context(response)
    hedges = [d for d in ctx.decisions if d.verdict == "hedge"]
    assert [(d.layer, d.reason, d.details["attempt"]) for d in hedges] == [
        ("retry", "slow_attempt", 2)
    ]
    assert ctx.attempts["payments"] == 2
    lb = [d.details["instance"] for d in ctx.decisions if d.layer == "lb"]
    assert lb == ["10.0.0.1:8001", "10.0.0.2:8002"]
    assert ctx.upstream_exhausted is False
    # nothing is left in flight on any instance
    assert all(
        i.outstanding == 0
        for i in t.upstream(t.engine, httpx.URL("http://payments")).instances or ()
    )


async def test_a_loser_that_answers_too_has_its_response_closed() -> None:
    upstream = Upstream(release_on_second=True)
    t, _ = transport(upstream)
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
        assert response.status_code == 200
        assert response.headers.get("content-length") is None
    assert len(upstream.bodies) == 2  # both attempts got an answer
    winner, loser = upstream.bodies  # the hedge answered first
    assert loser.closed
    assert winner.closed  # by the client, once read: it is the response handed back


async def test_a_post_is_never_hedged_a_get_is() -> None:
    for method, expected in (("POST", 1), ("GET", 2)):
        upstream = Upstream()

        async def answer_soon(up: Upstream = upstream) -> None:
            for _ in range(20):  # let the hedge timer (fake time) fire first
                await asyncio.sleep(0)
            up.release.set()

        t, _ = transport(upstream)
        async with httpx.AsyncClient(transport=t) as client:
            task = asyncio.ensure_future(answer_soon())
            response = await client.request(method, "http://payments/pay", content=b"x")
            await task
        assert response.status_code == 200
        assert len(upstream.seen) == expected, method
        assert any(d.verdict == "hedge" for d in context(response).decisions) is (expected == 2)


async def test_a_spent_budget_means_no_hedge_and_it_is_recorded() -> None:
    upstream = Upstream()

    async def answer_soon() -> None:
        for _ in range(20):
            await asyncio.sleep(0)
        upstream.release.set()

    # One host, no instances: a hedge would go to the same host, but the budget says no.
    t, _ = transport(upstream, instances=(), budget_ratio=0.0, budget_min_per_s=0.0)
    async with httpx.AsyncClient(transport=t) as client:
        task = asyncio.ensure_future(answer_soon())
        response = await client.get("http://payments/pay")
        await task
    assert response.status_code == 200  # the first attempt still answers
    assert len(upstream.seen) == 1
    ctx = context(response)
    refused = [d for d in ctx.decisions if d.reason == "no_hedge"]
    assert [(d.layer, d.verdict, d.details["why"]) for d in refused] == [
        ("budget", "reject", "budget")
    ]
    assert not any(d.verdict in ("hedge", "give_up") for d in ctx.decisions)
    assert ctx.upstream_exhausted is False  # a refused hedge is no give-up of the call


async def test_one_host_is_hedged_to_itself() -> None:
    upstream = Upstream()
    t, _ = transport(upstream, instances=())
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 200
    assert [s[0] for s in upstream.seen] == ["payments:None", "payments:None"]
    assert [s[1] for s in upstream.seen] == ["1", "2"]


class Attempts:
    """An observer noting every attempt number (what telemetry turns into resend_count)."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.ended: list[tuple[int, str]] = []
        self.calls = 0

    def attempt_start(self, ctx: Any, request: httpx.Request, attempt: int) -> Any:
        self.started.append(attempt)
        return attempt

    def attempt_end(
        self, token: Any, response: httpx.Response | None, error: BaseException | None
    ) -> None:
        self.ended.append((token, "ok" if response is not None else type(error).__name__))

    def call_end(self, ctx: Any) -> None:
        self.calls += 1
        assert len(self.ended) == len(self.started)  # the call ends after its last attempt


async def test_each_hedge_is_an_attempt_for_the_observer_and_the_call_ends_once() -> None:
    upstream = Upstream()
    t, _ = transport(upstream)
    observer = Attempts()
    t._observer = observer
    async with httpx.AsyncClient(transport=t) as client:
        await client.get("http://payments/pay")
    assert observer.started == [1, 2]
    assert sorted(observer.ended) == [(1, "CancelledError"), (2, "ok")]
    assert observer.calls == 1


async def test_the_hedge_delay_is_never_past_the_deadline() -> None:
    upstream = Upstream()

    async def answer_soon() -> None:
        for _ in range(20):
            await asyncio.sleep(0)
        upstream.release.set()

    t, clock = transport(upstream)
    ctx = DecisionContext(t.engine, "outbound", "GET", clock.monotonic())
    ctx.deadline_at = clock.monotonic() + 0.01  # gone by the time the hedge would start
    from fidelity_mw.context import _CURRENT

    token = _CURRENT.set(ctx)
    try:
        async with httpx.AsyncClient(transport=t) as client:
            task = asyncio.ensure_future(answer_soon())
            response = await client.get("http://payments/pay")
            await task
    finally:
        _CURRENT.reset(token)
    assert response.status_code == 200
    assert len(upstream.seen) == 1


def test_the_sync_transport_does_not_hedge() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["x-fidelity-attempt"])
        return httpx.Response(200)

    cfg = UpstreamConfig(host="payments", hedge=HedgeConfig(after_ms=1))
    engine = Engine(Policy(upstreams=(cfg,)), clock=FakeClock(), store=MemoryStore())
    t = FidelitySyncTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    with httpx.Client(transport=t) as client:
        assert client.get("http://payments/").status_code == 200
    assert seen == ["1"]


def test_the_p95_delay_falls_back_until_the_window_has_enough_samples() -> None:
    window = LatencyWindow()
    for i in range(19):
        window.add(i / 1000.0)
    assert hedge_delay("p95", 50, 20, window) == 0.05
    window.add(0.019)
    assert hedge_delay("p95", 50, 20, window) == pytest.approx(0.019)
    for _ in range(400):  # the window forgets: only recent latencies count
        window.add(0.2)
    assert hedge_delay("p95", 50, 20, window) == pytest.approx(0.2)
    assert hedge_delay("fixed", 50, 20, window) == 0.05


async def test_a_hedge_is_a_client_span_with_its_resend_count() -> None:
    from test_telemetry_helpers import pipeline

    otel = pipeline()
    try:
        upstream = Upstream()
        t, _ = transport(upstream)
        t._observer = otel.telemetry
        async with httpx.AsyncClient(transport=t) as client:
            assert (await client.get("http://payments/pay")).status_code == 200
        spans = otel.finished()
        counts = sorted(dict(s.attributes or {}).get("http.request.resend_count", 0) for s in spans)
        assert counts == [0, 1]  # the first attempt, and the hedge (resend 1)
        # the first attempt lost the race and was cancelled: marked so, and (OTel's HTTP
        # conventions: a cancelled request did not complete) with its error type
        attrs = [dict(s.attributes or {}) for s in spans]
        loser = next(i for i, a in enumerate(attrs) if not a.get("http.request.resend_count"))
        winner = 1 - loser
        assert attrs[loser].get("fidelity.attempt.cancelled") is True
        assert attrs[loser]["error.type"] == "CancelledError"
        assert spans[loser].status.status_code.name == "ERROR"
        assert "error.type" not in attrs[winner]
        assert "fidelity.attempt.cancelled" not in attrs[winner]
    finally:
        otel.shutdown()


async def test_a_failing_hedge_does_not_end_the_call_and_its_response_is_closed() -> None:
    bodies: list[Tracked] = []
    release = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        body = Tracked()
        bodies.append(body)
        if request.headers["x-fidelity-attempt"] == "1":
            await release.wait()
            return httpx.Response(200, stream=body)
        release.set()  # the first attempt answers after the hedge failed
        return httpx.Response(503, stream=body)

    t, _ = transport(handler)
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 200
    _first, hedge = bodies  # exactly two: a failed hedge is not retried
    assert hedge.closed
    assert response.extensions["fidelity_context"].upstream_exhausted is False


async def test_a_breaker_with_no_probe_slot_left_refuses_the_hedge() -> None:
    from fidelity_mw.policy import BreakerConfig

    statuses = [503]  # the first call fails and opens the breaker
    release = asyncio.Event()
    seen: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["x-fidelity-attempt"])
        if not statuses:
            await release.wait()
            return httpx.Response(200)
        return httpx.Response(statuses.pop())

    async def answer_soon() -> None:
        for _ in range(20):
            await asyncio.sleep(0)
        release.set()

    clock = FakeClock()
    breaker = BreakerConfig(consecutive_failures=1, half_open_probes=1, open_jitter=0.0)
    cfg = UpstreamConfig(
        host="payments",
        retry=RetryConfig(attempts=1),
        breaker=breaker,
        hedge=HedgeConfig(after_ms=50),
    )
    engine = Engine(Policy(upstreams=(cfg,)), clock=clock, store=MemoryStore())
    t = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        assert (await client.get("http://payments/a")).status_code == 503
        clock.advance(breaker.open_min_s + 0.01)  # half-open: one probe slot
        task = asyncio.ensure_future(answer_soon())
        response = await client.get("http://payments/b")  # the probe; its hedge finds no slot
        await task
    assert response.status_code == 200
    assert seen == ["1", "1"]  # no hedge went out
    ctx = context(response)
    refused = [d for d in ctx.decisions if d.reason == "no_hedge"]
    assert [(d.layer, d.verdict, d.details["why"]) for d in refused] == [
        ("breaker", "reject", "breaker_open")
    ]
    assert ctx.shed_by is None
    assert ctx.upstream_exhausted is False


class SlowFirst:
    """A real ASGI upstream: the first request waits for the client to go away (and
    notes that it did); every other one answers at once with `name`."""

    def __init__(self, name: bytes) -> None:
        import threading

        self.name = name
        self.requests = 0
        self.disconnected = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        if self.requests == 1:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": self.name})


async def test_on_loopback_servers_the_hedge_wins_and_the_loser_connection_is_dropped() -> None:
    from _loopback import LoopbackServer

    a, b = SlowFirst(b"a"), SlowFirst(b"b")
    b.requests = 1  # b answers every request
    with LoopbackServer(a) as server_a, LoopbackServer(b) as server_b:
        cfg = UpstreamConfig(
            host="svc",
            instances=(server_a.url, server_b.url),
            breaker=None,
            hedge=HedgeConfig(after_ms=20),  # real time: a real race
        )
        t = FidelityTransport(policy=Policy(upstreams=(cfg,)), telemetry=False)
        first, second = t.upstream(t.engine, httpx.URL("http://svc/")).instances or ()
        now = t.engine.clock.monotonic()
        first.latency_s, second.latency_s = 0.001, 1.0  # the first attempt goes to a
        first.latency_at = second.latency_at = now
        async with httpx.AsyncClient(transport=t) as client:
            response = await client.get("http://svc/x")
            # the loser's connection is dropped with the client still open: the server
            # sees the client go (slack: 5 s)
            assert await asyncio.to_thread(a.disconnected.wait, 5.0)
        assert response.status_code == 200
        assert response.content == b"b"
        assert a.requests == 1
        assert b.requests == 2
