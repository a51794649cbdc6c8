"""A rollout that cuts a limit's burst (fle41; left by fle40 as a strict xfail).

The guard against Redis's clock going back (`decide.gcra.CLOCK_STEP_S`, lib.lua's `unstep`)
read a TAT more than the reader's burst + 120 s ahead as stored before the clock stepped
back, and stored the reader's empty bucket. Mid-rollout that TAT is no step: the old
policy's larger burst put it there. 100/hour with a burst of 100 cut to 10: every refusal
of a new process gave the old one 90 units back (measured: 100, 190, 280, 370 admitted in
seconds where either policy allows 100). Now a write that leaves the TAT more than 120 s
ahead records how far (`decide.gcra.recorded`), and the guard allows the larger of that and
the reader's tolerance: the model (`decide.gcra`), the memory store and the scripts
(admit.lua, batch.lua, peek.lua, refund.lua, sync.lua) alike.
"""

from __future__ import annotations

import random
import time

import pytest
import redis as redis_sync

from fidelity_mw.decide.gcra import CLOCK_STEP_S, gcra, peek, recorded
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore, hashed_key
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock
from redis_server import PATIENT, QUIET
from test_defects_review40_fleet_rollout import process, rounds, spec

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

KEY = "quota|k"
RL = hashed_key("fmw", "rl", KEY)
T1 = 1_000_000.0


class Model:
    """decide.gcra on one key: its TAT and how far ahead it was written (`recorded`)."""

    def __init__(self) -> None:
        self.tat: float | None = None
        self.written = 0.0

    def admit(self, now: float, limit: LimitSpec) -> tuple[bool, int, float]:
        tat = now if self.tat is None else self.tat
        v = gcra(tat, now, limit.interval_s, limit.tolerance_s, limit.cost, self.written)
        if v.allowed or v.tat != tat:  # an admission, or the reader's empty bucket
            self.tat, self.written = v.tat, recorded(v.tat - now)
        return v.allowed, v.remaining, v.retry_after_s

    def peek(self, now: float, limit: LimitSpec) -> tuple[bool, int, float]:
        tat = now if self.tat is None else self.tat
        v = peek(tat, now, limit.interval_s, limit.tolerance_s, limit.cost, written_s=self.written)
        return v.allowed, v.remaining, v.retry_after_s


def _redis(url: str, seed: int) -> RedisStore:
    return RedisStore(config=StateConfig(url=url, **PATIENT, **QUIET), rng=seeded_random(seed))


class Fleet:
    """The model, a memory store and two Redis processes (one per policy), asked alike."""

    def __init__(self, url: str, clock: RedisClock) -> None:
        self.model = Model()
        self.memory = MemoryStore(rng=lambda: 0.5)
        self.reds = (_redis(url, 1), _redis(url, 2))
        self.clock = clock

    async def admit(self, now: float, limit: LimitSpec, who: int) -> bool:
        self.clock.set(now)
        want = self.model.admit(now, limit)
        m = (await self.memory.admit(None, None, [KEY], [limit], now)).limits[0]
        r = await self.reds[who].admit(None, None, [KEY], [limit], now)
        assert r.source == "redis"
        got = r.limits[0]
        assert (m.allowed, m.remaining) == (got.allowed, got.remaining) == want[:2]
        assert m.retry_after_s == pytest.approx(want[2], abs=1e-6)
        assert got.retry_after_s == pytest.approx(want[2], abs=1e-6)
        return got.allowed

    async def peek(self, now: float, limit: LimitSpec, who: int) -> bool:
        self.clock.set(now)
        want = self.model.peek(now, limit)
        m = (await self.memory.peek([KEY], [limit], now)).limits[0]
        got = (await self.reds[who].peek([KEY], [limit], now)).limits[0]
        assert (m.allowed, m.remaining) == (got.allowed, got.remaining) == want[:2]
        assert got.retry_after_s == pytest.approx(want[2], abs=1e-6)
        return got.allowed

    async def aclose(self) -> None:
        for red in self.reds:
            await red.aclose()


def test_the_model_honours_a_larger_bursts_debt_and_still_repairs_a_step() -> None:
    old, new = spec(100, 100), spec(100, 10)  # 36 s a unit: 3600 s and 360 s of burst
    tat = T1 + old.tolerance_s  # the old policy's burst, all taken at T1
    # Before: read as a clock step (more than 360 + 120 s ahead), an empty bucket at 360 s
    stepped = gcra(tat, T1, new.interval_s, new.tolerance_s)
    assert stepped.tat == T1 + new.tolerance_s
    # the key records how far ahead it was written: a debt, refused until paid down to 360 s
    owed = gcra(tat, T1, new.interval_s, new.tolerance_s, 1, recorded(old.tolerance_s))
    assert not owed.allowed
    assert owed.tat == tat
    assert owed.retry_after_s == pytest.approx(old.tolerance_s - new.tolerance_s + new.interval_s)
    # a real step back beyond the recorded tolerance + 120 s is still one
    back = T1 - 2 * CLOCK_STEP_S
    again = gcra(tat, back, new.interval_s, new.tolerance_s, 1, recorded(old.tolerance_s))
    assert again.tat == back + new.tolerance_s
    # a TAT written at most 120 s ahead records nothing: per-second limits' keys stay
    # one number
    assert recorded(spec(3600, 60).tolerance_s) == recorded(CLOCK_STEP_S) == 0.0
    assert recorded(old.tolerance_s) == old.tolerance_s


