"""Every gate the outbound layer takes is given back on every exit that makes no attempt,
and the sync transport has a working Redis path outside any event loop (issue 12: #9, #15).

Both transports, memory and Redis state (a real redis-server).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelitySyncTransport, FidelityTransport
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.decide.breaker import HALF_OPEN
from fidelity_mw.engine import Engine
from fidelity_mw.errors import DeadlineExceeded
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, StateConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random

URL = "http://svc.internal/x"
KEY = "upstream:svc.internal"
# One failure opens it; one probe at a time; a leaked probe would hold its slot for 30 s.
BREAKER = BreakerConfig(
    consecutive_failures=1, open_s=0.05, open_jitter=0.0, half_open_probes=1, probe_lease_s=30.0
)


def make_policy(url: str = "memory://", *, attempts: int = 3) -> Policy:
    retry = RetryConfig(attempts=attempts, base_ms=1, max_ms=2)
    return Policy(
        state=StateConfig(url=url),
        upstreams=(UpstreamConfig(host="*", retry=retry, breaker=BREAKER),),
    )


class Answers:
    """The upstream: answers in order, then the last one forever."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        status = self.statuses[min(self.calls, len(self.statuses)) - 1]
        return httpx.Response(status)


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def engine(kind: str, request: pytest.FixtureRequest) -> Iterator[Engine]:
    clock = FakeClock()
    if kind == "memory":
        yield Engine(make_policy(), clock=clock, store=MemoryStore(rng=seeded_random(1)))
        return
    url = request.getfixturevalue("redis_url")
    policy = make_policy(url)
    store = RedisStore(config=policy.state, rng=seeded_random(1))
    yield Engine(policy, clock=clock, store=store)
    link = store._sync_link
    if link is not None:
        link.close()


def open_then_wait(engine: Engine, call: Any) -> None:
    """Open the breaker with one failed call, then let its open time pass."""
    assert call().status_code == 503
    if isinstance(engine.store, MemoryStore):
        engine.clock.advance(0.06)  # type: ignore[attr-defined]
    else:
        time.sleep(0.06)  # Redis decides on its own TIME


class InContext:
    def __init__(self, engine: Engine, deadline_in: float | None) -> None:
        now = engine.clock.monotonic()
        self.ctx = DecisionContext(engine, "/route", "GET", now)
        if deadline_in is not None:
            self.ctx.deadline_at = now + deadline_in

    def __enter__(self) -> DecisionContext:
        self.token = _CURRENT.set(self.ctx)
        return self.ctx

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self.token)


# ---------------------------------------------------------------- #9: deadline already passed


def test_sync_deadline_passed_leaks_no_probe_slot(engine: Engine) -> None:
    up = Answers(503, 200)
    t = FidelitySyncTransport(httpx.MockTransport(up), engine=engine, telemetry=False)
    with httpx.Client(transport=t) as client:
        open_then_wait(engine, lambda: client.get(URL))
        with InContext(engine, -1.0), pytest.raises(DeadlineExceeded):
            client.get(URL)
        # the half-open breaker's one probe slot is free: this call is the probe
        with InContext(engine, 5.0) as ctx:
            assert client.get(URL).status_code == 200
    assert up.calls == 2
    assert [d.verdict for d in ctx.decisions if d.layer == "breaker"] == ["probe"]


@pytest.mark.anyio
async def test_async_deadline_passed_leaks_no_probe_slot(engine: Engine) -> None:
    up = Answers(503, 200)
    t = FidelityTransport(httpx.MockTransport(up), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        assert (await client.get(URL)).status_code == 503
        if isinstance(engine.store, MemoryStore):
            engine.clock.advance(0.06)  # type: ignore[attr-defined]
        else:
            await asyncio.sleep(0.06)
        with InContext(engine, -1.0), pytest.raises(DeadlineExceeded):
            await client.get(URL)
        with InContext(engine, 5.0) as ctx:
            assert (await client.get(URL)).status_code == 200
    assert up.calls == 2
    assert [d.verdict for d in ctx.decisions if d.layer == "breaker"] == ["probe"]
    if isinstance(engine.store, RedisStore):
        await engine.store.aclose()


# ---------------------------------------------------------------- #9: cancelled during backoff


class CancelledInSleep(FakeClock):
    async def sleep(self, seconds: float) -> None:
        raise asyncio.CancelledError

    def sleep_sync(self, seconds: float) -> None:
        raise KeyboardInterrupt


def cancel_engine() -> Engine:
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2)
    breaker = BreakerConfig(min_calls=100, half_open_probes=1)  # our failure opens nothing
    policy = Policy(upstreams=(UpstreamConfig(host="*", retry=retry, breaker=breaker),))
    engine = Engine(policy, clock=CancelledInSleep(), store=MemoryStore(rng=seeded_random(1)))
    _half_open_at_retry(engine)
    return engine


