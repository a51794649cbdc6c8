"""Review 46 (fin46): a tiered sync left unfinished by an event loop that closed.

A sync takes the outcomes it sends from the cached breakers before its call. A loop
closed without cancelling its tasks (`run_until_complete`, then `close()`, as a worker
or a test runner may do) with a sync out leaves that task pending for good: its
outcomes were neither sent nor counted anywhere, and the next loop's sync (cmp45 lets it
start) knew nothing of them. Now the next loop that notices the closed loop's work
(`_forget_closed_loop`) counts them in `dropped_records` and says so once.

Two event loops in sequence against the real redis-server the suite starts; the first
closes while its sync waits for a pooled connection (every one busy), so its call never
went out. Fails on the old code.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fidelity_mw.decide.breaker import FAILURE
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [
    pytest.mark.redis,
    # (the closed loop's task holds coroutines that never ran on)
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]

BREAKER = BreakerConfig(min_calls=5, failure_ratio=0.5, window_s=600.0, open_s=600.0)


def test_outcomes_of_a_closed_loops_sync_are_counted(redis_url: str) -> None:
    clock = FakeClock()
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)
    store = TieredStore(config=config, clock=clock)

    async def first() -> asyncio.Future[Any] | None:
        result = await store.admit("up", BREAKER, (), (), clock.monotonic())
        assert result.gate is not None
        for _ in range(3):
            store.record_now("up", BREAKER, result.gate, FAILURE, False, clock.monotonic())
        slots = store.exact._bound[2]
        while slots.try_acquire():  # every pooled connection busy: the sync waits
            pass
        clock.advance(store.sync_s)
        store._maybe_sync(clock.monotonic())
        for _ in range(100):
            await asyncio.sleep(0)
            if store._held() == (0, 0):
                break
        assert store._held() == (0, 0)  # taken by the sync, which waits
        return store._sync_task

    loop = asyncio.new_event_loop()
    try:
        stale = loop.run_until_complete(first())
    finally:
        loop.close()  # with the sync still out
    assert stale is not None
    assert not stale.done()

    async def second() -> int:
        clock.advance(store.sync_s)
        await store.admit("up", BREAKER, (), (), clock.monotonic())  # refreshed
        clock.advance(store.sync_s * 0.9)
        await store.admit("up", BREAKER, (), (), clock.monotonic())  # on the cache: syncs
        dropped = store.exact.stats.dropped_records
        await store.aclose()
        return dropped

    assert asyncio.run(second()) == 3  # before: 0, the 3 failures gone without a count
    if isinstance(stale, asyncio.Task):
        stale.get_coro().close()
