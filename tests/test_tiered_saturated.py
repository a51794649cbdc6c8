"""Tiered state on a saturated key: a fleet that asks for more than the limit allows.

Four instances share one Redis and one clock: the instances run on a FakeClock
and the scripts on a pinned copy of it (tests/redis_clock.py), so the bucket
refills exactly as the simulated time says and every count below is
deterministic. Each instance is offered 100 requests/s on one 200/s key with a
burst of 20 (the fleet offers 2x the limit) and a route breaker, either evenly
(one request every 10 ms, the instances staggered) or in simultaneous groups of
8 (every 80 ms). Round trips are counted, never timed; admissions are checked
against what one exact GCRA allows over the same span (rate x t + burst).
"""

from __future__ import annotations

import asyncio

import pytest

from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock
from redis_server import PATIENT

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

RATE = 200.0
BURST = 20
# interval 5 ms; tolerance (burst - 1) x interval: 20 requests at once, then one per 5 ms
SPEC = LimitSpec("fleet", 1.0 / RATE, (BURST - 1) / RATE, 1, False)
MEMBERS = 4
PER_MEMBER = 100.0  # requests/s offered to each instance
BREAKER = BreakerConfig()


# Each bucket's key lives an hour past its PX (redis_clock's LONG_TTL), refunded keys
# included: PX runs on Redis's real clock, which the pinned clock does not move, and a key
# gone early would refill its bucket early.
@pytest.fixture
def pinned(redis_clock: RedisClock) -> RedisClock:
    return redis_clock


def member(url: str, clock: FakeClock, seed: int, sync_ms: int) -> TieredStore:
    # Fleet announcements on (the default): a saturated key spaces its leases by the
    # fleet size. They are background calls, outside `round_trips`.
    config = StateConfig(url="tiered+" + url, sync_interval_ms=sync_ms, **PATIENT)
    return TieredStore(config=config, rng=seeded_random(seed), clock=clock)


async def run_fleet(
    url: str,
    redis_clock: RedisClock,
    batch: int,
    seconds: float,
    sync_ms: int = 100,
    refund_every: int = 0,
) -> tuple[list[TieredStore], int, int, float]:
    """Offer the load; returns (members, requests, admitted, span in seconds).

    `refund_every` n > 0: every n-th admitted request gives its unit back (a limit
    charged only for served requests, where that one was not served); `admitted`
    then counts the units kept."""
    clock = FakeClock()
    base = redis_clock.now - clock.monotonic()  # Redis time = fake time + base
    fleet = [member(url, clock, seed, sync_ms) for seed in range(MEMBERS)]
    step = 1.0 / PER_MEMBER * batch  # between one member's groups
    # member m's groups at m x step / MEMBERS + k x step: the fleet's arrivals interleave
    arrivals = sorted(
        (m * step / MEMBERS + k * step, m)
        for m in range(MEMBERS)
        for k in range(int(seconds / step))
    )
    start = clock.monotonic()
    requests = admitted = served = 0
    kept_at: list[float] = []  # when each unit the fleet kept was spent
    for at, m in arrivals:
        clock.advance(max(0.0, start + at - clock.monotonic()))
        redis_clock.set(base + clock.monotonic())
        got = await asyncio.gather(
            *(
                fleet[m].admit("route:/s", BREAKER, ["k"], [SPEC], clock.monotonic())
                for _ in range(batch)
            )
        )
        requests += len(got)
        for result in got:
            if not result.admitted:
                continue
            admitted += 1
            served += 1
            kept_at.append(clock.monotonic() - start)
            if refund_every and served % refund_every == 0:
                admitted -= 1
                kept_at.pop()
                tats = [v.tat for v in result.limits]
                await fleet[m].refund(["k"], [SPEC], result.source, clock.monotonic(), tats)
        for _ in range(3):  # background syncs and leases get their turn, as on a server
            await asyncio.sleep(0)
    span = clock.monotonic() - start
    # From a fresh bucket, by every moment t the fleet has kept at most rate x t + burst
    # units (what one exact GCRA allows): a unit leased ahead and spent before it
    # conformed would break this for some prefix, even if the total stayed in bounds.
    for k, t in enumerate(kept_at):
        assert k + 1 <= RATE * t + BURST + 1e-6, (k + 1, t)
    return fleet, requests, admitted, span


async def close(fleet: list[TieredStore]) -> None:
    for store in fleet:
        await store.aclose()


