"""Review 43 (load flakes): retry-budget request counts made while their flush waited.

A Redis (or tiered) store keeps a top-level request's budget count waiting for the next
outbound call, and starts a background flush once the oldest count waiting is a sync
interval old (`RedisStore.budget_request`). Counts made while that flush waited for
Redis found it running and started none; the flush sent only what it found, so when no
request came after them they stayed waiting for good, however old. Seen at load 16 as
`test_defects_review38_state`'s "16 waiting where at most 10 are allowed" (a flush's
round trip outlasted the test's 5 ms between calls). Now the flush goes on while the
oldest count left is a sync interval old. Counts younger than that still wait for the
next call, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fidelity_mw.policy import RetryConfig, StateConfig
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

CFG = RetryConfig()


def _hold_round_trips(store: RedisStore) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the store's Redis calls wait for `release` (a slow round trip, without a
    real wait); `entered` is set when one is waiting."""
    entered = asyncio.Event()
    release = asyncio.Event()
    call = store.call

    async def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await release.wait()
        return await call(*args, **kwargs)

    store.call = held  # type: ignore[method-assign]
    return entered, release


async def _counted(store: RedisStore, key: str) -> int:
    rq = await store.client().hget(store.key("bu", key), "rq")
    return sum(int(n) for n in rq.split(b",")) if rq else 0


async def test_counts_made_during_a_slow_flush_are_sent_once_due(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    try:
        entered, release = _hold_round_trips(store)
        await store.budget_request("budget:h0", CFG, clock.monotonic())
        clock.advance(store.sync_s)
        await store.budget_request("budget:h1", CFG, clock.monotonic())  # h0 is due: a flush
        await asyncio.wait_for(entered.wait(), 60)  # the flush took h0, h1 and waits
        for i in range(2, 6):  # the flush is running: these start none
            await store.budget_request(f"budget:h{i}", CFG, clock.monotonic())
        clock.advance(store.sync_s)  # and no request comes after them
        release.set()
        task = store._flush_task
        assert task is not None
        await asyncio.wait_for(task, 60)
        waiting = store._unsent()[2]
        assert waiting == 0  # before: 4 (h2..h5), for good
        assert store.stats.fallbacks == 0
        assert [await _counted(store, f"budget:h{i}") for i in range(6)] == [1] * 6
    finally:
        await store.aclose()


async def test_counts_not_yet_due_still_wait_for_the_next_call(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    try:
        entered, release = _hold_round_trips(store)
        await store.budget_request("budget:y0", CFG, clock.monotonic())
        clock.advance(store.sync_s)
        await store.budget_request("budget:y1", CFG, clock.monotonic())
        await asyncio.wait_for(entered.wait(), 60)
        await store.budget_request("budget:y2", CFG, clock.monotonic())  # not yet due
        release.set()
        task = store._flush_task
        assert task is not None
        await asyncio.wait_for(task, 60)
        assert store._unsent()[2] == 1
        assert [await _counted(store, f"budget:y{i}") for i in range(2)] == [1, 1]
    finally:
        await store.aclose()