def _probe_slots(engine: Engine) -> int:
    store = engine.store
    assert isinstance(store, MemoryStore)
    return len(store.breakers[KEY].probes)


@pytest.mark.anyio
async def test_async_cancelled_in_backoff_gives_the_probe_slot_back() -> None:
    engine = cancel_engine()
    up = Answers(503, 200)
    t = FidelityTransport(httpx.MockTransport(up), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        with pytest.raises(asyncio.CancelledError):
            await client.get(URL)
    assert up.calls == 1
    assert _probe_slots(engine) == 0


def test_sync_interrupted_in_backoff_gives_the_probe_slot_back() -> None:
    engine = cancel_engine()
    up = Answers(503, 200)
    t = FidelitySyncTransport(httpx.MockTransport(up), engine=engine, telemetry=False)
    with httpx.Client(transport=t) as client, pytest.raises(KeyboardInterrupt):
        client.get(URL)
    assert up.calls == 1
    assert _probe_slots(engine) == 0


def _half_open_at_retry(engine: Engine) -> None:
    """Between our attempts the breaker goes half-open: the retry's gate is its one probe."""
    cfg = engine.policy.upstreams[0].breaker
    assert cfg is not None
    store = engine.store

    def hook(*args: Any) -> Any:
        if args[4]:
            assert isinstance(store, MemoryStore)
            store.breaker_state(KEY, cfg).force(HALF_OPEN, args[5], seeded_random(0))
        return MemoryStore.outbound_gate_now(store, *args)  # type: ignore[arg-type]

    store.outbound_gate_now = hook  # type: ignore[attr-defined]


# ---------------------------------------------------------------- #15: sync on Redis, no loop


@pytest.mark.parametrize("scheme", ["", "tiered+"])
def test_sync_transport_on_redis_works_in_a_plain_thread(redis_url: str, scheme: str) -> None:
    """Regression (issue 12, #15): outside an AnyIO worker thread the sync transport's
    Redis operations failed: `on_error = "closed"` refused every call."""
    policy = Policy(
        state=StateConfig(url=scheme + redis_url, on_error="closed"),
        upstreams=(UpstreamConfig(host="*", retry=RetryConfig(base_ms=1, max_ms=2)),),
    )
    tiered = TieredStore(config=policy.state, rng=seeded_random(1)) if scheme else None
    store = tiered.exact if tiered is not None else RedisStore(config=policy.state)
    engine = Engine(policy, clock=FakeClock(), store=tiered or store)
    up = Answers(503, 200)
    results: list[Any] = []

    def plain_thread() -> None:
        t = FidelitySyncTransport(httpx.MockTransport(up), engine=engine, telemetry=False)
        with httpx.Client(transport=t) as client:
            try:
                results.append(client.get(URL))
            except Exception as exc:  # pragma: no cover - the defect
                results.append(exc)

    thread = threading.Thread(target=plain_thread)
    thread.start()
    thread.join(10.0)
    try:
        (response,) = results
        assert isinstance(response, httpx.Response)
        assert response.status_code == 200
        ctx = response.extensions["fidelity_context"]
        assert {d.state_source for d in ctx.decisions if d.layer == "retry"} == {"redis"}
        # one round trip per attempt, as the async transport makes
        assert store.stats.round_trips - store.stats.script_loads == 2 + 1  # 2 gates, 1 record
    finally:
        assert store._sync_link is not None
        store._sync_link.close()


def test_sync_transport_on_unreachable_redis_decides_locally() -> None:
    policy = Policy(state=StateConfig(url="redis://127.0.0.1:1/0", timeout_ms=50))
    store = RedisStore(config=policy.state, rng=seeded_random(1))
    engine = Engine(policy, clock=FakeClock(), store=store)
    t = FidelitySyncTransport(httpx.MockTransport(Answers(200)), engine=engine, telemetry=False)
    with httpx.Client(transport=t) as client:
        response = client.get(URL)
    assert response.status_code == 200
    sources = {d.state_source for d in response.extensions["fidelity_context"].decisions}
    assert sources == {"fallback"}
