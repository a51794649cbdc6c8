"""Review 27 (state): the stores held to decide/ where they had parted.

Each test fails without its fix. Redis tests run the scripts on a pinned clock
(tests/redis_clock.py) against the suite's redis-server.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from fidelity_mw.decide.breaker import FAILURE, SUCCESS
from fidelity_mw.decide.gcra import gcra
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_clock import RedisClock
from redis_server import PATIENT

pytestmark = [pytest.mark.redis]

T0 = 1_000.0


def _tiered(url: str, clock: FakeClock) -> TieredStore:
    config = StateConfig(url="tiered+" + url, sync_interval_ms=100, **PATIENT)
    store = TieredStore(config=config, rng=lambda: 0.5, clock=clock)
    store._last_sync = math.inf  # syncs only when the test says so
    return store


async def _outcomes(store, breaker: BreakerConfig, outcomes: list[str], now: float) -> str:  # type: ignore[no-untyped-def]
    gates = []
    for _ in outcomes:
        result = await store.admit("route:/r", breaker, (), (), now)
        assert result.gate is not None
        assert result.gate.verdict == "allow"
        gates.append(result.gate)
    state = "closed"
    for gate, outcome in zip(gates, outcomes, strict=True):
        state = await store.record("route:/r", breaker, gate, outcome, False, now)
    return state


def test_tiered_opens_a_breaker_on_a_ratio_a_prefix_of_its_outcomes_reached(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """F, F, S, S, S with min_calls 2 and failure_ratio 0.5: the model opens on the second
    failure. The tiered store sent the sync the five as one sum (2 of 5 failed) and
    sync.lua checked the ratio once, on the sum: the breaker stayed closed."""
    breaker = BreakerConfig(min_calls=2, failure_ratio=0.5, window_s=10.0, open_s=5.0)
    outcomes = [FAILURE, FAILURE, SUCCESS, SUCCESS, SUCCESS]

    async def run() -> tuple[str, str]:
        memory = MemoryStore(rng=lambda: 0.5)
        await _outcomes(memory, breaker, outcomes, T0)
        clock = FakeClock(start=T0)
        store = _tiered(redis_url, clock)
        try:
            await _outcomes(store, breaker, outcomes, T0)
            await store._sync_all(T0)
            gate = (await store.admit("route:/r", breaker, (), (), T0)).gate
            assert gate is not None
            return memory.breakers["route:/r"].state, gate.state
        finally:
            await store.aclose()

    want, got = asyncio.run(run())
    assert want == "open"
    assert got == want


# Past 8.4e6/s the emission interval is under half an ulp of today's Unix time (Redis
# TIME, 2.4e-7 s per ulp): base + interval rounded back to base, the TAT never moved,
# and every request was admitted. An admission now moves the TAT by one ulp at least.
FAST = LimitSpec("fast", 1e-7, 100 * 1e-7, 1, False)  # 10,000,000/s, burst 100
UNIX = 1_764_900_000.0


def test_gcra_at_ten_million_per_second_on_unix_time_charges_something() -> None:
    tat, admitted = UNIX, 0
    for _ in range(1000):
        verdict = gcra(tat, UNIX, FAST.interval_s, FAST.tolerance_s)
        if verdict.allowed:
            tat, admitted = verdict.tat, admitted + 1
    assert 0 < admitted <= 100
    # a cost of 0 still charges nothing
    assert gcra(UNIX, UNIX, FAST.interval_s, FAST.tolerance_s, 0).tat == UNIX


def test_redis_at_ten_million_per_second_admits_no_more_than_the_burst(
    redis_url: str, redis_clock: RedisClock
) -> None:
    # (its keys live an hour longer than Redis's real milliseconds would keep them: the
    # redis_clock fixture's LONG_TTL)
    redis_clock.set(UNIX)

    async def run() -> tuple[int, int]:
        memory = MemoryStore(rng=lambda: 0.5)
        red = RedisStore(
            config=StateConfig(url=redis_url, timeout_ms=5_000, connect_timeout_ms=5_000),
            rng=lambda: 0.5,
            clock=FakeClock(),
        )
        try:
            mine = theirs = 0
            for together in (False, True):  # admit.lua, then one batch.lua call
                if together:
                    got = await asyncio.gather(
                        *(red.admit(None, None, ["k2"], [FAST], UNIX) for _ in range(300))
                    )
                else:
                    got = [await red.admit(None, None, ["k1"], [FAST], UNIX) for _ in range(300)]
                assert all(r.source == "redis" for r in got)
                theirs = max(theirs, sum(r.admitted for r in got))
            for _ in range(300):
                mine += (await memory.admit(None, None, ["k"], [FAST], UNIX)).admitted
            return mine, theirs
        finally:
            await red.aclose()

    mine, theirs = asyncio.run(run())
    assert 0 < mine <= 100
    assert 0 < theirs <= 100