async def test_a_burst_cut_decides_alike_in_the_model_memory_and_redis(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """The measured rollout on a pinned clock, each step asked of the model, a memory
    store and Redis (the old policy's process and the new one's): the old burst is spent,
    the new process refuses (the debt stands) and the old one gets nothing back; the
    bucket refills at the rate; a clock step back past the recorded 3600 s + 120 s is
    still read as one, and repaired to the reader's empty bucket."""
    old, new = spec(100, 100), spec(100, 10)
    fleet = Fleet(redis_url, redis_clock)
    try:
        got = [await fleet.admit(T1, old, 0) for _ in range(101)]
        assert got == [True] * 100 + [False]
        for _ in range(4):  # (before: each refusal gave the old process 90 units back)
            assert [await fleet.admit(T1, new, 1) for _ in range(3)] == [False] * 3
            assert not await fleet.peek(T1, new, 1)
            assert not await fleet.admit(T1, old, 0)
        with redis_sync.Redis.from_url(redis_url) as client:
            stored = client.get(RL)
        assert stored is not None  # "tat refunded credit expires wrote"
        assert float(stored.decode().split(" ")[4]) == old.tolerance_s
        # the new policy admits once the debt is down to its own burst, less a unit
        due = T1 + old.tolerance_s - new.tolerance_s + new.interval_s
        assert not await fleet.admit(due - 1.0, new, 1)
        assert await fleet.admit(due, new, 1)
        # the key holds seconds of refill: the old policy's larger burst has room again
        # (either fills up to its own burst: at most the larger one, as a rate cut)
        assert await fleet.admit(due, old, 0)
        # the clock steps back further than 3600 + 120 s: read as a step by either
        back = due - old.tolerance_s - 2 * CLOCK_STEP_S
        assert not await fleet.admit(back, old, 0)
        assert await fleet.admit(back + old.interval_s, old, 0)
        assert not await fleet.admit(back + old.interval_s, new, 1)
    finally:
        await fleet.aclose()


async def test_random_rollouts_decide_alike_in_the_model_memory_and_redis(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """Seeded walks over four policies of one key (bursts of 10 s to an hour of refill),
    time passing and the clock going back: model, memory and Redis answer alike."""
    limits = [
        LimitSpec("quota", 1.0, 10.0, 1, False),
        LimitSpec("quota", 36.0, 360.0, 1, False),
        LimitSpec("quota", 36.0, 3600.0, 1, False),
        LimitSpec("quota", 9.0, 90.0, 2, False),
    ]
    for seed in range(6):
        with redis_sync.Redis.from_url(redis_url) as client:
            client.delete(RL)
        fleet = Fleet(redis_url, redis_clock)
        rng = random.Random(seed)
        now = T1
        try:
            for _ in range(120):
                roll = rng.random()
                if roll < 0.1:
                    now -= rng.choice([30.0, 200.0, 900.0, 5000.0])
                elif roll < 0.3:
                    now += rng.choice([1.0, 36.0, 400.0])
                elif roll < 0.4:
                    await fleet.peek(now, rng.choice(limits), rng.randrange(2))
                else:
                    await fleet.admit(now, rng.choice(limits), rng.randrange(2))
        finally:
            await fleet.aclose()


@pytest.mark.parametrize("tiered", [False, True], ids=["redis", "tiered"])
async def test_a_burst_cut_mid_rollout_in_real_time_admits_one_burst(
    redis_url: str, tiered: bool
) -> None:
    """fle40's scenario on Redis's own clock, exact and tiered (sync.lua leases with the
    same guard): rounds of the old process asking 150 times, then the new one 3 times.
    Before, exact: 100, 190, 280, 370 admitted; now the burst, once."""
    old_spec, new_spec = spec(100, 100), spec(100, 10)
    old, new = process(redis_url, 1, tiered), process(redis_url, 2, tiered)
    started = time.monotonic()
    try:
        admitted_old, admitted_new = await rounds(old, new, old_spec, new_spec)
    finally:
        await old.aclose()
        await new.aclose()
    # (a unit refills in 36 s: a slow run may see one more)
    extra = int((time.monotonic() - started) // old_spec.interval_s) + 1
    assert admitted_new == 0
    assert 90 <= admitted_old <= 100 + extra


async def test_a_burst_cut_on_tiered_leases_gives_the_old_process_no_fresh_burst(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """Tiered (sync.lua leases through the same guard), both processes and Redis on one
    fake clock so the old process's cached refusal runs out between rounds: the new
    process's refusals leave the debt as it is, and once a unit has refilled the old
    process gets that unit, not 90 (before: 100, then 91 more at each round)."""
    old_spec, new_spec = spec(100, 100), spec(100, 10)
    clock = FakeClock(start=T1)
    config = StateConfig(url="tiered+" + redis_url, **{**PATIENT, **QUIET})
    old, new = (TieredStore(config=config, rng=seeded_random(seed), clock=clock) for seed in (1, 2))
    admitted = {"old": 0, "new": 0}
    try:
        for _ in range(4):
            redis_clock.set(clock.monotonic())
            for _ in range(150):
                result = await old.admit(None, None, [KEY], [old_spec], clock.monotonic())
                admitted["old"] += result.admitted
            for _ in range(3):
                result = await new.admit(None, None, [KEY], [new_spec], clock.monotonic())
                admitted["new"] += result.admitted
            clock.advance(old_spec.interval_s + 1.0)  # a unit refills; cached refusals end
    finally:
        await old.aclose()
        await new.aclose()
    assert admitted["new"] == 0
    assert admitted["old"] <= 100 + 3  # the burst, then at most one unit a round
