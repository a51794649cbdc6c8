"""Tiered slices sized by real demand, and simultaneous arrivals sharing one lease.

Local slice logic runs on a FakeClock (deterministic sync cadence); leases go
to a real redis-server, whose own clock only refills buckets, and these limits
refill too slowly for that to matter. Round trips are counted, never timed.
"""

from __future__ import annotations

import asyncio

import pytest

from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import SYNC
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

# 1/min: Redis's clock refills nothing during a test. Burst 100k: never the limit,
# and slices are capped at burst / 4 = 25k, far above the demand here.
ROOMY = LimitSpec("r", 60.0, 60.0 * 100_000, 1, False)
# 1/min with burst 400: the fleet runs it dry.
SCARCE = LimitSpec("s", 60.0, 60.0 * 400, 1, False)


def tiered(url: str, clock: FakeClock | None = None, seed: int = 5) -> TieredStore:
    # Generous timeouts: on a loaded machine a slow reply must not switch the store to
    # its failure mode (those requests count no demand, and the FakeClock would jump by
    # the probe's backoff sleeps).
    config = StateConfig(url="tiered+" + url, sync_interval_ms=100, **PATIENT, **QUIET)
    return TieredStore(config=config, rng=seeded_random(seed), clock=clock)


async def settle() -> None:
    """Let background syncs and lease tasks finish (they only wait on Redis)."""
    for _ in range(20):
        await asyncio.sleep(0.001)


async def test_frequent_leases_do_not_reset_the_demand_estimate(redis_url: str) -> None:
    """1000 units/s for 0.3 s: the slice target is 2 x the demand of one sync interval
    (200), however often the slice was leased; the lease count stays logarithmic."""
    clock = FakeClock()
    store = tiered(redis_url, clock)
    try:
        for _ in range(30):  # 10 ms steps, 10 requests each
            for _ in range(10):
                result = await store.admit(None, None, ["r|k"], [ROOMY], clock.monotonic())
                assert result.admitted
            clock.advance(0.01)
        await settle()
        want = store._want(store.slices["r|k"], clock.monotonic())
    finally:
        await store.aclose()
    assert store.exact.stats.fallbacks == 0
    assert 180 <= want <= 220
    assert store.stats.delegated == 0
    # slices double while the estimate catches up, then periodic syncs top them up
    assert store.round_trips - store.exact.stats.script_loads <= 12


async def test_each_sync_tops_a_roomy_slice_up_to_its_target(redis_url: str) -> None:
    """A slice holding less than its target gets the difference at the next sync, not only
    once it is below half: between two syncs a slice spends about half its target, and the
    units a sync asks for arrive a round trip later (long on a busy event loop), so one
    topped up only below half ran dry first and its requests waited for a lease."""
    clock = FakeClock()
    store = tiered(redis_url, clock)
    try:
        for _ in range(20):  # 1000 units/s for 0.2 s: a target of about 200
            for _ in range(10):
                assert (await store.admit(None, None, ["r|t"], [ROOMY], clock.monotonic())).admitted
            clock.advance(0.01)
        await settle()
        now = clock.monotonic()
        sl = store.slices["r|t"]
        want = store._want(sl, now)
        assert want >= 100
        for held in (want - 1, want * 3 // 4, want // 2 + 1):  # short of it, not below half
            sl.tokens = held
            _breakers, limits = store._plan_sync(now, ())
            assert [(give, ask) for key, _spec, give, ask in limits if key == "r|t"] == [
                (0, want - held)
            ]
        sl.tokens = want  # at its target: nothing to ask for
        _breakers, limits = store._plan_sync(now, ())
        assert [(give, ask) for key, _spec, give, ask in limits if key == "r|t"] == [(0, 0)]
    finally:
        await store.aclose()


async def test_simultaneous_arrivals_share_one_lease(redis_url: str, redis_server) -> None:  # type: ignore[no-untyped-def]
    """8 requests in one tick on a cold key and a cold breaker: one script call sized for
    all 8; none decided one by one in Redis."""
    store = tiered(redis_url)
    with redis_server.client() as client:
        client.script_load(SYNC.source)  # so the count below is the calls alone
        client.config_resetstat()
    try:
        got = await asyncio.gather(
            *(store.admit("route:/b", BreakerConfig(), ["r|b"], [ROOMY], 0.0) for _ in range(8))
        )
        # (before aclose, whose last sync gives the units still held back)
        with redis_server.client() as client:
            stats = client.info("commandstats")
    finally:
        await store.aclose()
    calls = sum(stats.get(n, {}).get("calls", 0) for n in ("cmdstat_evalsha", "cmdstat_eval"))
    assert [r.admitted for r in got] == [True] * 8
    assert {r.gate.verdict for r in got} == {"allow"}  # type: ignore[union-attr]
    assert store.stats.delegated == 0
    assert calls == 1


async def fleet_run(
    url: str, spec: LimitSpec, batch: int, steps: int
) -> tuple[list[TieredStore], int, int]:
    """4 instances on one Redis and one fake clock; every 10 ms each gets 8 requests,
    either all at once (`batch` = 8) or one at a time, 1.25 ms apart (`batch` = 1).
    Returns (stores, requests, admitted)."""
    clock = FakeClock()
    fleet = [tiered(url, clock, seed=i) for i in range(4)]
    requests = admitted = 0
    for _ in range(steps):
        for _ in range(8 // batch):
            for member in fleet:
                got = await asyncio.gather(
                    *(
                        member.admit("route:/f", BreakerConfig(), ["k"], [spec], clock.monotonic())
                        for _ in range(batch)
                    )
                )
                requests += len(got)
                admitted += sum(r.admitted for r in got)
            await asyncio.sleep(0)  # background syncs get their turn, as on a server
            clock.advance(0.01 * batch / 8)
    await settle()
    return fleet, requests, admitted


@pytest.mark.parametrize("batch", [1, 8], ids=["even", "batches-of-8"])
async def test_fleet_round_trips_per_request(redis_url: str, batch: int) -> None:
    fleet, requests, admitted = await fleet_run(redis_url, ROOMY, batch, steps=200)
    try:
        trips = sum(m.round_trips - m.exact.stats.script_loads for m in fleet)
        delegated = sum(m.stats.delegated for m in fleet)
        assert sum(m.exact.stats.fallbacks for m in fleet) == 0
    finally:
        for member in fleet:
            await member.aclose()
    print(f"\n[{batch}] {trips} round trips for {requests} requests = {trips / requests:.4f}")
    assert admitted == requests == 4 * 200 * 8
    assert delegated == 0
    assert trips / requests <= 0.05


@pytest.mark.parametrize("batch", [1, 8], ids=["even", "batches-of-8"])
async def test_fleet_never_admits_more_than_the_bucket(redis_url: str, batch: int) -> None:
    """A bucket the fleet runs dry: admitted + units still held == burst, exactly, and
    the dry key is refused from the cache without a call per request."""
    fleet, requests, admitted = await fleet_run(redis_url, SCARCE, batch, steps=200)
    try:
        held = sum(m.slices["k"].tokens for m in fleet if "k" in m.slices)
        trips = sum(m.round_trips - m.exact.stats.script_loads for m in fleet)
    finally:
        for member in fleet:
            await member.aclose()
    print(f"\n[{batch}] admitted {admitted} + held {held}; {trips} round trips / {requests}")
    assert admitted + held == 400
    assert admitted >= 400 - 4 * 100  # at most burst / 4 held per instance
    assert trips / requests <= 0.05
