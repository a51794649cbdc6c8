"""Review 27 (state): the stores held to decide/ where they had parted.

Each test fails without its fix. Redis tests run the scripts on a pinned clock
(tests/redis_clock.py) against the suite's redis-server.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from fidelity_mw.decide.breaker import FAILURE, SUCCESS
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_clock import RedisClock

pytestmark = [pytest.mark.redis]

T0 = 1_000.0


def _tiered(url: str, clock: FakeClock) -> TieredStore:
    config = StateConfig(url="tiered+" + url, sync_interval_ms=100)
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
