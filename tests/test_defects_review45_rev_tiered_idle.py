"""Review 45 (rev45): a tiered store's cached breaker dropped as idle while a call it
admitted was still running.

A sync drops a cached breaker nobody used for `IDLE_INTERVALS` sync intervals (its
`used_at` is the last admission's start). A call that runs longer than that (a slow
route, an upstream that hangs until its timeout: 1 s at the default 100 ms interval)
on a breaker no other call used meanwhile, in a process whose other traffic keeps
syncing, then found no cached breaker when it ended, and `record_now` dropped its
outcome: the failures of exactly the calls that hang never reached the fleet's breaker.
"""

from __future__ import annotations

import asyncio

import pytest

from fidelity_mw.decide.breaker import FAILURE
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import IDLE_INTERVALS, TieredStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def _synced(store: TieredStore) -> None:
    for _ in range(3):
        await asyncio.sleep(0)
        task = store._sync_task
        if task is not None and not task.done():
            await asyncio.wait_for(asyncio.shield(task), 60)


async def test_outcomes_of_calls_longer_than_the_idle_bound_reach_the_fleet(
    redis_url: str,
) -> None:
    clock = FakeClock()
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)
    store = TieredStore(config=config, clock=clock)
    other = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    breaker = BreakerConfig(min_calls=3, failure_ratio=0.5, window_s=600.0, open_s=600.0)
    busy = LimitSpec("busy", 1e-3, 10.0, 1, False)
    try:
        gates = []
        for _ in range(3):  # three slow calls start together
            result = await store.admit("slow-route", breaker, (), (), clock.monotonic())
            assert result.gate is not None
            assert result.gate.verdict == "allow"
            gates.append(result.gate)
        await _synced(store)
        # other routes keep this process busy: their requests sync every interval
        for _ in range(IDLE_INTERVALS + 2):
            clock.advance(store.sync_s)
            assert (await store.admit(None, None, ["busy|k"], [busy], clock.monotonic())).admitted
            await _synced(store)
        # the slow calls end, failed
        assert "slow-route" not in store.breakers  # dropped as idle while they ran
        for gate in gates:  # as the middleware and the transport record
            now = clock.monotonic()
            if store.record_now("slow-route", breaker, gate, FAILURE, False, now) is None:
                await store.record("slow-route", breaker, gate, FAILURE, False, now)
        clock.advance(store.sync_s)
        assert (await store.admit(None, None, ["busy|k"], [busy], clock.monotonic())).admitted
        await _synced(store)
        gate, _source, _age = await other.breaker_gate("slow-route", breaker, clock.monotonic())
        assert gate.state == "open"  # before: closed, the 3 failures dropped
    finally:
        await store.aclose()
        await other.aclose()
