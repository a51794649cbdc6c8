"""Tiered state's synchronous fast path: `admit_now` / `record_now` on the cache.

A request that the cache can decide (a fresh cached breaker, slices holding the
units or known empty) is decided without an await; one that needs Redis (a
lease, a breaker refresh, a half-open probe, the failure mode) gets None from
the fast path, which then changed nothing, and the caller awaits the coroutine.
Counted, never timed: local decisions on a FakeClock (it only moves when a test
says so), leases from a real redis-server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.decide.breaker import CLOSED, FAILURE, IGNORED, OPEN, SUCCESS, Gate
from fidelity_mw.decide.gcra import LimitVerdict
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import InboundResult, LimitSpec
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ROOMY = LimitSpec("r", 60.0, 60.0 * 100_000, 1, False)  # never the limit here
SMALL = LimitSpec("s", 60.0, 60.0 * 8, 1, False)  # 8 units, slices of 2; no refill in a test
BREAKER = BreakerConfig()


class Counting(TieredStore):
    """Counts which path answered: the fast path, or the awaited coroutine."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answered_now = 0
        self.awaited_admit = 0
        self.awaited_record: list[Gate] = []

    def admit_now(self, *args: Any) -> InboundResult | None:
        result = super().admit_now(*args)
        self.answered_now += result is not None
        return result

    async def admit(self, *args: Any) -> InboundResult:
        self.awaited_admit += 1
        return await super().admit(*args)

    async def record(self, *args: Any) -> str:
        self.awaited_record.append(args[2])
        return await super().record(*args)


def tiered(url: str, clock: FakeClock, sync_ms: int = 100) -> Counting:
    config = StateConfig(url="tiered+" + url, sync_interval_ms=sync_ms, **PATIENT, **QUIET)
    return Counting(config=config, rng=seeded_random(3), clock=clock)


def trips(store: TieredStore) -> int:
    """Script calls, less the EVALs that loaded a script the server did not have."""
    return store.round_trips - store.exact.stats.script_loads


class App:
    """A route answering `status` (pure ASGI)."""

    def __init__(self) -> None:
        self.status = 200

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def get(app: Any) -> int:
    scope = http_scope(
        "/hello",
        headers=[(b"host", b"api.example")],
        client=("10.0.0.1", 5000),
        server=("127.0.0.1", 8000),
    )
    statuses = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses[0]


def middleware(store: TieredStore, clock: FakeClock, app: App, **policy: Any) -> Any:
    from fidelity_mw import RateLimit

    policy.setdefault(
        "rate_limits", (RateLimit(name="per-client", rate="100000/second", key="client_ip"),)
    )
    return FidelityMiddleware(
        app, policy=Policy(**policy), clock=clock, store=store, telemetry=False
    )


async def test_the_middleware_decides_on_the_cache_without_awaiting(redis_url: str) -> None:
    """After the first request's lease, every request is decided and recorded in process:
    no `admit` or `record` coroutine, no round trip; the outcomes counted on the cached
    breaker. Once the cached breaker is older than a sync interval, a request waits for
    its refresh again."""
    clock = FakeClock()
    store = tiered(redis_url, clock)
    app = middleware(store, clock, App())
    try:
        statuses = [await get(app) for _ in range(40)]
        assert statuses == [200] * 40
        # Only the requests that found the slice empty awaited (each one lease: the
        # slice doubles with the demand seen, 2, 4, 8, ... units); the rest were
        # decided in process.
        leases = store.awaited_admit
        assert 1 <= leases <= 6
        assert trips(store) == leases
        assert store.answered_now == 40 - leases
        assert store.stats.requests == 40
        assert store.stats.local == 40 - leases
        assert store.awaited_record == []
        [cached] = store.breakers.values()
        assert cached.calls == 40  # every success counted locally, sent with the next sync
        # Quiet for a sync interval: the store's timer syncs without a request (flt44:
        # the 40 waited for the next request before), and gives the idle slice back.
        clock.advance(0.15)
        task = store._sync_task
        assert task is not None
        await asyncio.wait_for(task, 60)
        assert trips(store) == leases + 1
        assert cached.calls == 0
        assert not store.slices
        clock.advance(0.15)  # nothing held: no sync; the cached breaker is now too old
        assert trips(store) == leases + 1
        assert await get(app) == 200
        assert store.awaited_admit == leases + 1
        assert trips(store) == leases + 2  # its refresh (and the slice's lease, one call)
        assert cached.calls == 1  # this one counted anew
    finally:
        await store.aclose()