@pytest.mark.parametrize("batch", [1, 8], ids=["even", "batches-of-8"])
async def test_saturated_key_round_trips_and_no_over_admission(
    redis_url: str, pinned: RedisClock, batch: int
) -> None:
    fleet, requests, admitted, span = await run_fleet(redis_url, pinned, batch, 3.0)
    try:
        trips = sum(m.round_trips - m.exact.stats.script_loads for m in fleet)
        leases = sum(m.stats.leases for m in fleet)
        syncs = sum(m.stats.syncs for m in fleet)
        delegated = sum(m.stats.delegated for m in fleet)
        fallbacks = sum(m.exact.stats.fallbacks for m in fleet)
    finally:
        await close(fleet)
    bound = RATE * span + BURST
    print(
        f"\n[{batch}] {requests} requests over {span:.2f} s: admitted {admitted} "
        f"({100.0 * (admitted - bound) / bound:+.2f} % of rate x t + burst = {bound:.0f}); "
        f"{trips} round trips = {trips / requests:.4f}/request "
        f"({syncs} syncs, {leases} leases, {delegated} exact)"
    )
    assert fallbacks == 0
    assert requests == MEMBERS * batch * int(3.0 * PER_MEMBER / batch)
    assert admitted <= bound  # never over-admitted (units are leased before they are spent)
    assert admitted >= 0.95 * bound  # and limited at the rate, not far below it
    # The periodic sync keeps the route breaker's copy within one sync interval: one
    # call per instance per ~0.8 interval, 0.125 per request at 100 requests/s and
    # 100 ms. A saturated key adds next to nothing on top of that floor.
    floor = MEMBERS * span / (0.8 * 0.1) / requests
    assert trips / requests <= floor + 0.03


@pytest.mark.parametrize("batch", [1, 8], ids=["even", "batches-of-8"])
async def test_saturated_key_at_a_longer_sync_interval(
    redis_url: str, pinned: RedisClock, batch: int
) -> None:
    """At 500 ms the periodic floor is 0.025 per request: leases of up to a burst, ahead
    of time, keep the whole cost at or below 0.05 round trips per request."""
    fleet, requests, admitted, span = await run_fleet(redis_url, pinned, batch, 3.0, sync_ms=500)
    try:
        trips = sum(m.round_trips - m.exact.stats.script_loads for m in fleet)
    finally:
        await close(fleet)
    bound = RATE * span + BURST
    print(
        f"\n[{batch}, 500 ms] admitted {admitted} of bound {bound:.0f} "
        f"({100.0 * (admitted - bound) / bound:+.2f} %); {trips / requests:.4f} trips/request"
    )
    assert admitted <= bound
    assert admitted >= 0.95 * bound
    assert trips / requests <= 0.05


async def test_refunds_on_a_saturated_key(redis_url: str, pinned: RedisClock) -> None:
    """A quarter of the admitted requests give their unit back. Units refunded to a
    slice are spent by that instance; never more kept than the bound."""
    fleet, requests, kept, span = await run_fleet(redis_url, pinned, 1, 3.0, refund_every=4)
    try:
        trips = sum(m.round_trips - m.exact.stats.script_loads for m in fleet)
    finally:
        await close(fleet)
    bound = RATE * span + BURST
    print(
        f"\n[refunds] kept {kept} of bound {bound:.0f} "
        f"({100.0 * (kept - bound) / bound:+.2f} %); {trips / requests:.4f} trips/request"
    )
    assert kept <= bound
    assert kept >= 0.9 * RATE * span


def test_units_leased_ahead_are_spent_no_earlier_than_they_conform() -> None:
    """The slice's schedule (pure, no Redis): unit j of a lease ahead conforms at its
    first moment + j x interval; a merged lease never moves a unit earlier."""
    from fidelity_mw.state.tiered import Slice

    sl = Slice(LimitSpec("x", 1.0, 4.0, 1, False), 0.0)
    sl.add(3, -float("inf"))  # conforming already
    assert sl.usable(0.0) == 3
    sl.spend(3)
    sl.add(4, 10.0)  # ahead: at 10, 11, 12, 13
    assert [sl.usable(t) for t in (9.99, 10.0, 11.5, 12.0, 20.0)] == [0, 1, 2, 3, 4]
    sl.spend(1)
    assert sl.usable(10.5) == 0
    assert sl.usable(11.0) == 1
    # 3 held (11, 12, 13) + 2 more conforming at 11.5 and 12.5: the new ones follow
    sl.add(2, 11.5)
    assert sl.tokens == 5
    assert [sl.usable(t) for t in (11.0, 13.0, 15.0)] == [1, 3, 5]
    sl.put_back(1)  # spent and not used: it conforms now, ahead of the others
    assert sl.usable(10.0) == 1
