"""TieredStore against a real redis-server: leased slices, cached breakers, explicit staleness."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

from fidelity_mw.decide.breaker import FAILURE, SUCCESS
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import seeded_random
from redis_server import PATIENT

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

BURST20 = LimitSpec("l", 60.0, 1200.0, 1, False)  # 1/min, burst 20: no refill during a test
WIDE = LimitSpec("w", 1e-5, 10.0, 1, False)  # 100k/s, burst 1M: never the limit here


def tiered(url: str, sync_ms: int = 100, **state: object) -> TieredStore:
    config = StateConfig(url="tiered+" + url, sync_interval_ms=sync_ms, **{**PATIENT, **state})  # type: ignore[arg-type]
    return TieredStore(config=config, rng=seeded_random(5))


async def test_slices_never_admit_more_than_the_global_bucket(redis_url: str) -> None:
    """Two instances, one key: admitted + units still held in slices == the burst, exactly."""
    a, b = tiered(redis_url), tiered(redis_url)
    admitted = 0
    sources: set[str] = set()
    try:
        for _ in range(40):
            for member in (a, b):
                result = await member.admit(None, None, ["l|k"], [BURST20], time.monotonic())
                admitted += result.admitted
                sources.add(result.source)
        held = sum(s.slices["l|k"].tokens for s in (a, b) if "l|k" in s.slices)
    finally:
        await a.aclose()
        await b.aclose()
    assert admitted + held == 20
    assert admitted >= 20 - 2 * 5  # at most max_slice (burst / 4) held per instance
    assert sources == {"redis", "cache"}


async def test_cache_decisions_say_cache_and_how_old(redis_url: str) -> None:
    store = tiered(redis_url, sync_ms=1000)
    try:
        first = await store.admit("route:/c", BreakerConfig(), ["w|c"], [WIDE], time.monotonic())
        assert first.source == "redis"  # nothing cached yet: it waited for Redis
        await anyio.sleep(0.02)
        later = await store.admit("route:/c", BreakerConfig(), ["w|c"], [WIDE], time.monotonic())
        assert later.source == "cache"
        assert later.admitted
        assert 0.02 <= later.age_s <= 1.0  # time since the last sync, within the bound
    finally:
        await store.aclose()


async def test_round_trips_per_request_at_steady_state(redis_url: str) -> None:
    store = tiered(redis_url)
    n = 5000
    started = time.monotonic()
    try:
        for i in range(n):
            result = await store.admit("route:/s", BreakerConfig(), ["w|s"], [WIDE], 0.0)
            assert result.admitted
            await store.record("route:/s", BreakerConfig(), result.gate, SUCCESS, False, 0.0)  # type: ignore[arg-type]
            if i % 100 == 0:
                await asyncio.sleep(0)  # let the background sync run
    finally:
        await store.aclose()
    elapsed = time.monotonic() - started
    per_request = store.round_trips / n
    syncs = store.stats.syncs
    print(
        f"\ntiered: {store.round_trips} round trips for {n} requests = {per_request:.4f}/request"
        f" ({syncs} background syncs in {elapsed:.2f} s)"
    )
    # Background syncs come once per sync interval of real time, however many requests it
    # holds: a slow machine has more of them per request. What the requests themselves
    # cost (leases, refreshes) must stay rare, and the syncs keep to their interval.
    assert store.round_trips - syncs <= 0.05 * n
    assert syncs <= elapsed / store.sync_s + 2
    assert store.stats.local >= n - store.round_trips


async def test_breaker_opened_through_one_instance_sheds_on_another(redis_url: str) -> None:
    """Outcomes counted on A reach Redis at A's next sync; B sheds once its cache refreshes."""
    sync_ms = 50
    cfg = BreakerConfig(min_calls=5, failure_ratio=0.5, open_s=30.0, open_min_s=30.0)
    a, b = tiered(redis_url, sync_ms), tiered(redis_url, sync_ms)
    try:
        assert (await b.admit("route:/x", cfg, (), (), time.monotonic())).gate.verdict == "allow"  # type: ignore[union-attr]
        for _ in range(6):
            result = await a.admit("route:/x", cfg, (), (), time.monotonic())
            assert result.gate is not None
            assert result.gate.verdict == "allow"
            await a.record("route:/x", cfg, result.gate, FAILURE, False, time.monotonic())
        assert a.breakers["route:/x"].calls == 6  # counted locally, not yet sent
        opened = None
        b_ages = []
        for step in range(100):  # bounded: 100 x 10 ms
            await anyio.sleep(0.01)
            await a.admit("route:/x", cfg, (), (), time.monotonic())  # drives A's syncs
            result = await b.admit("route:/x", cfg, (), (), time.monotonic())
            if result.source == "cache":
                b_ages.append(result.age_s)
            assert result.gate is not None
            if result.gate.verdict == "reject":
                opened = step
                break
        assert opened is not None, "B never saw the breaker open"
        assert result.gate.state == "open"
        assert result.gate.retry_after_s > 20.0
        # B never decided on a cached breaker older than one sync interval
        assert all(age <= sync_ms / 1000.0 for age in b_ages)
    finally:
        await a.aclose()
        await b.aclose()


