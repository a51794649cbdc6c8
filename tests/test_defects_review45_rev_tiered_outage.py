"""Review 45 (rev45): a tiered store's quiet timer (review 44) synced while Redis was
down, and the sync dropped what it carried.

A sync with Redis down makes no round trip: the call answers None at once, and
`_sync_call` counts the outcomes it took as dropped (and the slices it planned to give
back are gone, their units with them). Before the timer no sync ran during an outage
(requests are decided by the exact store's failure mode then, and only requests started
syncs), so a process's unsent outcomes waited for Redis, as docs/state.md says: held
over the breaker's `window_s` at most, then dropped. With the timer they were dropped
one interval into any outage, and the failures that preceded it never reached the
fleet's breaker. Now the timer looks again an interval later while Redis is down.
"""

from __future__ import annotations

import asyncio

import pytest

from fidelity_mw.decide.breaker import FAILURE
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def _synced(store: TieredStore) -> None:
    for _ in range(3):
        await asyncio.sleep(0)
        task = store._sync_task
        if task is not None and not task.done():
            await asyncio.wait_for(asyncio.shield(task), 60)


async def test_outcomes_held_through_an_outage_reach_the_fleet_after_it(
    redis_url: str,
) -> None:
    clock = FakeClock()
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)
    store = TieredStore(config=config, clock=clock)
    other = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    breaker = BreakerConfig(min_calls=5, failure_ratio=0.5, window_s=600.0, open_s=600.0)
    try:
        gates = []
        for _ in range(6):
            result = await store.admit("outage-up", breaker, (), (), clock.monotonic())
            assert result.gate is not None
            gates.append(result.gate)
        await _synced(store)
        for gate in gates:
            assert store.record_now("outage-up", breaker, gate, FAILURE, False, clock.monotonic())
        # Redis goes away before the next sync (as a failed call leaves it; the probe
        # that call starts is left out here: it would find this server up)
        store.exact.health.up = False
        dropped = store.exact.stats.dropped_records
        for _ in range(3):
            clock.advance(store.sync_s * 1.1)
            await _synced(store)
        assert store.exact.stats.dropped_records == dropped  # before: 6 dropped
        assert store.breakers["outage-up"].calls == 6
        assert store._quiet_timer._handle is not None  # it looks again while down
        store.exact.health.up = True  # Redis answers again
        clock.advance(store.sync_s * 1.1)
        await _synced(store)
        assert store.breakers["outage-up"].calls == 0
        gate, _source, _age = await other.breaker_gate("outage-up", breaker, clock.monotonic())
        assert gate.state == "open"  # before: closed
    finally:
        await store.aclose()
        await other.aclose()
