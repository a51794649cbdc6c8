"""Evidence-based breaker recovery (issue 13): the open time starts at open_min_s, doubles
with each failed half-open round up to open_s, and a successful probe closes the breaker
and starts over. Pure state machine, memory store and Redis (pinned Lua clock) alike."""

from __future__ import annotations

import pytest

from fidelity_mw.decide.breaker import (
    CLOSED,
    FAILURE,
    HALF_OPEN,
    OPEN,
    SUCCESS,
    BreakerState,
    open_time,
)
from fidelity_mw.decide.specs import BreakerSpec
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import StateStore
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock
from redis_clock import RedisClock
from redis_server import PATIENT

T0 = 1_000.0
CFG = BreakerConfig(
    min_calls=1, failure_ratio=0.5, open_s=4.0, open_min_s=0.5, open_jitter=0.0, half_open_probes=1
)


def mid() -> float:
    return 0.5


def test_open_time_doubles_per_failed_round_up_to_open_s() -> None:
    spec = BreakerSpec(open_s=4.0, open_min_s=0.5)
    assert [open_time(spec, k) for k in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert open_time(spec, 10_000) == 4.0  # no overflow
    fixed = BreakerSpec(open_s=5.0, open_min_s=5.0)
    assert {open_time(fixed, k) for k in range(5)} == {5.0}
    assert open_time(BreakerSpec(open_s=1.0, open_min_s=3.0), 0) == 1.0


def test_open_time_grows_with_failed_probes_and_resets_on_success() -> None:
    clock = FakeClock(start=T0)
    b = BreakerState(CFG)

    def call(outcome: str) -> str:
        gate = b.gate(clock.monotonic(), mid)
        assert gate.verdict in ("allow", "probe")
        return b.record(gate.epoch, gate.probe_id, outcome, clock.monotonic(), mid)

    assert call(FAILURE) == OPEN
    periods = []
    for _ in range(5):  # the upstream stays down: every probe fails
        period = b.open_until - clock.monotonic()
        periods.append(period)
        clock.advance(period - 0.01)
        assert b.gate(clock.monotonic(), mid).verdict == "reject"
        clock.advance(0.01)  # the open time is over: a probe goes at once
        probe = b.gate(clock.monotonic(), mid)
        assert probe.verdict == "probe"
        assert b.state == HALF_OPEN
        assert b.record(probe.epoch, probe.probe_id, FAILURE, clock.monotonic(), mid) == OPEN
    assert periods == pytest.approx([0.5, 1.0, 2.0, 4.0, 4.0])
    clock.advance(b.open_until - clock.monotonic())
    assert call(SUCCESS) == CLOSED  # the upstream recovered: the probe closes it
    assert call(FAILURE) == OPEN  # a new incident starts short again
    assert b.open_until - clock.monotonic() == pytest.approx(0.5)


async def _periods(store: StateStore, set_now, rounds: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Trip, then let `rounds` probes fail; the retry-after of each open period."""
    key, now = "upstream:h", T0
    set_now(now)
    gate = (await store.breaker_gate(key, CFG, now))[0]
    await store.record(key, CFG, gate, FAILURE, False, now)
    periods = []
    for _ in range(rounds):
        shed = (await store.breaker_gate(key, CFG, now))[0]
        assert shed.verdict == "reject"
        periods.append(round(shed.retry_after_s, 6))
        now += shed.retry_after_s
        set_now(now)
        probe = (await store.breaker_gate(key, CFG, now))[0]
        assert probe.verdict == "probe"
        await store.record(key, CFG, probe, FAILURE, False, now)
    shed = (await store.breaker_gate(key, CFG, now))[0]
    now += shed.retry_after_s
    set_now(now)
    probe = (await store.breaker_gate(key, CFG, now))[0]
    assert probe.verdict == "probe"
    assert await store.record(key, CFG, probe, SUCCESS, False, now) == CLOSED
    gate = (await store.breaker_gate(key, CFG, now))[0]
    await store.record(key, CFG, gate, FAILURE, False, now)
    periods.append(round((await store.breaker_gate(key, CFG, now))[0].retry_after_s, 6))
    return periods


@pytest.mark.anyio
async def test_memory_store_open_time_growth_and_reset() -> None:
    assert await _periods(MemoryStore(rng=mid), lambda now: None, 5) == [
        0.5,
        1.0,
        2.0,
        4.0,
        4.0,
        0.5,
    ]


@pytest.mark.anyio
@pytest.mark.redis
async def test_redis_store_open_time_growth_and_reset(
    redis_url: str, redis_clock: RedisClock
) -> None:
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT), rng=mid)
    try:
        periods = await _periods(store, redis_clock.set, 5)
    finally:
        await store.aclose()
    assert periods == [0.5, 1.0, 2.0, 4.0, 4.0, 0.5]
