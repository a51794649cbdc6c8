"""Defects of the outbound side the ninth round fixed (retries, hedging, the retry budget).
Each test failed before its fix; time is a fake clock.

Hedging needs sleeps that end in the order of their deadlines (a 50 ms hedge delay before
a 200 ms answer), which `FakeClock.sleep` does not give (it moves time at once):
`JumpClock` waits each sleep out on the fake clock's timers, and `jumping` moves the clock
to the next timer whenever every task is waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelitySyncTransport, FidelityTransport
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.decide.budget import BudgetWindow
from fidelity_mw.engine import Engine
from fidelity_mw.policy import (
    BreakerConfig,
    HedgeConfig,
    Policy,
    RetryConfig,
    StateConfig,
    UpstreamConfig,
)
from fidelity_mw.state.local import LocalState as LocalOps
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio


class JumpClock(FakeClock):
    """A fake clock whose sleeps wait for the clock to reach their end (`jumping`)."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        woken = asyncio.Event()
        timer = self.call_later(max(0.0, seconds), woken.set)
        try:
            await woken.wait()
        finally:
            timer.cancelled = True

    def next_due(self) -> float | None:
        due = [at for at, _, timer in self._timers if not timer.cancelled]
        return min(due) if due else None


@contextlib.asynccontextmanager
async def jumping(clock: JumpClock) -> AsyncIterator[None]:
    """Move `clock` to its next timer whenever the other tasks have nothing left to do."""

    async def jump() -> None:
        while True:
            for _ in range(50):
                await asyncio.sleep(0)
            due = clock.next_due()
            if due is not None:
                clock.advance(max(0.0, due - clock.monotonic()))

    task = asyncio.ensure_future(jump())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _engine(clock: FakeClock, upstream: UpstreamConfig, store: Any = None) -> Engine:
    return Engine(
        Policy(upstreams=(upstream,)),
        clock=clock,
        rng=seeded_random(9),
        store=store if store is not None else MemoryStore(),
    )


# ---------------------------------------------------------------- 1: hedging a failed attempt