async def test_the_fast_path_falls_back_when_the_slice_is_empty(redis_url: str) -> None:
    """A slice that runs dry sends the next request to `admit` (which leases), and the
    fast path's refusal changed nothing; once the bucket is known empty, the fast path
    answers the cached refusal itself, without Redis."""
    clock = FakeClock()
    store = tiered(redis_url, clock)
    now = clock.monotonic()
    admitted = leases = refused_now = 0
    try:
        for _ in range(30):
            result = store.admit_now(None, None, ["s|k"], [SMALL], now)
            if result is None:
                sl = store.slices.get("s|k")
                before = (store.stats.requests, trips(store))
                if sl is not None:
                    assert sl.tokens < SMALL.cost  # empty, and not known to stay empty
                    assert sl.blocked_until <= now
                    slice_before = (sl.tokens, sl.demand, sl.used_at)
                    assert store.admit_now(None, None, ["s|k"], [SMALL], now) is None
                    assert (sl.tokens, sl.demand, sl.used_at) == slice_before
                assert (store.stats.requests, trips(store)) == before
                result = await store.admit(None, None, ["s|k"], [SMALL], now)
                assert trips(store) == before[1] + 1
                leases += 1
            elif not result.admitted:
                refused_now += 1
                assert result.source == "cache"
            admitted += result.admitted
    finally:
        await store.aclose()
    assert admitted == 8  # the whole bucket, no more
    assert 4 <= leases <= 6  # slices of at most 2 (burst / 4), and one that found it empty
    assert refused_now >= 30 - admitted - leases  # the rest refused on the cache alone
    assert store.answered_now == 30 - leases


async def test_the_fast_path_leaves_to_admit_what_needs_redis(redis_url: str) -> None:
    """None, and nothing changed, for: a key without a slice, a spec that changed, a
    cached breaker older than a sync interval, an open breaker whose probe is due, and
    the failure mode. A fresh open breaker is refused on the cache."""
    clock = FakeClock()
    store = tiered(redis_url, clock)
    now = clock.monotonic()
    key = "route:/n"
    try:
        first = await store.admit(key, BREAKER, ["r|k"], [ROOMY], now)
        assert first.admitted
        assert first.source == "redis"
        assert store.slices["r|k"].tokens >= 1  # the fast path could spend one of them

        def untouched(*args: Any) -> None:
            before = (store.stats.requests, store.slices["r|k"].demand, trips(store))
            assert store.admit_now(*args) is None
            assert (store.stats.requests, store.slices["r|k"].demand, trips(store)) == before

        untouched(key, BREAKER, ["r|other"], [ROOMY], now)  # no slice yet
        untouched(key, BREAKER, ["r|k"], [ROOMY._replace(cost=2)], now)  # another spec
        untouched(key, BREAKER, ["r|k", "r|new"], [ROOMY, ROOMY], now)  # one of two is new
        untouched(key, BREAKER, ["r|k"], [ROOMY], now + 0.101)  # breaker older than 100 ms
        store.exact.health.up = False  # the failure mode decides on the exact store
        untouched(key, BREAKER, ["r|k"], [ROOMY], now)
        store.exact.health.up = True
        fast = store.admit_now(key, BREAKER, ["r|k"], [ROOMY], now)  # all is well again
        # built without the class calls (interpreted): every field there, defaults too
        assert fast is not None
        assert all(hasattr(fast, name) for name in InboundResult._fields)
        assert [all(hasattr(v, n) for n in LimitVerdict._fields) for v in fast.limits] == [True]
        assert fast.limits[0] == LimitVerdict(True, 0.0, fast.limits[0].remaining,
                                              fast.limits[0].reset_s, 0.0)  # fmt: skip
        assert fast is not None
        assert fast.admitted
        assert fast.source == "cache"
        cached = store.breakers[key]
        cached.state, cached.open_until = OPEN, now + 0.05  # as a sync would cache it
        shed = store.admit_now(key, BREAKER, (), (), now + 0.01)
        assert shed is not None
        assert shed.gate is not None
        assert shed.gate.verdict == "reject"
        assert not shed.admitted
        assert shed.source == "cache"
        assert shed.limits == ()
        assert shed.gate.retry_after_s == pytest.approx(0.04)
        requests = store.stats.requests
        assert store.admit_now(key, BREAKER, (), (), now + 0.05) is None  # a probe may be due
        assert store.stats.requests == requests
        assert trips(store) == 1
    finally:
        await store.aclose()


