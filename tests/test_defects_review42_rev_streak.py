"""Review 42: a tiered sync's failure streak after a success in the same sync's runs.

fle41's rule (state.md): on tiered state a streak a sync brings to `consecutive_failures`
opens the breaker only once it stood two sync intervals, and a success any process syncs
meanwhile ends it. The hash's `cr` (when the streak reached the threshold) was reset only
when a sync *ended* below the threshold: a sync whose runs held a success and then a new
streak of failures kept the `cr` of the streak its success had ended, so the new streak
opened the fleet's breaker at the next sync past the old one's wait, before the other
processes' successes of the same interval were synced (what the wait is for). The model
(`decide.breaker.streak_stands`, `ended`) and `sync.lua` now start the wait again.
"""

from __future__ import annotations

import math

import pytest
import redis as redis_sync

from fidelity_mw.decide.breaker import CLOSED, FAILURE, SUCCESS, streak_stands
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state import tiered as tiered_module
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ROUTE = "upstream:pay.internal"
SYNC_S = 60.0  # (long: the cached copies stay fresh between the test's syncs)
WAIT = tiered_module.STREAK_WAIT_SYNCS * SYNC_S
STREAK = BreakerConfig(
    min_calls=1000, consecutive_failures=5, window_s=600.0, open_s=60.0, open_min_s=60.0
)


def test_the_model_starts_the_wait_again_after_a_success_ended_the_streak() -> None:
    # the streak of 5 reached at 10.0 was ended by a synced success; 5 new failures after
    # it in the same sync at 200.0: a new streak, whose wait starts now
    assert streak_stands(5, 5, 10.0, 200.0, 120.0, ended=True) == (200.0, False)
    assert streak_stands(5, 5, 10.0, 200.0, 120.0) == (10.0, True)  # not ended: it stood
    assert streak_stands(5, 4, 10.0, 200.0, 120.0, ended=True) == (0.0, False)


async def test_a_new_streak_after_a_synced_success_waits_its_own_time(
    redis_url: str, redis_clock: RedisClock
) -> None:
    clock = FakeClock(start=redis_clock.now)
    config = StateConfig(
        url="tiered+" + redis_url, sync_interval_ms=int(SYNC_S * 1000), **{**PATIENT, **QUIET}
    )
    procs = [TieredStore(config=config, rng=seeded_random(s), clock=clock) for s in range(3)]
    for proc in procs:
        proc._last_sync = math.inf  # no sync but the test's
    client = redis_sync.Redis.from_url(redis_url)
    hkey = procs[0].exact.breaker_keys(ROUTE)[0]

    def advance(seconds: float) -> None:
        clock.advance(seconds)
        redis_clock.set(clock.monotonic())

    async def calls(p: int, outcomes: list[str]) -> None:
        for outcome in outcomes:
            result = await procs[p].admit(ROUTE, STREAK, (), (), clock.monotonic())
            assert result.gate is not None
            assert result.gate.verdict == "allow"
            await procs[p].record(ROUTE, STREAK, result.gate, outcome, False, clock.monotonic())

    def shared() -> tuple[str, int, float]:
        st_, co, cr = client.hmget(hkey, "st", "co", "cr")
        return (st_ or b"closed").decode(), int(co or 0), float(cr or 0.0)

    try:
        start = clock.monotonic()
        await calls(0, [FAILURE] * 5)
        await procs[0]._sync_all(clock.monotonic())
        assert shared() == (CLOSED, 5, start)
        advance(WAIT - 20.0)
        # P1 succeeded once, then failed 5 times (P2 succeeding between, not synced yet)
        await calls(1, [SUCCESS] + [FAILURE] * 5)
        await calls(2, [SUCCESS] * 10)
        await procs[1]._sync_all(clock.monotonic())
        reached = clock.monotonic()
        # before: (closed, 5, start): the ended streak's time kept
        assert shared() == (CLOSED, 5, reached)
        advance(25.0)  # past the first streak's wait, not the new one's
        await procs[0]._sync_all(clock.monotonic())  # (no outcomes: it carries its copy)
        assert shared()[0] == CLOSED  # before: open, for the whole fleet
        await procs[2]._sync_all(clock.monotonic())  # P2's successes end P1's streak
        assert shared() == (CLOSED, 0, 0.0)
    finally:
        for proc in procs:
            await proc.aclose()
        client.close()
