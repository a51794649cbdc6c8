"""Defects found by the eighth review (the outbound side: transport, retries, hedging,
instance balancing). Each test failed before its fix; the fake clock stands for time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityTransport
from fidelity_mw.engine import Engine
from fidelity_mw.policy import HedgeConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

INSTANCES = ("http://10.0.0.1:8001", "http://10.0.0.2:8002", "http://10.0.0.3:8003")
RETRY = RetryConfig(attempts=3, base_ms=1, max_ms=2)


def _key(request: httpx.Request) -> str:
    return f"{request.url.host}:{request.url.port}"


def _service(
    handler: Any, clock: FakeClock, instances: tuple[str, ...] = INSTANCES, **cfg: Any
) -> tuple[FidelityTransport, Engine]:
    upstream = UpstreamConfig(host="payments", instances=instances, retry=RETRY, **cfg)
    engine = Engine(
        Policy(upstreams=(upstream,)), clock=clock, rng=seeded_random(7), store=MemoryStore()
    )
    return FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False), engine


class PoliteClock(FakeClock):
    """A fake clock whose sleep lets the other tasks run before it moves time: an
    attempt that answers at once answers before a hedge delay has passed, as it would."""

    async def sleep(self, seconds: float) -> None:
        for _ in range(5):
            await asyncio.sleep(0)
        await super().sleep(seconds)


# ---------------------------------------------------------------- balancing


async def test_an_instance_with_one_slow_answer_is_tried_again_once_that_is_old() -> None:
    # One slow answer (a GC pause, a cold cache) left an instance's latency estimate high;
    # the estimate only moved on a new sample, and an instance that loses every power-of-
    # two comparison gets none: it was never picked again, healthy as it was.
    clock = FakeClock()
    slow = {"10.0.0.1:8001": 2.0}
    seen: Counter[str] = Counter()

    async def handler(request: httpx.Request) -> httpx.Response:
        key = _key(request)
        seen[key] += 1
        clock.advance(slow.pop(key, 0.01))
        return httpx.Response(200)

    t, _ = _service(handler, clock)
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(10):  # every instance measured, the first one once, slowly
            await client.get("http://payments/pay")
        assert seen["10.0.0.1:8001"] == 1
        seen.clear()
        for _ in range(600):  # a minute of calls, every instance fast
            assert (await client.get("http://payments/pay")).status_code == 200
            clock.advance(0.1)
    assert seen["10.0.0.1:8001"] > 0


async def test_a_hedged_away_slow_instance_stops_being_the_first_choice() -> None:
    # An instance that hangs loses every race to its hedge, and its attempts are
    # cancelled: their time went into no latency estimate, so the balancer kept the
    # instance's old (fast) one and sent it the first attempt of every call, each paying
    # the hedge delay and a hedge from the retry budget (once that is spent, the call
    # waits on the hanging instance).
    clock = PoliteClock()
    first: Counter[str] = Counter()

    async def handler(request: httpx.Request) -> httpx.Response:
        key = _key(request)
        if request.headers["x-fidelity-attempt"] == "1":
            first[key] += 1
        if key == "10.0.0.1:8001":
            await asyncio.Event().wait()  # hangs until cancelled
        clock.advance(0.01)
        return httpx.Response(200)

    t, engine = _service(handler, clock, INSTANCES[:2], hedge=HedgeConfig(after_ms=50))
    hung, fine = t.upstream(engine, httpx.URL("http://payments/")).instances or ()
    hung.latency_s, fine.latency_s = 0.03, 0.05  # it was the faster one until now
    hung.latency_at = fine.latency_at = clock.monotonic()
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(30):  # (within the retry budget: every call may hedge)
            assert (await client.get("http://payments/pay")).status_code == 200
            clock.advance(0.1)
    assert hung.outstanding == fine.outstanding == 0
    assert first["10.0.0.1:8001"] < 15  # not every call any more


async def test_an_instance_that_fails_fast_does_not_draw_more_calls() -> None:
    # An instance that answers 40 % of its calls with a quick 503 (below the breaker's
    # failure ratio, so never ejected) had its fast failures taken as fast answers: its
    # latency estimate was the lowest and it won most comparisons, drawing two thirds of
    # the calls' first attempts instead of a third, and twice the failures.
    import random

    clock = FakeClock()
    first: Counter[str] = Counter()
    coin = random.Random(1)

    async def handler(request: httpx.Request) -> httpx.Response:
        key = _key(request)
        if request.headers["x-fidelity-attempt"] == "1":
            first[key] += 1
        if key == "10.0.0.1:8001" and coin.random() < 0.4:
            clock.advance(0.001)
            return httpx.Response(503)
        clock.advance(0.02)
        return httpx.Response(200)

    t, _ = _service(handler, clock)
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(600):
            await client.get("http://payments/pay")
            clock.advance(0.005)
    assert first["10.0.0.1:8001"] < 280  # about a third (200), not two thirds (400)


# ---------------------------------------------------------------- resolver


async def test_instances_renamed_by_the_resolver_during_a_call_fail_no_retry() -> None:
    # The resolver is asked once per call, so another call may rename the instances
    # while this one is between attempts. The loop kept the list it started with and
    # looked its retry's instance up in it by position: an instance that list did not
    # have raised ValueError out of the transport (and left it counted as busy).
    clock = FakeClock()
    answer = [["http://10.0.0.1:8001", "http://10.0.0.2:8002"]]
    seen: list[str] = []
    client: httpx.AsyncClient

    async def handler(request: httpx.Request) -> httpx.Response:
        key = _key(request)
        if request.url.path == "/other":
            return httpx.Response(200)
        seen.append(key)
        if len(seen) == 1:  # meanwhile, another call learns a new instance list
            answer[0] = ["http://10.0.0.3:8003"]
            assert (await client.get("http://payments/other")).status_code == 200
        return httpx.Response(200 if len(seen) == 3 else 503)

    upstream = UpstreamConfig(host="payments", retry=RETRY)
    engine = Engine(
        Policy(upstreams=(upstream,)), clock=clock, rng=seeded_random(7), store=MemoryStore()
    )
    t = FidelityTransport(
        httpx.MockTransport(handler),
        engine=engine,
        telemetry=False,
        resolver=lambda host: answer[0] if host == "payments" else None,
    )
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 200
    assert seen[1:] == ["10.0.0.3:8003", "10.0.0.3:8003"]
    instances = t.upstream(engine, httpx.URL("http://payments/")).instances or ()
    assert all(i.outstanding == 0 for i in instances)


# ---------------------------------------------------------------- hedging


async def test_a_call_a_hedge_won_is_no_give_up_for_the_callers_answer() -> None:
    # The first attempt's loop gave up (an exhausted callee) while its hedge was still
    # out; the hedge then answered 200 and the call succeeded. The give-up had marked the
    # request as exhausted all the same, so a later, unrelated 500 of the app went out
    # with `x-fidelity-retry: exhausted` (its callers would not retry it) and the give-up's
    # Retry-After.
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from fidelity_mw import FidelityMiddleware

    clock = PoliteClock()
    primary_go, hedge_go = asyncio.Event(), asyncio.Event()

    async def upstream(request: httpx.Request) -> httpx.Response:
        if request.headers["x-fidelity-attempt"] == "1":
            await primary_go.wait()
            hedge_go.set()  # the hedge answers after this give-up
            return httpx.Response(503, headers={"x-fidelity-retry": "exhausted"})
        primary_go.set()
        await hedge_go.wait()
        return httpx.Response(200)

    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(upstream), telemetry=False)
    )
    called: list[int] = []

    async def route(request: Request) -> Response:
        response = await client.get("http://payments/pay")
        called.append(response.status_code)
        return Response("unrelated bug", status_code=500)

    cfg = UpstreamConfig(
        host="payments", instances=INSTANCES[:2], retry=RETRY, hedge=HedgeConfig(after_ms=50)
    )
    app = Starlette(routes=[Route("/", route)])
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(upstreams=(cfg,)),
        clock=clock,
        rng=seeded_random(3),
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/")
    await client.aclose()
    assert called == [200]
    assert response.status_code == 500
    assert "x-fidelity-retry" not in response.headers
    assert "retry-after" not in response.headers


# ---------------------------------------------------------------- closing a spent attempt


class _BrokenOnClose(httpx.AsyncByteStream, httpx.SyncByteStream):
    """A failed attempt's body whose connection breaks as it is closed."""

    def __iter__(self) -> Any:
        yield b"down"

    async def __aiter__(self) -> Any:
        yield b"down"

    def close(self) -> None:
        raise httpx.ReadError("connection reset while closing")

    async def aclose(self) -> None:
        raise httpx.ReadError("connection reset while closing")


