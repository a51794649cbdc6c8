"""Failure modes against a real redis-server that the tests kill, pause and restart.

Bounded waits only: every loop that waits for recovery has a count and a deadline.
"""

from __future__ import annotations

import time

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import DecisionContext, FidelityMiddleware, Policy, RateLimit
from fidelity_mw.decide.breaker import FAILURE
from fidelity_mw.errors import StateUnavailable
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_server import PATIENT

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

LIMIT = LimitSpec("l", 0.001, 0.5, 1, False)  # 1000/s, burst 500
BREAKER = BreakerConfig(min_calls=1, consecutive_failures=1, open_s=30.0)


def tiny(url: str, on_error: str = "local") -> RedisStore:
    """A store with tiny timeouts, so a paused Redis is noticed in ~50 ms."""
    config = StateConfig(url=url, timeout_ms=50, connect_timeout_ms=50, on_error=on_error)  # type: ignore[arg-type]
    return RedisStore(config=config, rng=seeded_random(3))


def patient(url: str) -> RedisStore:
    """A store with timeouts a starved process does not reach, for faults that fail at
    once (a killed server refuses connections): there the timeout plays no part."""
    return RedisStore(config=StateConfig(url=url, **PATIENT), rng=seeded_random(3))


async def until_source(store: RedisStore, source: str, budget_s: float = 10.0) -> float:
    """Admit every 10 ms until a decision comes from `source`; return how long it took."""
    started = time.monotonic()
    for _ in range(int(budget_s / 0.01)):
        result = await store.admit(None, None, ["l|probe"], [LIMIT], time.monotonic())
        if result.source == source:
            return time.monotonic() - started
        await anyio.sleep(0.01)
    raise AssertionError(f"no {source!r} decision within {budget_s} s")


async def test_killed_redis_falls_back_locally_and_recovers(own_redis) -> None:  # type: ignore[no-untyped-def]
    store = patient(own_redis.url)
    try:
        first = await store.admit("route:/k", BREAKER, ["l|a"], [LIMIT], time.monotonic())
        assert first.source == "redis"
        own_redis.kill()
        ages = []
        for _ in range(3):
            result = await store.admit("route:/k", BREAKER, ["l|a"], [LIMIT], time.monotonic())
            assert result.source == "fallback"
            assert result.admitted
            ages.append(result.age_s)
            await anyio.sleep(0.01)
        assert ages == sorted(ages)  # age = time since the last good reply: it grows
        assert ages[0] >= 0.0
        assert not store.up
        # a fallback gate is recorded on the local breaker, never sent to Redis
        gate = result.gate
        assert gate is not None
        assert gate.epoch < 0
        state = await store.record("route:/k", BREAKER, gate, FAILURE, False, time.monotonic())
        assert state == "open"
        shed = await store.admit("route:/k", BREAKER, ["l|a"], [LIMIT], time.monotonic())
        assert shed.gate is not None
        assert shed.gate.verdict == "reject"
        assert shed.source == "fallback"

        own_redis.start()  # same port, empty
        took = await until_source(store, "redis")
        print(f"\nrecovered {took * 1000:.0f} ms after the restart")
        assert store.up
        assert store.stats.outages == 1
        assert len(store.stats.recoveries) == 1
        # the restarted server lost its script cache: recovered through NOSCRIPT
        assert store.stats.script_loads >= 2
        # back on Redis, the Redis breaker (never opened there) decides again
        back = await store.admit("route:/k", BREAKER, ["l|a"], [LIMIT], time.monotonic())
        assert back.source == "redis"
        assert back.gate is not None
        assert back.gate.verdict == "allow"
    finally:
        await store.aclose()


