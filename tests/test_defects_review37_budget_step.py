"""A retry budget's window after the clock went back, on the transports' first-attempt path.

`BudgetWindow.request` (decide/budget.py) and outbound.lua's `bu_rotate` rotate a window
whose bucket end lies more than two buckets ahead (set before the clock went back): the
requests counted before the step leave the window one window later, not when the clock
catches up with the old bucket end. The memory store's `outbound_begin_now` (what the
transports call for a first attempt on in-process state) counted its request without
that check: after a 600 s step back the requests counted before it stayed in the window
for 600 s, each earning half a retry (100 requests: 51 retries a window later, where
every other path allows the floor's one). One model: memory's both paths, Redis and
tiered are asked the same, at the same pinned times.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from fidelity_mw.policy import RetryConfig, StateConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from redis_clock import RedisClock
from redis_server import PATIENT, QUIET

pytestmark = pytest.mark.anyio

CFG = RetryConfig(budget_ratio=0.5, budget_min_per_s=0.1, budget_window_s=10.0)
KEY = "budget:api"
T1 = 1_000_000.0
BACK = 600.0  # the clock steps ten minutes back


async def _retries_a_window_after_a_step_back(
    first: Callable[[float], Awaitable[object]],
    store: object,
    pin: Callable[[float], None],
) -> int:
    """100 first attempts at T1, one after the clock stepped back, then the retries the
    budget allows a window and a bit after the step."""
    pin(T1)
    for _ in range(100):
        await first(T1)
    back = T1 - BACK
    pin(back)
    await first(back)  # the step, seen by a first attempt
    later = back + CFG.budget_window_s + 2.0
    pin(later)
    allowed = 0
    for _ in range(60):
        allowed += (await store.budget_try_retry(KEY, CFG, later))[0]  # type: ignore[attr-defined]
    return allowed


async def test_memory_first_attempts_rotate_a_window_set_before_the_clock_went_back() -> None:
    memory = MemoryStore(rng=lambda: 0.5)

    async def begin(now: float) -> None:
        memory.outbound_begin_now("upstream:api", None, KEY, CFG, now)

    allowed = await _retries_a_window_after_a_step_back(begin, memory, lambda _now: None)
    assert allowed == 1  # the floor, 0.1/s x 10 s; before: 51


async def test_memory_first_attempts_with_a_breaker_rotate_the_same() -> None:
    from fidelity_mw.policy import BreakerConfig

    memory = MemoryStore(rng=lambda: 0.5)
    breaker = BreakerConfig()

    async def begin(now: float) -> None:
        memory.outbound_begin_now("upstream:api", breaker, KEY, CFG, now)

    allowed = await _retries_a_window_after_a_step_back(begin, memory, lambda _now: None)
    assert allowed == 1


@pytest.mark.redis
async def test_every_store_counts_the_same_after_the_step(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """The differential: memory's `outbound_begin_now` and `outbound_gate`, and Redis's
    outbound.lua, at the same pinned times. (Tiered keeps budgets in its exact store:
    the same script.)"""
    red = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), rng=lambda: 0.5)
    got: dict[str, int] = {}
    try:
        begin_memory = MemoryStore(rng=lambda: 0.5)

        async def begin(now: float) -> None:
            begin_memory.outbound_begin_now("upstream:api", None, KEY, CFG, now)

        got["memory begin"] = await _retries_a_window_after_a_step_back(
            begin, begin_memory, redis_clock.set
        )
        for name, store in (("memory gate", MemoryStore(rng=lambda: 0.5)), ("redis", red)):

            async def gate(now: float, store: object = store) -> None:
                await store.outbound_gate(None, None, KEY, CFG, False, now)  # type: ignore[attr-defined]

            got[name] = await _retries_a_window_after_a_step_back(gate, store, redis_clock.set)
        assert red.stats.fallbacks == 0  # every answer was Redis's
    finally:
        await red.aclose()
    assert got == {"memory begin": 1, "memory gate": 1, "redis": 1}