def _plain_engine(clock: FakeClock) -> Engine:
    upstream = UpstreamConfig(host="*", retry=RETRY)
    return Engine(Policy(upstreams=(upstream,)), clock=clock, rng=seeded_random(7))


def _broken_then_fine(seen: list[int]) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        if len(seen) == 1:
            return httpx.Response(503, stream=_BrokenOnClose())
        return httpx.Response(200)

    return handler


async def test_a_failed_attempt_whose_connection_breaks_as_it_is_closed_is_still_retried() -> None:
    # The failed attempt's response is closed before the backoff; an error from that close
    # (its connection broke) failed the whole call instead of the retry going out.
    seen: list[int] = []
    t = FidelityTransport(
        httpx.MockTransport(_broken_then_fine(seen)),
        engine=_plain_engine(FakeClock()),
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://svc.internal/items")
    assert response.status_code == 200
    assert len(seen) == 2


def test_the_sync_transport_retries_it_too() -> None:
    from fidelity_mw import FidelitySyncTransport

    seen: list[int] = []
    t = FidelitySyncTransport(
        httpx.MockTransport(_broken_then_fine(seen)),
        engine=_plain_engine(FakeClock()),
        telemetry=False,
    )
    with httpx.Client(transport=t) as client:
        response = client.get("http://svc.internal/items")
    assert response.status_code == 200
    assert len(seen) == 2


class _Tracked(httpx.AsyncByteStream):
    """A response body that remembers being closed."""

    def __init__(self) -> None:
        self.closed = False

    async def __aiter__(self) -> Any:
        yield b"ok"

    async def aclose(self) -> None:
        self.closed = True


async def test_a_hedged_call_cancelled_as_its_losers_wind_down_closes_the_winner() -> None:
    # The winner is chosen, the losers are cancelled and wind down (a connection closing);
    # the caller is cancelled meanwhile (its client went away, its deadline passed). The
    # winner's response was then neither handed back nor closed: its connection stayed
    # checked out of the pool.
    import anyio

    clock = PoliteClock()
    winding_down, let_go = asyncio.Event(), asyncio.Event()
    bodies: list[_Tracked] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.headers["x-fidelity-attempt"] == "1":
            try:
                await asyncio.Event().wait()  # slow: the hedge wins
            except asyncio.CancelledError:
                with anyio.CancelScope(shield=True):  # its connection takes a while to close
                    winding_down.set()
                    await let_go.wait()
                raise
        body = _Tracked()
        bodies.append(body)
        return httpx.Response(200, stream=body)

    t, _ = _service(handler, clock, INSTANCES[:2], hedge=HedgeConfig(after_ms=50))
    async with httpx.AsyncClient(transport=t) as client:
        call = asyncio.ensure_future(client.get("http://payments/pay"))
        await winding_down.wait()
        call.cancel()  # the caller goes away while the loser winds down
        await asyncio.sleep(0)
        let_go.set()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert len(bodies) == 1
    assert bodies[0].closed


class _HeldClock(PoliteClock):
    """Sleeps of a second or more wait until the test lets them go (then move time):
    the shorter ones (a hedge delay) run meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.held = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        if seconds >= 1.0:
            await self.held.wait()
        await super().sleep(seconds)


async def test_no_hedge_goes_to_a_host_whose_429_paused_retries() -> None:
    # A 429's Retry-After pauses every retry to its host; the first attempt waits it out
    # before its retry. The hedge timer went on running meanwhile and sent a hedge (an
    # attempt like a retry) right into the pause, where it met the same 429.
    clock = _HeldClock()
    arrivals: list[tuple[float, str]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        arrivals.append((clock.monotonic(), request.headers["x-fidelity-attempt"]))
        if len(arrivals) == 1:
            return httpx.Response(429, headers={"retry-after": "1"})
        return httpx.Response(200)

    upstream = UpstreamConfig(host="*", retry=RETRY, hedge=HedgeConfig(after_ms=50))
    engine = Engine(
        Policy(upstreams=(upstream,)), clock=clock, rng=seeded_random(7), store=MemoryStore()
    )
    t = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    start = clock.monotonic()
    async with httpx.AsyncClient(transport=t) as client:
        call = asyncio.ensure_future(client.get("http://svc.internal/items"))
        for _ in range(100):  # the hedge delay passes while the retry waits out the 429
            await asyncio.sleep(0)
        clock.held.set()
        response = await call
    assert response.status_code == 200
    assert [n for _, n in arrivals] == ["1", "2"]  # the first attempt and its retry
    assert arrivals[1][0] - start >= 1.0  # after the pause
    decisions = response.extensions["fidelity_context"].decisions
    # Since the ninth round the failed first attempt stops the hedge timer (the retry
    # path owns the next attempt): no hedge is even asked for, so none is refused.
    assert not [d for d in decisions if d.reason == "no_hedge" or d.verdict == "hedge"]


async def test_a_call_with_the_most_attempts_and_hedges_numbers_every_attempt() -> None:
    # `x-fidelity-attempt` came from a table sized for the attempts alone (10 at most);
    # a hedged call counts its hedges too (up to 3 more), and the attempt past the table
    # raised IndexError out of the transport.
    from test_defects_review9_outbound import JumpClock, jumping

    clock = JumpClock()  # sleeps end in the order of their ends: the hedge delay first
    numbers: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        numbers.append(request.headers["x-fidelity-attempt"])
        # slow (a hedge is for a slow attempt: a quick failure goes to the retry path)
        await clock.sleep(0.2)
        return httpx.Response(503)

    upstream = UpstreamConfig(
        host="*",
        retry=RetryConfig(attempts=10, base_ms=100, max_ms=100, jitter="none"),
        hedge=HedgeConfig(after_ms=50, max_hedges=3),
        breaker=None,
    )
    engine = Engine(
        Policy(upstreams=(upstream,)), clock=clock, rng=seeded_random(7), store=MemoryStore()
    )
    t = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    async with jumping(clock), httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://svc.internal/items")
    assert response.status_code == 503
    assert numbers == [str(n) for n in range(1, 14)]