async def test_paused_redis_times_out_into_fallback_and_recovers(own_redis) -> None:  # type: ignore[no-untyped-def]
    store = tiny(own_redis.url)
    try:
        # connected and scripts loaded; on a busy machine that can take more than one
        # try at a 50 ms timeout, and such an outage is not the one this test counts
        await until_source(store, "redis")
        outages = store.stats.outages
        own_redis.pause()
        try:
            started = time.monotonic()
            result = await store.admit(None, None, ["l|a"], [LIMIT], time.monotonic())
            first_wait = time.monotonic() - started
            assert result.source == "fallback"
            assert result.admitted
            # later requests do not wait for the paused server at all
            started = time.monotonic()
            for _ in range(20):
                result = await store.admit(None, None, ["l|a"], [LIMIT], time.monotonic())
                assert result.source == "fallback"
            print(f"\nfirst request waited {first_wait * 1000:.0f} ms (timeout 50 ms); "
                  f"20 more took {(time.monotonic() - started) * 1000:.1f} ms")  # fmt: skip
        finally:
            own_redis.resume()
        took = await until_source(store, "redis")
        print(f"recovered {took * 1000:.0f} ms after SIGCONT")
        assert store.stats.outages == outages + 1
        assert store.stats.fallbacks >= 21
    finally:
        await store.aclose()


async def test_on_error_open_admits_and_closed_raises(own_redis) -> None:  # type: ignore[no-untyped-def]
    opened = tiny(own_redis.url, "open")
    closed = tiny(own_redis.url, "closed")
    own_redis.kill()
    try:
        result = await opened.admit("route:/o", BREAKER, ["l|a"], [LIMIT], 0.0)
        assert result.admitted
        assert result.source == "fallback"
        assert result.gate is not None
        # an outcome for an invented gate goes nowhere
        assert await opened.record("route:/o", BREAKER, result.gate, FAILURE, False, 0.0) == (
            "closed"
        )
        with pytest.raises(StateUnavailable):
            await closed.admit("route:/o", BREAKER, ["l|a"], [LIMIT], 0.0)
        with pytest.raises(StateUnavailable):
            await closed.admit("route:/o", BREAKER, ["l|a"], [LIMIT], 0.0)
    finally:
        await opened.aclose()
        await closed.aclose()


def _app(url: str, on_error: str) -> FidelityMiddleware:
    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    policy = Policy(
        state=StateConfig(url=url, on_error=on_error, timeout_ms=50, connect_timeout_ms=50),  # type: ignore[arg-type]
        rate_limits=(RateLimit(name="api", rate="1000/s", key="client_ip"),),
    )
    return FidelityMiddleware(Starlette(routes=[Route("/", ok)]), policy=policy, telemetry=False)


@pytest.mark.parametrize(("on_error", "status"), [("local", 200), ("open", 200), ("closed", 503)])
async def test_middleware_never_500s_when_redis_is_gone(own_redis, on_error, status) -> None:  # type: ignore[no-untyped-def]
    app = _app(own_redis.url, on_error)
    own_redis.kill()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        statuses = [(await client.get("/")).status_code for _ in range(5)]
    await app.engine.aclose()
    assert statuses == [status] * 5


async def test_a_decision_without_state_says_how_long_redis_has_been_gone(own_redis) -> None:  # type: ignore[no-untyped-def]
    """Under on_error = "closed" the refusal's record carries the time since Redis last
    answered (it said 0, as if the state were fresh), so a trace shows the outage's age."""
    seen: list[DecisionContext] = []

    class Keep:
        def start(self, ctx: DecisionContext, scope: object) -> None:
            return None

        def end(self, ctx: DecisionContext, scope: object, token: object) -> None:
            seen.append(ctx)

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    clock = FakeClock()
    policy = Policy(
        state=StateConfig(
            url=own_redis.url, on_error="closed", timeout_ms=50, connect_timeout_ms=50
        ),
        rate_limits=(RateLimit(name="api", rate="1000/s", key="client_ip"),),
    )
    app = FidelityMiddleware(
        Starlette(routes=[Route("/", ok)]), policy=policy, clock=clock, observer=Keep()
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        assert (await client.get("/")).status_code == 200  # Redis answered at 1000.0
        own_redis.kill()
        clock.advance(30.0)
        assert (await client.get("/")).status_code == 503
        clock.advance(12.5)
        assert (await client.get("/")).status_code == 503
    await app.engine.aclose()
    refusals = [d for ctx in seen[1:] for d in ctx.decisions if d.reason.startswith("state_error")]
    # the time since the last reply, at 1000.0 (the store's reconnect waits move the fake
    # clock on a little while it decides, so a little more than the request's own `at`)
    ages = [d.state_age_s for d in refusals]
    assert 30.0 <= ages[0] < 31.0
    assert 42.5 <= ages[1] < 44.0