async def test_half_open_probes_are_leased_fleet_wide(redis_url: str) -> None:
    cfg = BreakerConfig(min_calls=1, consecutive_failures=1, open_s=0.05, open_jitter=0.0,
                        half_open_probes=2, probe_lease_s=60.0)  # fmt: skip
    fleet = [tiered(redis_url, sync_ms=20) for _ in range(3)]
    try:
        gate = (await fleet[0].admit("route:/h", cfg, (), (), time.monotonic())).gate
        assert gate is not None
        await fleet[0].record("route:/h", cfg, gate, FAILURE, False, time.monotonic())
        await fleet[0].admit("route:/h", cfg, (), (), time.monotonic())
        early = []  # a probe this wait took itself: on a busy machine a sleep of 10 ms
        # can outlast open_s, and the check below then finds the breaker half open
        for _ in range(3000):  # bounded (30 s): wait for the flushed failure to open it
            await anyio.sleep(0.01)
            probe = await fleet[0].admit("route:/h", cfg, (), (), time.monotonic())
            if probe.gate is not None and probe.gate.state != "closed":
                if probe.gate.verdict == "probe":
                    early.append(probe)
                break
        await anyio.sleep(0.06)  # past open_s
        results = await asyncio.gather(
            *(m.admit("route:/h", cfg, (), (), time.monotonic()) for m in fleet for _ in range(10))
        )
        verdicts = [r.gate.verdict for r in results if r.gate is not None]
        probes = [r for r in results if r.gate is not None and r.gate.verdict == "probe"]
        # half_open_probes across the fleet, not per member (3 members would take 6)
        assert len(probes) + len(early) == 2, (verdicts, early)
        assert all(r.source == "redis" for r in probes + early)
        # a probe success, reported by whoever holds it, closes the breaker for everyone
        holder = fleet[results.index(probes[0]) // 10] if probes else fleet[0]
        state = await holder.record(
            "route:/h",
            cfg,
            (probes + early)[0].gate,
            SUCCESS,
            False,
            time.monotonic(),  # type: ignore[arg-type]
        )
        assert state == "closed"
        await anyio.sleep(0.03)
        after = [await m.admit("route:/h", cfg, (), (), time.monotonic()) for m in fleet]
        assert {r.gate.verdict for r in after if r.gate is not None} == {"allow"}
    finally:
        for member in fleet:
            await member.aclose()


async def test_tiered_falls_back_when_redis_is_killed(own_redis) -> None:  # type: ignore[no-untyped-def]
    store = tiered(own_redis.url, timeout_ms=50, connect_timeout_ms=50)
    try:
        assert (await store.admit(None, None, ["w|f"], [WIDE], time.monotonic())).admitted
        own_redis.kill()
        await anyio.sleep(0.15)  # slices drain, syncs fail (real time: Redis is really gone)
        sources = set()
        for _ in range(500):
            result = await store.admit(None, None, ["w|f"], [WIDE], time.monotonic())
            assert result.admitted
            sources.add(result.source)
            if result.source == "fallback":
                break
            await anyio.sleep(0.01)
        assert "fallback" in sources
        own_redis.start()
        for _ in range(500):  # bounded: 5 s
            result = await store.admit(None, None, ["w|f"], [WIDE], time.monotonic())
            if result.source in ("redis", "cache"):
                break
            await anyio.sleep(0.01)
        assert result.source in ("redis", "cache")
        assert store.exact.stats.recoveries
    finally:
        await store.aclose()
