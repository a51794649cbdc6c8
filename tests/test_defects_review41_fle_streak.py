"""Tiered state and a fleet-wide `consecutive_failures` (fle41; left by fle40 as a strict
xfail in test_defects_review40_fleet_breaker.py).

A tiered sync sends a process's outcomes in its own order, as runs, and sync.lua counted
a run of failures as a streak whatever other processes' syncs brought before or after
it: one process failing every call among another's successes (never 5 failures in a row
in the fleet's order) opened a `consecutive_failures = 5` breaker for the fleet at its
next sync. The model now (`decide.breaker.streak_stands`, lib.lua's port): a streak a
sync brings to the threshold opens only once it stood two sync intervals, and a success
any process syncs meanwhile ends it, as every success does. Exact mode is unchanged.

Each "process" is a TieredStore of its own on one real redis-server; processes, Redis and
the model share one fake clock (Redis's pinned to it), and syncs are made by the test.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import redis as redis_sync

from fidelity_mw.decide.breaker import CLOSED, FAILURE, OPEN, SUCCESS, Gate, streak_stands
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state import tiered as tiered_module
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

ROUTE = "upstream:pay.internal"
SYNC_S = 60.0  # (a long interval: the cached copies stay fresh between the test's syncs)
WAIT = tiered_module.STREAK_WAIT_SYNCS * SYNC_S
STREAK = BreakerConfig(
    min_calls=1000, consecutive_failures=5, window_s=600.0, open_s=60.0, open_min_s=60.0
)


class Fleet:
    """Tiered processes on one fake clock, Redis pinned to it."""

    def __init__(self, url: str, redis_clock: RedisClock, n: int) -> None:
        self.clock = FakeClock(start=redis_clock.now)
        self.redis_clock = redis_clock
        config = StateConfig(
            url="tiered+" + url, sync_interval_ms=int(SYNC_S * 1000), **{**PATIENT, **QUIET}
        )
        self.procs = [
            TieredStore(config=config, rng=seeded_random(seed), clock=self.clock)
            for seed in range(n)
        ]
        for proc in self.procs:
            proc._last_sync = math.inf  # no sync but the test's
        self.client = redis_sync.Redis.from_url(url)
        self.hkey = self.procs[0].exact.breaker_keys(ROUTE)[0]

    @property
    def now(self) -> float:
        return self.clock.monotonic()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.redis_clock.set(self.now)

    async def calls(self, p: int, outcomes: list[str], cfg: BreakerConfig = STREAK) -> list[Gate]:
        """Calls of process p, each recorded on its copy (sent at its next sync)."""
        gates = []
        for outcome in outcomes:
            result = await self.procs[p].admit(ROUTE, cfg, (), (), self.now)
            assert result.gate is not None
            assert result.gate.verdict == "allow", result.gate
            await self.procs[p].record(ROUTE, cfg, result.gate, outcome, False, self.now)
            gates.append(result.gate)
        return gates

    async def sync(self, p: int) -> None:
        await self.procs[p]._sync_all(self.now)

    def shared(self) -> tuple[str, int, int, float]:
        """The fleet's breaker in Redis: state, epoch, streak, when it reached the
        threshold (`cr`)."""
        st_, ep, co, cr = self.client.hmget(self.hkey, "st", "ep", "co", "cr")
        return (st_ or b"closed").decode(), int(ep or 0), int(co or 0), float(cr or 0.0)

    async def aclose(self) -> None:
        for proc in self.procs:
            await proc.aclose()
        self.client.close()


def test_the_model_opens_a_synced_streak_once_it_stood_its_wait() -> None:
    assert streak_stands(None, 50, 0.0, 10.0, 1.0) == (0.0, False)
    assert streak_stands(5, 4, 3.0, 10.0, 1.0) == (0.0, False)  # broken: forgotten
    assert streak_stands(5, 5, 0.0, 10.0, 1.0) == (10.0, False)  # reached now
    assert streak_stands(5, 9, 10.0, 10.5, 1.0) == (10.0, False)
    assert streak_stands(5, 9, 10.0, 11.0, 1.0) == (10.0, True)
    assert streak_stands(5, 5, 0.0, 10.0, 0.0) == (10.0, True)  # no wait: the exact rule
    # reached "after now": stored before the clock went back, the wait runs from now
    assert streak_stands(5, 5, 900.0, 10.0, 1.0) == (10.0, False)


@pytest.mark.parametrize("a_first", [True, False], ids=["failures_synced_first", "successes_first"])
async def test_one_failing_process_among_anothers_successes_never_opens_the_fleet_breaker(
    redis_url: str, redis_clock: RedisClock, a_first: bool
) -> None:
    """fle40's case with periodic syncs: each interval process A fails 10 calls, B
    succeeds in 30, interleaved (never 5 failures in a row in the fleet's order). Before,
    A's first sync ("f10") opened the breaker for both (refused from then on); now B's
    next sync ends A's streak every time, in either sync order."""
    fleet = Fleet(redis_url, redis_clock, 2)
    try:
        for _ in range(8):
            for _ in range(10):
                await fleet.calls(0, [FAILURE])
                await fleet.calls(1, [SUCCESS] * 3)
            for p in (0, 1) if a_first else (1, 0):
                await fleet.sync(p)
                assert fleet.shared()[0] == CLOSED
            fleet.advance(SYNC_S / 2)
        state, epoch, _streak, _since = fleet.shared()
        assert (state, epoch) == (CLOSED, 0)
    finally:
        await fleet.aclose()


async def test_a_fleet_whose_every_call_fails_opens_once_the_streak_stood_its_wait(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """An upstream down for everyone: no success comes, and the streak opens the breaker
    at the first sync two sync intervals after a sync completed it (exact mode: at the
    fifth failure)."""
    fleet = Fleet(redis_url, redis_clock, 2)
    try:
        await fleet.calls(0, [FAILURE] * 3)
        await fleet.sync(0)
        assert fleet.shared()[:3] == (CLOSED, 0, 3)
        await fleet.calls(1, [FAILURE] * 3)
        await fleet.sync(1)
        reached = fleet.now
        assert fleet.shared() == (CLOSED, 0, 6, reached)  # (before: open here)
        opener = -1
        while opener < 0:
            assert fleet.now - reached < WAIT
            fleet.advance(SYNC_S / 2)
            for p in (0, 1):
                await fleet.calls(p, [FAILURE])
                await fleet.sync(p)
                if fleet.shared()[0] != CLOSED:
                    opener = p
                    break
        assert fleet.now - reached == WAIT
        assert fleet.shared()[:2] == (OPEN, 1)
        # the process whose sync opened it refuses at once; the other at its next sync
        result = await fleet.procs[opener].admit(ROUTE, STREAK, (), (), fleet.now)
        assert result.gate is not None
        assert result.gate.verdict == "reject"
    finally:
        await fleet.aclose()


RATIO_TOO = BreakerConfig(
    min_calls=20,
    failure_ratio=0.8,
    consecutive_failures=4,
    window_s=600.0,
    open_s=60.0,
    open_min_s=60.0,
    open_jitter=0.0,
)


@pytest.mark.parametrize("seed", range(40))
async def test_syncs_of_three_processes_decide_as_the_model(
    redis_url: str, redis_clock: RedisClock, seed: int
) -> None:
    """Random calls, syncs and time of three processes: after every sync the fleet's
    breaker in Redis (state, epoch, streak, `cr`) is the model's: each process's outcomes
    recorded one by one at its sync's instant (`BreakerState`, with the ratio), the
    streak opening through `streak_stands`. Until it opens (probes are exact from there)."""
    rng = random.Random(seed)
    fleet = Fleet(redis_url, redis_clock, 3)
    memory = MemoryStore(rng=lambda: 0.5)
    model = dataclasses.replace(RATIO_TOO, consecutive_failures=None)
    pending: list[list[tuple[Gate, str]]] = [[], [], []]
    since = 0.0

    async def sync(p: int) -> bool:
        """Process p syncs: its outcomes recorded on the model at this instant; whether
        the breaker is still closed (both alike)."""
        nonlocal since
        before = memory.breakers.get(ROUTE, None)
        epoch = 0 if before is None else before.epoch
        # (review 42: a success counted at this sync ends the streak `since` is of)
        ended = any(o == SUCCESS and g.epoch == epoch for g, o in pending[p])
        for gate, outcome in pending[p]:
            await memory.record(ROUTE, model, gate, outcome, False, fleet.now)
        pending[p].clear()
        cached = fleet.procs[p].breakers.get(ROUTE)
        # (a sync carries the breaker when it has outcomes or a copy half an interval old)
        carried = cached is not None and (
            cached.calls > 0 or fleet.now - cached.synced_at >= 0.5 * SYNC_S
        )
        await fleet.sync(p)
        state = memory.breakers.get(ROUTE, None)
        if state is None:
            return True
        if state.state == CLOSED and carried:
            since, opens = streak_stands(
                RATIO_TOO.consecutive_failures, state.consecutive, since, fleet.now, WAIT, ended
            )
            if opens:
                state.force(OPEN, fleet.now, lambda: 0.5)
        theirs = fleet.shared()
        assert theirs[:2] == (state.state, state.epoch), (theirs, state.state)
        if state.state != CLOSED:
            return False
        assert theirs[2:] == (state.consecutive, since)
        return True

    down = False  # the upstream fails (nearly) every call for a while
    try:
        for _ in range(200):
            if rng.random() < 0.05:
                down = not down
            roll = rng.random()
            p = rng.randrange(3)
            cached = fleet.procs[p].breakers.get(ROUTE)
            stale = cached is not None and fleet.now - cached.synced_at > SYNC_S / 2
            # (a copy older than the interval is refreshed by the call: a sync)
            if stale and not await sync(p):
                return
            if roll < 0.55:
                outcomes = [
                    FAILURE if rng.random() < (0.95 if down else 0.2) else SUCCESS
                    for _ in range(rng.randint(1, 4))
                ]
                await fleet.calls(p, outcomes, RATIO_TOO)
                for outcome in outcomes:
                    mine = await memory.admit(ROUTE, model, (), (), fleet.now)
                    assert mine.gate is not None
                    pending[p].append((mine.gate, outcome))
            elif roll < 0.9:
                if not await sync(p):
                    return
            else:
                fleet.advance(rng.choice([5.0, 25.0, 25.0]))
    finally:
        await fleet.aclose()
