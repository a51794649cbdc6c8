"""Defects an eighth review found.

1. One key of a tiered sync holding a value that is not ours (WRONGTYPE) failed the
   whole `sync.lua` call: every request of the tick that waited for that lease or
   breaker refresh fell back, and every periodic sync of the instance failed while
   the key stayed in its tables, so every other slice ran dry and every cached
   breaker went stale. Now, as in `batch.lua`, it fails that key alone.
2. `fidelity-mw demo --redis notaurl` exited 1 as a policy error, and `--redis memory://`
   or a URL with a port that is no number ended in a traceback: a malformed argument
   is a usage error (exit 2, `argument --redis: ...`); so is a malformed `--otlp`, which
   ran the whole demo, every export failing, and said "exported".
3. The loop clock behind stale shedding (a 1 ms heartbeat) was one per middleware: an
   app of several FidelityMiddleware instances ran that many timers, each with its own
   bound. Now one per event loop (and time source), shared.
4. A refund of a tiered request whose unit came from a slice after a lease (source
   redis) went to Redis when the slice had gone meanwhile: a call that gave nothing
   back and earned the key retry credit, which a slice's unit never earns.
5. A limit name that routes share with a cost each (`Depends(fidelity.limit(...,
   name=..., cost=...))`) replaced the tiered slice on every change of cost: the held
   units stranded in no slice and a lease per request.
6. A process that reaches Redis only through the blocking client (FidelitySyncTransport)
   dated its fallback decisions from the store's start, not from Redis's last reply.
7. Outcomes a tiered instance counted were sent with its next sync however late (the
   periodic sync runs only while requests come): after a quiet hour, failures an hour
   old opened the breaker. Counts whose latest outcome is older than the window drop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fidelity_mw.decide.breaker import FAILURE
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import seeded_random
from redis_server import PATIENT, QUIET

pytestmark = pytest.mark.anyio

BURST8 = LimitSpec("l", 60.0, 480.0, 1, False)  # 1/min, burst 8: no refill during a test


def _tiered(url: str, **state: Any) -> TieredStore:
    config = StateConfig(
        url="tiered+" + url, sync_interval_ms=1_000, **{**PATIENT, **QUIET, **state}
    )  # type: ignore[arg-type]
    return TieredStore(config=config, rng=seeded_random(8))


# ------------------------------------- 1. one foreign-typed key in a tiered sync


@pytest.mark.redis
async def test_a_foreign_limit_key_fails_only_its_own_lease(
    redis_url: str, redis_server: Any
) -> None:
    """Three requests of one tick share a lease call; the second one's bucket key holds a
    hash. The other two are leased for and decided (source redis); the second falls back,
    as it would in exact mode. Before, the whole lease failed: all three fell back."""
    store = _tiered(redis_url)
    keys = ["l|a", "l|b", "l|c"]
    with redis_server.client() as client:
        client.hset(store.exact.key("rl", "l|b"), "foreign", "1")
    try:
        now = store._clock.monotonic()
        got = await asyncio.gather(*(store.admit(None, None, [k], [BURST8], now) for k in keys))
        assert [(r.source, r.admitted) for r in got] == [
            ("redis", True),
            ("fallback", True),
            ("redis", True),
        ]
        # one shared lease; the foreign key was not leased for again, but decided exactly
        assert (store.stats.leases, store.stats.delegated) == (1, 1)
        # the healthy slices were leased for: later requests are decided on them
        now = store._clock.monotonic()
        again = [store.admit_now(None, None, [k], [BURST8], now) for k in ("l|a", "l|c")]
        assert [(r.source, r.admitted) if r else None for r in again] == [("cache", True)] * 2
        # a periodic sync with the foreign key in it still syncs the others
        before = {k: store.slices[k].synced_at for k in keys}
        errors = store.exact.stats.errors
        await store._sync_all(store._clock.monotonic())
        assert [store.slices[k].synced_at > before[k] for k in keys] == [True, False, True]
        assert store.exact.stats.errors == errors + 1  # the foreign key, said once
    finally:
        await store.aclose()
    assert store.exact.health.up  # an error reply, not an outage


@pytest.mark.redis
async def test_a_foreign_breaker_key_fails_only_its_own_route(
    redis_url: str, redis_server: Any
) -> None:
    """Two routes' breakers refreshed by one call; one route's breaker hash key holds a
    string. The other route is decided on its fresh copy; the broken one falls back."""
    store = _tiered(redis_url)
    cfg = BreakerConfig()
    with redis_server.client() as client:
        client.set(store.exact.key("br", "route:/bad"), "not a hash")
    try:
        good, bad = await asyncio.gather(
            store.admit("route:/ok", cfg, ["l|a"], [BURST8], store._clock.monotonic()),
            store.admit("route:/bad", cfg, ["l|b"], [BURST8], store._clock.monotonic()),
        )
        assert (good.source, good.admitted, good.gate.verdict) == ("redis", True, "allow")  # type: ignore[union-attr]
        assert bad.source == "fallback"
        assert store.breakers["route:/ok"].epoch == 0  # learned from Redis
    finally:
        await store.aclose()


@pytest.mark.redis
async def test_a_periodic_sync_applies_the_other_breakers_outcomes(
    redis_url: str, redis_server: Any
) -> None:
    """Outcomes counted on two cached breakers; one breaker's key is then overwritten by a
    string. The sync applies the other's outcomes in Redis and counts the broken one's as
    dropped (as a failed record's). Before, both were lost with the whole call."""
    store = _tiered(redis_url)
    cfg = BreakerConfig(min_calls=100)
    try:
        for route in ("route:/ok", "route:/bad"):
            result = await store.admit(route, cfg, (), (), store._clock.monotonic())
            assert result.gate is not None
            for _ in range(3):
                store.record_now(route, cfg, result.gate, FAILURE, False, store._clock.monotonic())
        with redis_server.client() as client:
            client.set(store.exact.key("br", "route:/bad"), "not a hash")
        dropped = store.exact.stats.dropped_records
        await store._sync_all(store._clock.monotonic() + 0.6)
        assert store.exact.stats.dropped_records == dropped + 3
        with redis_server.client() as client:
            window = client.hget(store.exact.key("br", "route:/ok"), "w")
        assert window is not None
        assert sum(int(n) for n in window.split(b",")[0::3]) == 3  # the three calls
        assert store.breakers["route:/ok"].calls == 0  # sent
    finally:
        await store.aclose()


# ------------------------------- 2. `fidelity-mw demo --redis` with a malformed URL


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("notaurl", "argument --otlp: 'notaurl' is not an OTLP/HTTP endpoint"),
        ("localhost:4318", "argument --otlp: 'localhost:4318' is not an OTLP/HTTP endpoint"),
        ("http://localhost:port", "argument --otlp: http://localhost:port: Port"),
    ],
)
def test_a_malformed_demo_otlp_url_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], url: str, said: str
) -> None:
    """Before: the whole demo ran, every span and metric export failed ("No scheme
    supplied"), and it exited 0 with `"otlp": {"exported": true}`."""
    from fidelity_mw.tools.cli import EXIT_USAGE, main

    assert main(["demo", "--otlp", url, "--duration", "4"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert said in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("notaurl", "argument --redis: 'notaurl' is not a Redis URL"),
        ("memory://", "argument --redis: memory://: in-memory state is what the demo runs on"),
        ("redis://u:pw@host:notaport/0", "argument --redis: redis://u:***@host:notaport/0: Port"),
        ("redis://host:6379/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
    ],
)
def test_a_malformed_demo_redis_url_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], url: str, said: str
) -> None:
    """Before: "notaurl" exited 1 as a policy error; "memory://" and a non-numeric port
    ended in a traceback (exit 1) from the client built for the PING."""
    from fidelity_mw.tools.cli import EXIT_USAGE, main

    assert main(["demo", "--redis", url, "--duration", "4"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert said in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


# ------------------------- 3. the loop clock's heartbeat: one per event loop, not per app


def _heartbeats(calls: list[Any]) -> set[int]:
    """The distinct loop clocks that scheduled a heartbeat tick, from recorded call_later
    calls."""
    from fidelity_mw.inbound.bulkhead import LoopClock

    return {
        id(cb.__self__) for _delay, cb in calls if getattr(cb, "__func__", None) is LoopClock._tick
    }


async def test_two_middlewares_on_one_loop_share_one_loop_heartbeat(
    clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two FidelityMiddleware instances (two mounted apps) with stale shedding on one
    event loop, both pacing: one 1 ms heartbeat, one answer to "when did the loop last
    read its sockets". Before, each instance ran its own timer (N per loop) and each
    bound came from its own ticks."""
    from fidelity_mw import Policy
    from fidelity_mw.policy import ConcurrencyConfig
    from test_bulkhead import Service

    loop = asyncio.get_running_loop()
    calls: list[Any] = []
    real = loop.call_later

    def call_later(delay: float, callback: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((delay, callback))
        return real(delay, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_later", call_later)
    policy = Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=4, adaptive=True, max_limit=100, shed_stale=True),
    )
    services = [Service(policy, clock, work_s=0.01) for _ in range(2)]
    for svc in services:
        svc.busy_after_s = 0.008  # the loop lags: pacing, and the heartbeat starts
        for _ in range(25):
            # (once pacing, the real 1 ms heartbeat against the fake clock may shed one)
            assert (await svc.client.get("/w")).status_code in (200, 503)
            await asyncio.sleep(0)
        assert svc.mw.engine.bulkheads["/w"].pacing
    first, second = (svc.mw._bulkheads.loop_clock() for svc in services)
    assert first is second
    assert len(_heartbeats(calls)) == 1
    handle = first._handle
    assert handle is not None
    handle.cancel()


async def test_each_event_loop_has_its_own_loop_clock() -> None:
    from fidelity_mw.inbound.bulkhead import loop_clock
    from fidelity_mw.testing import FakeClock

    fake = FakeClock()
    here = loop_clock(fake.monotonic)
    assert loop_clock(fake.monotonic) is here
    assert loop_clock(FakeClock().monotonic) is not here  # another clock: its own

    def elsewhere() -> Any:
        async def get() -> Any:
            return loop_clock(fake.monotonic)

        return asyncio.run(get())

    assert await asyncio.to_thread(elsewhere) is not here


# --------------- part 2: a refund of a slice's unit after the slice has gone


@pytest.mark.redis
async def test_a_refund_of_a_slice_unit_after_its_slice_went_earns_no_credit_in_redis(
    redis_url: str, redis_server: Any
) -> None:
    """A request that waited for a lease (source redis, no TAT: its unit came from the
    slice) is refunded after its slice was dropped (idle). A unit spent from a slice
    goes back into that slice and earns no retry credit (docs/state.md), and with no
    slice there is nowhere to put it, as for a cache decision. Before, it went to
    Redis: one refund call that gave nothing back to the bucket but earned the key
    retry credit, which a refund of the same unit decided on the cache never did."""
    store = _tiered(redis_url)
    spec = LimitSpec("l", 60.0, 480.0, 1, False, credit_s=30.0)
    try:
        result = await store.admit(None, None, ["l|r"], [spec], store._clock.monotonic())
        assert (result.source, result.admitted, result.limits[0].tat) == ("redis", True, 0.0)
        del store.slices["l|r"]  # dropped as idle (its units given back)
        trips = store.round_trips
        await store.refund(["l|r"], [spec], result.source, store._clock.monotonic(), [0.0])
        assert store.round_trips == trips
        with redis_server.client() as client:
            stored = client.get(store.exact.key("rl", "l|r"))
        assert stored is not None
        assert len(stored.split()) <= 2  # "TAT" or "TAT R": no credit fields
    finally:
        await store.aclose()


# ------------ part 2: one limit name, routes with a cost each, on tiered state


@pytest.mark.redis
async def test_requests_of_several_costs_share_one_slice(redis_url: str) -> None:
    """`Depends(fidelity.limit(..., name="api", cost=...))` on two routes with a cost
    each: one bucket. Alternating requests of cost 1 and 2 on one key, burst 40, no
    refill: every unit of the bucket is admitted or still held, in a few leases.
    Before, each change of cost replaced the slice: its units stranded (21 of 40 units
    admitted, none held) and a lease per request (41 round trips for 40 requests)."""
    store = _tiered(redis_url)
    one = LimitSpec("api", 60.0, 60.0 * 40, 1, False)
    two = LimitSpec("api", 60.0, 60.0 * 40, 2, False)
    units = 0
    try:
        for i in range(40):
            spec = one if i % 2 == 0 else two
            now = store._clock.monotonic()
            result = await store.admit(None, None, ["api|c"], [spec], now)
            units += spec.cost if result.admitted else 0
        held = store.slices["api|c"].tokens
        assert units + held == 40
        assert store.round_trips <= 10
    finally:
        await store.aclose()


# ----------- part 2: the age of a sync caller's fallback decision (FidelitySyncTransport)


@pytest.mark.redis
def test_a_sync_callers_fallback_age_counts_from_its_last_reply(own_redis: Any) -> None:
    """A process that reaches Redis only through the blocking client (a worker thread's
    FidelitySyncTransport): its fallback decisions say how long ago Redis last answered.
    Before, only the asyncio client's replies counted, so the age was the time since
    the store started (here 100 s, not 2)."""
    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.testing import FakeClock

    clock = FakeClock()
    config = StateConfig(url=own_redis.url, **{**PATIENT, **QUIET})  # type: ignore[arg-type]
    store = RedisStore(config=config, rng=seeded_random(8), clock=clock)
    cfg = BreakerConfig()
    try:
        clock.advance(98.0)
        _gate, allowed, source, _age = store.outbound_gate_sync(
            "upstream:a", cfg, None, None, False, clock.monotonic()
        )
        assert (source, allowed) == ("redis", True)
        own_redis.kill()
        clock.advance(2.0)
        _gate, allowed, source, age = store.outbound_gate_sync(
            "upstream:a", cfg, None, None, False, clock.monotonic()
        )
        assert (source, allowed) == ("fallback", True)
        assert age == pytest.approx(2.0)
    finally:
        store.sync_link().close()


# ------ part 2: tiered outcomes older than the breaker's window, sent when traffic resumes


@pytest.mark.redis
async def test_outcomes_older_than_the_window_do_not_open_the_breaker_later(
    redis_url: str,
) -> None:
    """Five failures counted on a cached breaker, then no traffic for an hour (the
    periodic sync runs only while requests come). The next request's sync would apply
    them to the shared window as if they had just happened: the breaker opened on
    failures an hour old, which any window of 30 s had long forgotten (in exact mode
    they were in Redis at once and rotated out). Now counts whose latest outcome is
    older than the window are dropped, as a failed record's."""
    from fidelity_mw.testing import FakeClock

    clock = FakeClock()
    config = StateConfig(url="tiered+" + redis_url, sync_interval_ms=100, **{**PATIENT, **QUIET})  # type: ignore[arg-type]
    store = TieredStore(config=config, rng=seeded_random(8), clock=clock)
    cfg = BreakerConfig(min_calls=5, failure_ratio=0.5, window_s=30.0)
    try:
        first = await store.admit("route:/f", cfg, (), (), clock.monotonic())
        assert first.gate is not None
        for _ in range(5):
            store.record_now("route:/f", cfg, first.gate, FAILURE, False, clock.monotonic())
        assert store.breakers["route:/f"].calls == 5  # counted, not yet sent
        clock.advance(3600.0)
        later = await store.admit("route:/f", cfg, (), (), clock.monotonic())
        assert later.gate is not None
        assert (later.gate.verdict, later.gate.state) == ("allow", "closed")
        assert store.exact.stats.dropped_records == 5
    finally:
        await store.aclose()
