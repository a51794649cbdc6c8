"""Review 46 (fin46): a late probe outcome taken by the Redis store's send task when the
close cancelled that task.

A probe outcome whose gate's reply was lost is kept (`_late`) and sent by a background
task once Redis answers, to free the probe slot Redis may have made for it. The task takes
the entry out, then calls. `aclose` cancels the task after its own flush: an entry taken
and not yet sent (its call waiting for a pooled connection) was gone, neither sent by the
close nor counted in `dropped_records`, nor in its warning; the slot stayed held
fleet-wide until its lease ended. Now the cancelled task puts it back and the close's
last flush sends it or counts and says it.

Against the real redis-server the suite starts, every pooled connection held busy so the
task's call waits. Fails on the old code.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def test_a_late_outcome_the_close_cancelled_is_counted(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    breaker = BreakerConfig()
    try:
        await store.breaker_gate("up", breaker, clock.monotonic())  # a client made
        slots = store._bound[2]
        while slots.try_acquire():  # every pooled connection busy
            pass
        store._report_late("up", breaker, 4242, "failure", False)
        task = store._late_task
        assert task is not None
        for _ in range(100):
            await asyncio.sleep(0)
            if not store._late:
                break
        assert not store._late  # taken by the task, whose call waits
        with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
            await asyncio.wait_for(store.aclose(), 60)
        assert task.cancelled()
        # not sent (no connection came free within the close's second): counted and said
        assert store.stats.dropped_records == 1  # before: 0
        assert any("1 breaker outcome(s)" in r.getMessage() for r in caplog.records)
    finally:
        await store.aclose()
