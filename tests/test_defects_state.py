"""Regression tests for state defects (issue 12): each failed on the code before its fix.

Redis tests run the real scripts on a pinned clock (tests/redis_clock.py), so
memory and Redis see the same `now`.
"""

from __future__ import annotations

import pytest

from fidelity_mw.decide.breaker import FAILURE, OPEN, SUCCESS, Gate
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import StateStore
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from redis_clock import RedisClock
from redis_server import PATIENT

T0 = 1_000.0


def mid() -> float:
    return 0.5


def redis_store(url: str, **state: object) -> RedisStore:
    config = StateConfig(url=url, **{**PATIENT, **state})  # type: ignore[arg-type]
    return RedisStore(config=config, rng=mid)


async def gate(store: StateStore, key: str, cfg: BreakerConfig, now: float) -> Gate:
    return (await store.breaker_gate(key, cfg, now))[0]


# ---------------------------------------------------------------- #11 ratio on every outcome

RATIO = BreakerConfig(min_calls=4, failure_ratio=0.5, open_jitter=0.0, window_s=30.0)


async def _fffs(store: StateStore, set_now) -> Gate:  # type: ignore[no-untyped-def]
    set_now(T0)
    for outcome in (FAILURE, FAILURE, FAILURE, SUCCESS):
        g = await gate(store, "upstream:h", RATIO, T0)
        assert g.verdict == "allow"
        await store.record("upstream:h", RATIO, g, outcome, False, T0)
    return await gate(store, "upstream:h", RATIO, T0)


@pytest.mark.anyio
async def test_defect11_ratio_checked_on_success_memory() -> None:
    store = MemoryStore(rng=mid)
    after = await _fffs(store, lambda now: None)
    assert after.verdict == "reject"
    assert after.state == OPEN


@pytest.mark.anyio
@pytest.mark.redis
async def test_defect11_ratio_checked_on_success_redis(
    redis_url: str, redis_clock: RedisClock
) -> None:
    store = redis_store(redis_url)
    try:
        after = await _fffs(store, redis_clock.set)
    finally:
        await store.aclose()
    assert after.verdict == "reject"
    assert after.state == OPEN


@pytest.mark.anyio
@pytest.mark.redis
async def test_defect11_deferred_successes_open_like_single_ones(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """F,F,F then four plain successes applied in one batch: the first success opens it."""
    store = redis_store(redis_url)
    try:
        redis_clock.set(T0)
        gates = [await gate(store, "upstream:h", RATIO, T0) for _ in range(7)]
        for g in gates[:3]:
            await store.record("upstream:h", RATIO, g, FAILURE, False, T0)
        for g in gates[3:]:
            await store.record("upstream:h", RATIO, g, SUCCESS, False, T0)  # deferred
        after = await gate(store, "upstream:h", RATIO, T0)
    finally:
        await store.aclose()
    memory = MemoryStore(rng=mid)
    mgates = [await gate(memory, "upstream:h", RATIO, T0) for _ in range(7)]
    for g, outcome in zip(mgates, [FAILURE] * 3 + [SUCCESS] * 4, strict=True):
        await memory.record("upstream:h", RATIO, g, outcome, False, T0)
    assert (await gate(memory, "upstream:h", RATIO, T0)).verdict == "reject"
    assert after.verdict == "reject"


# ---------------------------------------------------------------- #10 half-open probe slots

PROBES = BreakerConfig(
    min_calls=1, failure_ratio=0.5, open_s=1.0, open_jitter=0.0, half_open_probes=2
)


async def _probes_after_reopen(store: StateStore, set_now) -> list[str]:  # type: ignore[no-untyped-def]
    key = "upstream:p"
    set_now(T0)
    g = await gate(store, key, PROBES, T0)
    await store.record(key, PROBES, g, FAILURE, False, T0)  # opens until T0 + 1
    set_now(T0 + 1.0)
    p1 = await gate(store, key, PROBES, T0 + 1.0)
    p2 = await gate(store, key, PROBES, T0 + 1.0)
    assert (p1.verdict, p2.verdict) == ("probe", "probe")
    assert (await gate(store, key, PROBES, T0 + 1.0)).verdict == "reject"
    await store.record(key, PROBES, p1, FAILURE, False, T0 + 1.0)  # re-opens; p2 in flight
    set_now(T0 + 2.5)
    return [(await gate(store, key, PROBES, T0 + 2.5)).verdict for _ in range(3)]


@pytest.mark.anyio
async def test_defect10_probe_in_flight_keeps_its_slot_memory() -> None:
    verdicts = await _probes_after_reopen(MemoryStore(rng=mid), lambda now: None)
    assert verdicts == ["probe", "reject", "reject"]


@pytest.mark.anyio
@pytest.mark.redis
async def test_defect10_redis_half_open_admits_no_more_probes_than_configured(
    redis_url: str, redis_clock: RedisClock
) -> None:
    store = redis_store(redis_url)
    try:
        verdicts = await _probes_after_reopen(store, redis_clock.set)
    finally:
        await store.aclose()
    assert verdicts == ["probe", "reject", "reject"]