async def test_a_quick_failure_is_retried_after_its_backoff_not_hedged_at_once() -> None:
    # A quick 503 sent the first attempt into its backoff; the hedge timer went on and
    # fired during it, so the hedge was a retry without backoff: 4 upstream calls per
    # request to a failing host with the default 3 attempts.
    clock = JumpClock()
    calls: list[tuple[float, str]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append((clock.monotonic(), request.headers["x-fidelity-attempt"]))
        return httpx.Response(503)

    upstream = UpstreamConfig(host="*", hedge=HedgeConfig(after_ms=50))  # default retries
    t = FidelityTransport(
        httpx.MockTransport(handler), engine=_engine(clock, upstream), telemetry=False
    )
    async with jumping(clock), httpx.AsyncClient(transport=t) as client:
        for _ in range(5):
            calls.clear()
            response = await client.get("http://failing.internal/items")
            assert response.status_code == 503
            assert [n for _, n in calls] == ["1", "2", "3"]  # the attempts, no hedge
            decisions = response.extensions["fidelity_context"].decisions
            assert not [d for d in decisions if d.verdict == "hedge" or d.reason == "no_hedge"]
            clock.advance(1.0)


async def test_a_slow_retry_is_still_hedged_after_the_delay() -> None:
    # The hedge timer stops when the call's attempt fails and starts again, with the whole
    # delay, when its retry goes out: a slow retry gets its hedge.
    clock = JumpClock()
    calls: list[tuple[float, str]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        number = request.headers["x-fidelity-attempt"]
        calls.append((clock.monotonic(), number))
        if number == "1":
            return httpx.Response(503)  # at once
        if number == "2":
            await clock.sleep(10.0)  # the retry hangs
        return httpx.Response(200)

    upstream = UpstreamConfig(
        host="*", retry=RetryConfig(base_ms=100, jitter="none"), hedge=HedgeConfig(after_ms=50)
    )
    t = FidelityTransport(
        httpx.MockTransport(handler), engine=_engine(clock, upstream), telemetry=False
    )
    start = clock.monotonic()
    async with jumping(clock), httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://slow.internal/items")
    assert response.status_code == 200
    assert [n for _, n in calls] == ["1", "2", "3"]
    sent = [at - start for at, _ in calls]
    assert sent[1] == pytest.approx(0.1)  # the retry, after its backoff
    assert sent[2] == pytest.approx(0.15)  # its hedge, the delay after it
    hedges = [d for d in response.extensions["fidelity_context"].decisions if d.verdict == "hedge"]
    assert [d.details["attempt"] for d in hedges] == [3]


# ---------------------------------------------------------------- 2: a retry spent, not sent


def test_the_model_gives_a_retry_back_to_the_bucket_it_was_counted_in() -> None:
    cfg = RetryConfig(budget_ratio=0.0, budget_min_per_s=0.1, budget_window_s=10.0)  # 1 retry
    window = BudgetWindow(cfg)
    assert window.try_retry(100.0)
    assert not window.allows(100.5)
    assert window.refund(101.5, 1.5)  # spent at 100.0
    assert window.allows(101.5)
    assert not window.refund(101.5, 1.5)  # nothing left to give back
    assert window.try_retry(101.5)
    # once the bucket it was counted in has left the window, nothing comes back
    assert not window.refund(111.6, 10.1)
    assert window.allows(111.6)  # (it left the window by itself)
    # a retry counted in this window is not taken back from an older bucket
    assert window.try_retry(112.0)
    assert not window.refund(112.0, 5.0)  # spent 5 s ago: that bucket holds none
    assert window.refund(112.0, 0.0)


def test_a_retry_counted_at_a_buckets_start_comes_back_after_the_ring_turned() -> None:
    """The ring's bucket ends are sums, each rounded: stepped back from a later end, the
    start of the bucket a retry was counted in lies a few ulps after the instant it was
    counted at 1000.0 + 0.1 + 0.1 (found by the differential test). It still comes back."""
    cfg = RetryConfig(budget_ratio=0.0, budget_min_per_s=0.5, budget_window_s=2.0)  # 1 retry
    window = BudgetWindow(cfg)
    assert window.try_retry(1000.0)  # the ring's first bucket: [1000.0, 1000.2)
    now = 1000.0 + 0.1 + 0.1
    window.request(now)  # the ring turns: its end is 1000.2 + 0.2, rounded
    assert window.refund(now, now - 1000.0)
    assert window.totals(now) == (1, 0)


class CancelInBackoff(FakeClock):
    """Cancels the call's task when it starts its backoff sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.task: asyncio.Task[Any] | None = None

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        assert self.task is not None
        self.task.cancel()
        await asyncio.sleep(0)


def _budget(store: MemoryStore, key: str, now: float) -> tuple[int, int]:
    return store.budgets[key].totals(now)


async def test_a_retry_cancelled_in_its_backoff_gives_its_budget_back_and_says_so() -> None:
    clock = CancelInBackoff()
    store = MemoryStore()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    upstream = UpstreamConfig(host="api.internal", breaker=BreakerConfig(half_open_probes=1))
    engine = _engine(clock, upstream, store)
    t = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    ctx = DecisionContext(engine, "GET /", "GET", clock.monotonic())
    ctx.deadline_at = clock.monotonic() + 30.0
    token = _CURRENT.set(ctx)
    try:
        async with httpx.AsyncClient(transport=t) as client:
            clock.task = asyncio.ensure_future(client.get("http://api.internal/x"))
            with pytest.raises(asyncio.CancelledError):
                await clock.task
    finally:
        _CURRENT.reset(token)
    assert _budget(store, "budget:api.internal", clock.monotonic()) == (1, 0)  # given back
    tail = [(d.layer, d.verdict, d.reason, d.details) for d in ctx.decisions][-2:]
    assert tail == [
        ("retry", "retry", "status_503", {"attempt": 2, "delay_ms": tail[0][3]["delay_ms"]}),
        ("budget", "refund", "retry_not_sent", {"attempt": 2, "why": "cancelled"}),
    ]


def test_a_retry_whose_deadline_passes_in_its_backoff_gives_its_budget_back() -> None:
    clock = FakeClock()
    store = MemoryStore()
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        # the upstream asks for a wait that ends just past the deadline
        return httpx.Response(503, headers={"retry-after": "1"})

    upstream = UpstreamConfig(host="api.internal", retry=RetryConfig(base_ms=1, max_ms=1))
    engine = _engine(clock, upstream, store)

    t = FidelitySyncTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    ctx = DecisionContext(engine, "GET /", "GET", clock.monotonic())
    ctx.deadline_at = clock.monotonic() + 1.5
    token = _CURRENT.set(ctx)
    real_sleep = clock.sleep_sync

    def late_sleep(seconds: float) -> None:
        real_sleep(seconds + 0.6)  # the backoff overran (a busy loop, a slow thread)

    clock.sleep_sync = late_sleep  # type: ignore[method-assign]
    try:
        with httpx.Client(transport=t) as client, pytest.raises(httpx.TimeoutException):
            client.get("http://api.internal/x")
    finally:
        _CURRENT.reset(token)
    assert calls == 1
    assert _budget(store, "budget:api.internal", clock.monotonic()) == (1, 0)
    reasons = [(d.layer, d.verdict, d.reason) for d in ctx.decisions]
    assert reasons[-3:] == [
        ("retry", "retry", "status_503"),
        ("budget", "refund", "retry_not_sent"),
        ("deadline", "give_up", "deadline"),
    ]
    assert ctx.decisions[-2].details["why"] == "deadline"


async def test_a_sent_retry_keeps_its_budget_spent() -> None:
    clock = FakeClock()
    store = MemoryStore()
    statuses = [503, 200]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(statuses.pop(0))

    upstream = UpstreamConfig(host="api.internal")
    t = FidelityTransport(
        httpx.MockTransport(handler), engine=_engine(clock, upstream, store), telemetry=False
    )
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://api.internal/x")
    assert response.status_code == 200
    assert _budget(store, "budget:api.internal", clock.monotonic()) == (1, 1)
    decisions = response.extensions["fidelity_context"].decisions
    assert not [d for d in decisions if d.verdict == "refund"]


# ---------------------------------------------------------------- 4: a retry's state age


async def test_a_retry_is_recorded_when_decided_and_its_backoff_is_no_state_age() -> None:
    # The retry's record was made after its backoff with the backoff added to its state
    # age: a retry after a 2 s Retry-After on memory state read as decided on 2 s old
    # state (stale by the `Decision.is_stale` rule, and in the state-age histogram).
    clock = FakeClock()
    statuses = [(503, "2"), (200, None)]

    def handler(request: httpx.Request) -> httpx.Response:
        status, after = statuses.pop(0)
        return httpx.Response(status, headers={"retry-after": after} if after else {})

    upstream = UpstreamConfig(host="api.internal")
    t = FidelityTransport(
        httpx.MockTransport(handler), engine=_engine(clock, upstream), telemetry=False
    )
    start = clock.monotonic()
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://api.internal/x")
    assert response.status_code == 200
    decisions = response.extensions["fidelity_context"].decisions
    (retry,) = [d for d in decisions if d.verdict == "retry"]
    assert retry.state_source == "memory"
    assert retry.state_age_s == 0.0
    assert not retry.is_stale
    assert retry.at == start  # decided right after the 503, before the 2 s wait
    assert retry.details["delay_ms"] >= 2000.0


# ---------------------------------------------------------------- 2, on a real redis-server


ONE_RETRY = RetryConfig(budget_ratio=0.0, budget_min_per_s=0.1, budget_window_s=10.0)


@pytest.mark.redis
async def test_redis_gives_a_retry_back_while_its_bucket_is_in_the_window(
    redis_url: str, redis_clock: Any
) -> None:
    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.state.tiered import TieredStore

    for url in (redis_url, "tiered+" + redis_url):
        config = StateConfig(url=url, timeout_ms=5_000, connect_timeout_ms=5_000)
        store = (TieredStore if url.startswith("tiered") else RedisStore)(
            config=config, rng=seeded_random(3)
        )
        key = f"budget:{url[:6]}"
        redis_clock.set(1_000.0)
        try:

            async def retry(now: float, store: Any = store, key: str = key) -> bool:
                _, allowed, source, _ = await store.outbound_gate(
                    None, None, key, ONE_RETRY, True, now
                )
                assert source == "redis"
                return allowed

            assert await retry(1_000.0)
            assert not await retry(1_000.0)  # one retry per window
            redis_clock.set(1_001.5)
            await store.budget_refund(key, ONE_RETRY, "redis", 1.5, 1_001.5)
            assert await retry(1_001.5)  # given back: one more
            assert not await retry(1_001.5)
            redis_clock.set(1_011.55)  # 1001.5's bucket [1001.5, 1002.5) is in the window
            await store.budget_refund(key, ONE_RETRY, "redis", 10.05, 1_011.55)
            # ... 1000.0's left it: a refund of that one gives nothing back
            await store.budget_refund(key, ONE_RETRY, "redis", 11.55, 1_011.55)
            assert await retry(1_011.55)
            assert not await retry(1_011.55)
        finally:
            await store.aclose()


@pytest.mark.redis
async def test_a_retry_cancelled_in_its_backoff_gives_its_budget_back_in_redis(
    redis_url: str,
) -> None:
    import redis as redis_sync

    from fidelity_mw.state.redis import RedisStore, hashed_key

    clock = CancelInBackoff()
    config = StateConfig(url=redis_url, timeout_ms=5_000, connect_timeout_ms=5_000)
    store = RedisStore(config=config, rng=seeded_random(3))
    upstream = UpstreamConfig(host="refund.internal", retry=ONE_RETRY)
    engine = _engine(clock, upstream, store)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    t = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    ctx = DecisionContext(engine, "GET /", "GET", clock.monotonic())
    ctx.deadline_at = clock.monotonic() + 30.0
    token = _CURRENT.set(ctx)
    client = redis_sync.Redis.from_url(redis_url)
    try:
        async with httpx.AsyncClient(transport=t) as http:
            clock.task = asyncio.ensure_future(http.get("http://refund.internal/x"))
            with pytest.raises(asyncio.CancelledError):
                await clock.task
        rq, rt = client.hmget(hashed_key(store.prefix, "bu", "budget:refund.internal"), "rq", "rt")
    finally:
        _CURRENT.reset(token)
        client.close()
        await store.aclose()
    assert sum(map(int, rq.split(b","))) == 1
    assert sum(map(int, rt.split(b","))) == 0  # spent by the gate, given back
    refund = ctx.decisions[-1]
    assert (refund.layer, refund.verdict, refund.reason, refund.state_source) == (
        "budget",
        "refund",
        "retry_not_sent",
        "redis",
    )


class CancelScopeInBackoff(FakeClock):
    """Cancels an anyio scope (level-triggered: every later await of the call is cancelled
    too, as under the middleware's deadline) when the call starts its backoff sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.scope: Any = None

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.scope.cancel()
        await asyncio.sleep(0)


@pytest.mark.redis
async def test_a_retry_cancelled_by_a_scope_gives_back_its_probe_slot_and_budget_in_redis(
    redis_url: str, redis_clock: Any
) -> None:
    # Cancelled by an anyio scope, every await after the cancellation is cancelled too:
    # the store calls that give back the retry's probe slot and its budget failed at once,
    # so the slot stayed taken until its lease ran out (the breaker admitting no probe
    # meanwhile) and the budget stayed spent.
    import anyio
    import redis as redis_sync

    from fidelity_mw.state.redis import RedisStore, hashed_key

    clock = CancelScopeInBackoff()
    config = StateConfig(url=redis_url, timeout_ms=5_000, connect_timeout_ms=5_000)
    store = RedisStore(config=config, rng=seeded_random(3))
    breaker = BreakerConfig(
        min_calls=1, consecutive_failures=1, open_min_s=1.0, open_s=1.0, open_jitter=0.0,
        half_open_probes=1, probe_lease_s=30.0,
    )  # fmt: skip
    upstream = UpstreamConfig(host="127.0.0.1", retry=ONE_RETRY, breaker=breaker)
    engine = _engine(clock, upstream, store)
    refused = {"x-fidelity-decided-by": "breaker"}  # the callee's own refusal: no failure
    answers = [httpx.Response(503), httpx.Response(503, headers=refused)]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    t = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    client = redis_sync.Redis.from_url(redis_url)
    url = "http://127.0.0.1:9/x"
    try:
        async with httpx.AsyncClient(transport=t) as http:
            redis_clock.set(1_000.0)
            assert (await http.get(url)).status_code == 503  # opens the breaker
            redis_clock.set(1_002.0)  # half-open: one probe
            ctx = DecisionContext(engine, "GET /", "GET", clock.monotonic())
            ctx.deadline_at = clock.monotonic() + 30.0
            token = _CURRENT.set(ctx)
            try:
                with anyio.CancelScope() as scope:
                    clock.scope = scope
                    await http.get(url)  # a probe, ignored; its retry takes the probe slot
            finally:
                _CURRENT.reset(token)
        _, probes = store.breaker_keys("upstream:127.0.0.1:9")
        held = client.zcard(probes)
        rt = client.hget(hashed_key(store.prefix, "bu", "budget:127.0.0.1:9"), "rt")
    finally:
        client.close()
        await store.aclose()
    assert scope.cancelled_caught
    # (one probe: since review 46 the retry gives its probe slot back before its backoff
    # and takes the gate again when it goes out, which this cancelled retry never did)
    assert [d.reason for d in ctx.decisions if d.layer == "breaker"] == ["half_open_probe"]
    assert held == 0  # the retry's probe slot was given back
    assert sum(map(int, rt.split(b","))) == 0  # and its retry


# ---------------------------------------------------------------- 3: whose 429 pause


SERVICE = ("http://10.0.0.1:8001", "http://10.0.0.2:8002", "http://10.0.0.3:8003")


async def test_one_instances_429_pauses_that_instance_not_the_service() -> None:
    # A 429 with Retry-After from one instance paused retries to the whole logical
    # service: another call's retry, which would go to another instance, waited it out.
    clock = JumpClock()
    seen: list[tuple[float, str, str]] = []  # (time, instance, attempt)

    async def handler(request: httpx.Request) -> httpx.Response:
        where = f"{request.url.host}:{request.url.port}"
        seen.append((clock.monotonic(), where, request.headers["x-fidelity-attempt"]))
        if len(seen) == 1:
            return httpx.Response(429, headers={"retry-after": "5"})  # that instance is busy
        if len(seen) == 2:
            return httpx.Response(503)  # the second call's first attempt
        return httpx.Response(200)

    upstream = UpstreamConfig(host="payments", instances=SERVICE)
    engine = _engine(clock, upstream)
    t = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    start = clock.monotonic()

    async def later() -> httpx.Response:
        await clock.sleep(0.01)
        return await client.get("http://payments/pay")

    async with jumping(clock), httpx.AsyncClient(transport=t) as client:
        first, second = await asyncio.gather(client.get("http://payments/pay"), later())
    assert first.status_code == second.status_code == 200
    busy = seen[0][1]
    retried = [(at - start, where) for at, where, n in seen[2:] if n == "2"]
    # the second call's retry goes out after its own backoff (at most 100 ms), not after
    # the first instance's 5 s, and not to the paused instance; so does the first call's
    # (out19: the Retry-After it was given pauses that instance, the call goes elsewhere)
    assert len(retried) == 2
    for at, where in retried:
        assert at <= 0.01 + 0.1 + 1e-9
        assert where != busy
    plan = t.upstream(engine, httpx.URL("http://payments/"))
    assert plan.paused_until == 0.0  # the service is not paused: one instance is


async def test_a_full_table_of_upstream_plans_keeps_the_services_and_the_pauses() -> None:
    # At 1024 hosts the table of upstream plans was cleared: a service's balancer state
    # (its instances' load, latency, breaker states) and every 429 pause went with it.
    clock = FakeClock()
    upstream = UpstreamConfig(host="payments", instances=SERVICE)
    engine = _engine(clock, upstream)
    t = FidelityTransport(httpx.MockTransport(lambda r: httpx.Response(200)), engine=engine)
    service = t.upstream(engine, httpx.URL("http://payments/"))
    instances = service.instances
    assert instances is not None
    instances[0].latency_s = 0.25
    paused = t.upstream(engine, httpx.URL("http://busy.internal/"))
    paused.paused_until = clock.monotonic() + 10.0
    for n in range(1_100):  # a client calling many hosts
        t.upstream(engine, httpx.URL(f"http://host-{n}.internal/"))
    assert t.upstream(engine, httpx.URL("http://payments/")) is service
    assert service.instances is instances
    assert instances[0].latency_s == 0.25
    assert t.upstream(engine, httpx.URL("http://busy.internal/")) is paused
    assert len(t._upstreams) <= 1_024


# ---------------------------------------------------------------- 5: learned open, half-open


class SharedStore(MemoryStore):
    """State another process shares, as Redis is: no in-process twins, so the balancer
    knows an instance's breaker only from the gates it was answered."""

    gate_now = None  # type: ignore[assignment]
    outbound_gate_now = None  # type: ignore[assignment]
    outbound_begin_now = None  # type: ignore[assignment]
    record_now = None  # type: ignore[assignment]

    async def outbound_gate(self, *args: Any) -> Any:
        return (*LocalOps.outbound_gate_now(self, *args), "redis", 0.0)

    async def record(self, *args: Any) -> str:
        return LocalOps.record_now(self, *args)


async def test_an_instance_rejected_half_open_is_asked_again_soon() -> None:
    # A half-open rejection (another process holds the probe slot) told the balancer "open
    # for the probe lease's wait" (up to open_s, 5 s): when that process's probe closed the
    # breaker a moment later, this one kept the instance ejected for seconds.
    clock = FakeClock()
    store = SharedStore()
    breaker = BreakerConfig(
        min_calls=1, consecutive_failures=1, open_min_s=0.5, open_s=5.0, open_jitter=0.0,
        half_open_probes=1,
    )  # fmt: skip
    upstream = UpstreamConfig(host="payments", instances=SERVICE, breaker=breaker)
    engine = _engine(clock, upstream, store)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host}:{request.url.port}")
        return httpx.Response(200)

    t = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    plan = t.upstream(engine, httpx.URL("http://payments/"))
    assert plan.instances is not None
    fast = plan.instances[0]
    for instance in plan.instances:  # the first instance is the fastest: p2c prefers it
        instance.latency_s, instance.latency_at = (0.001 if instance is fast else 0.5), 1e9
    key = fast.breaker_key
    # the other process: its failure opens the breaker; once open, it takes the probe
    now = clock.monotonic()
    gate, _ = LocalOps.outbound_gate_now(store, key, breaker, None, None, False, now)
    LocalOps.record_now(store, key, breaker, gate, "failure", False, now)
    clock.advance(0.6)
    probe, _ = LocalOps.outbound_gate_now(store, key, breaker, None, None, False, now + 0.6)
    assert probe.verdict == "probe"
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(10):  # until this process's balancer meets the half-open breaker
            await client.get("http://payments/pay")
            if fast.open_until > clock.monotonic():
                break
        assert fast.open_until > clock.monotonic()
        # the other process's probe succeeds: closed
        LocalOps.record_now(store, key, breaker, probe, "success", False, clock.monotonic())
        clock.advance(1.0)
        seen.clear()
        for _ in range(10):
            await client.get("http://payments/pay")
    assert fast.key in seen  # back in rotation within the shortest open time


# ---------------------------------------------------------------- cancellation paths


class SlowRecord(SharedStore):
    """Its `record` awaits (a round trip), where a cancelled scope cancels it."""

    async def record(self, *args: Any) -> str:
        await asyncio.sleep(0)
        return await super().record(*args)


async def test_a_probes_outcome_is_recorded_when_the_call_is_cancelled_as_it_answers() -> None:
    # The caller went away (an anyio scope cancelled: every later await of the call is
    # cancelled) just as the half-open probe answered: its outcome never reached the store,
    # so the breaker stayed half-open with the slot taken until the probe lease ran out
    # (30 s by default), refusing every call meanwhile, though the upstream was back.
    import anyio

    clock = FakeClock()
    store = SlowRecord()
    breaker = BreakerConfig(
        min_calls=1, consecutive_failures=1, open_min_s=0.5, open_s=5.0, open_jitter=0.0,
        half_open_probes=1,
    )  # fmt: skip
    upstream = UpstreamConfig(host="api.internal", breaker=breaker)
    engine = _engine(clock, upstream, store)
    key = "upstream:api.internal"
    gate, _ = LocalOps.outbound_gate_now(store, key, breaker, None, None, False, 1_000.0)
    LocalOps.record_now(store, key, breaker, gate, "failure", False, 1_000.0)  # open
    clock.advance(1.0)
    scope = anyio.CancelScope()

    def handler(request: httpx.Request) -> httpx.Response:
        scope.cancel()  # the caller is gone as the answer comes
        return httpx.Response(200)

    t = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        with scope:
            await client.get("http://api.internal/x")
    state = store.breakers[key]
    assert (state.state, len(state.probes)) == ("closed", 0)  # the probe's success counted


def test_the_sync_transport_runs_on_a_store_that_gives_no_budget_back() -> None:
    # A store of its own (no `budget_refund`, no `budget_refund_sync`): the sync transport
    # asks for the three operations it may need per call; it must not need the third.
    class OwnStore(MemoryStore):
        outbound_gate_now = None  # type: ignore[assignment]

        @property
        def budget_refund(self) -> Any:  # as if it had none
            raise AttributeError("budget_refund")

        def outbound_gate_sync(self, *args: Any) -> Any:
            return (*LocalOps.outbound_gate_now(self, *args), "redis", 0.0)

        def record_sync(self, *args: Any) -> str:
            return LocalOps.record_now(self, *args)

    clock = FakeClock()
    statuses = [503, 200]
    engine = _engine(clock, UpstreamConfig(host="api.internal"), OwnStore())
    t = FidelitySyncTransport(
        httpx.MockTransport(lambda r: httpx.Response(statuses.pop(0))),
        engine=engine,
        telemetry=False,
    )
    with httpx.Client(transport=t) as client:
        assert client.get("http://api.internal/x").status_code == 200