async def test_record_now_counts_cache_gates_and_leaves_the_rest_to_record(
    redis_url: str,
) -> None:
    clock = FakeClock()
    store = tiered(redis_url, clock)
    now = clock.monotonic()
    key = "route:/r"
    try:
        gate = (await store.admit(key, BREAKER, (), (), now)).gate
        assert gate is not None
        assert gate.verdict == "allow"
        assert gate.epoch >= 0
        cached = store.breakers[key]
        assert store.record_now(key, BREAKER, gate, SUCCESS, False, now) == CLOSED
        assert store.record_now(key, BREAKER, gate, FAILURE, True, now) == CLOSED
        assert store.record_now(key, BREAKER, gate, IGNORED, False, now) == CLOSED
        assert (cached.calls, cached.failures, cached.slow) == (2, 1, 1)
        probe = Gate("probe", "half_open", gate.epoch, 0.0, probe_id=7)
        fallback = gate._replace(epoch=-2)
        for other in (probe, fallback):  # recorded where they were decided: not here
            assert store.record_now(key, BREAKER, other, FAILURE, False, now) is None
        assert (cached.calls, cached.failures, cached.slow) == (2, 1, 1)
        assert trips(store) == 1
    finally:
        await store.aclose()


@pytest.mark.parametrize("probe_status", [200, 500])
async def test_a_probe_through_the_middleware_is_recorded_in_redis(
    redis_url: str, redis_clock: RedisClock, probe_status: int
) -> None:
    """The fast path leaves a half-open probe's outcome to `record` (Redis holds its
    lease): a served probe closes the breaker for the fleet, a failed one opens it
    again. Redis's clock is pinned to the test's."""
    clock = FakeClock()
    base = redis_clock.now - clock.monotonic()

    def advance(seconds: float) -> None:
        clock.advance(seconds)
        redis_clock.set(base + clock.monotonic())

    cfg = BreakerConfig(
        min_calls=1, consecutive_failures=1, open_s=1.0, open_min_s=1.0, open_jitter=0.0,
        half_open_probes=1,
    )  # fmt: skip
    store = tiered(redis_url, clock)
    route = App()
    app = middleware(store, clock, route, breaker=cfg, rate_limits=())
    try:
        assert await get(app) == 200  # the cold request refreshes the breaker
        route.status = 500
        assert await get(app) == 500  # a failure, counted on the cache
        advance(0.2)
        assert await get(app) == 503  # the refresh flushed it: open, refused on the cache
        assert store.awaited_record == []
        advance(1.2)  # past open_s: the next request is the probe, leased in Redis
        route.status = probe_status
        assert await get(app) == probe_status
        [probe] = store.awaited_record
        assert probe.verdict == "probe"
        assert probe.probe_id
        advance(0.2)
        route.status = 200
        after = await get(app)
        if probe_status == 200:
            assert after == 200
            assert store.breakers[next(iter(store.breakers))].state == CLOSED
        else:
            assert after == 503
            assert store.breakers[next(iter(store.breakers))].state == OPEN
    finally:
        await store.aclose()


async def test_a_request_served_by_anothers_lease_counts_as_waited_not_local(
    redis_url: str,
) -> None:
    """A request that finds the slice empty while another's lease is in flight (the
    cached breaker fresh: nothing else to fetch) waits on that lease. It awaited Redis,
    so it counts as waited, not as decided locally (it used to count in both)."""
    clock = FakeClock()
    store = tiered(redis_url, clock)
    try:
        now = clock.monotonic()
        assert (await store.admit("b", BREAKER, ["k"], [SMALL], now)).admitted
        while (r := store.admit_now("b", BREAKER, ["k"], [SMALL], now)) is not None:
            assert r.admitted  # the slice's units, decided locally
        before = store.stats
        local, waited, requests = before.local, before.waited, before.requests
        first = asyncio.create_task(store.admit("b", BREAKER, ["k"], [SMALL], now))
        for _ in range(50):  # until its lease has left and is awaited
            await asyncio.sleep(0)
            if store.slices["k"].pending is not None:
                break
        assert store.slices["k"].pending is not None
        await store.admit("b", BREAKER, ["k"], [SMALL], now)
        await first
        assert store.stats.requests == requests + 2
        assert store.stats.waited == waited + 2
        assert store.stats.local == local  # neither decided without Redis
    finally:
        await store.aclose()
