"""Review 46 (fin46): what a tiered store's `aclose` lost without a word.

1. An outcome recorded while the close ran, after the tiered store's own flush (while
   it waited for its tasks, or for the exact store's close), was counted in the cached
   breaker and never sent: no sync runs after the close, nothing counted it as dropped,
   nothing said so. The Redis store sends what requests queue during its close (fin45);
   the tiered store now hands such outcomes to it (they go as an exact store's do).
2. A lease in flight when the close began was cancelled after its call had reached
   Redis: the units it took from the fleet's bucket were never given back (the close's
   flush left out slices with a lease in flight) and no count or log said so. The close
   now lets the store's running calls end (bounded, as its flush) before it flushes.

Against the real redis-server the suite starts, on a FakeClock (the limits are decided
on Redis's clock: a rate of one an hour does not refill during the test). Each test
fails on the old code.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fidelity_mw.decide.breaker import FAILURE
from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

WAIT_S = 60.0  # a bound on waits that end as soon as the other side has acted
# One failure opens it: whether the failure reached Redis is the breaker's state there.
ONE_FAILURE = BreakerConfig(min_calls=1, failure_ratio=0.5, window_s=600.0, open_s=600.0)
BURST = 40
SLOW = LimitSpec("slow", 3600.0, 3600.0 * (BURST - 1), 1, False)  # 1/hour, burst 40


def _tiered(redis_url: str, clock: FakeClock) -> TieredStore:
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)
    return TieredStore(config=config, clock=clock)


def _redis(redis_url: str, clock: FakeClock) -> RedisStore:
    return RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)


async def _record(store: TieredStore, key: str, gate: Any, now: float) -> None:
    """As the middleware and the transport record an outcome."""
    if store.record_now(key, ONE_FAILURE, gate, FAILURE, False, now) is None:
        await store.record(key, ONE_FAILURE, gate, FAILURE, False, now)


async def _until(condition: Any) -> None:
    for _ in range(100_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


async def _fleet_state(redis_url: str, clock: FakeClock, key: str) -> str:
    other = _redis(redis_url, clock)
    try:
        gate, _source, _age = await other.breaker_gate(key, ONE_FAILURE, clock.monotonic())
    finally:
        await other.aclose()
    return gate.state


async def test_an_outcome_recorded_during_the_exact_stores_close_reaches_redis(
    redis_url: str,
) -> None:
    clock = FakeClock()
    store = _tiered(redis_url, clock)
    try:
        result = await store.admit("up-a", ONE_FAILURE, (), (), clock.monotonic())
        assert result.gate is not None
        assert result.gate.verdict == "allow"
        # the exact store has a budget count to send at its close: a round trip there
        await store.budget_request("budget:a", RetryConfig(), clock.monotonic())
        closing = asyncio.create_task(store.aclose())
        await _until(lambda: store.exact._closing)  # the tiered store's own flush is over
        await _record(store, "up-a", result.gate, clock.monotonic())  # the call ends, failed
        await asyncio.wait_for(closing, WAIT_S)
        assert store.exact.stats.dropped_records == 0
        assert await _fleet_state(redis_url, clock, "up-a") == "open"  # before: closed
        calls, _units = store._held()
        assert calls == 0  # before: 1, held in the cache after the close
    finally:
        await store.aclose()


async def test_an_outcome_recorded_after_the_close_is_not_held_in_the_cache(
    redis_url: str,
) -> None:
    """After `aclose` (a process that goes on, or a second lifespan) an outcome goes to
    the exact store, which sends it (opening a client again, said in the log) as it
    sends its own; held in the cache it waited for a sync that never came."""
    clock = FakeClock()
    store = _tiered(redis_url, clock)
    try:
        result = await store.admit("up-b", ONE_FAILURE, (), (), clock.monotonic())
        assert result.gate is not None
        await store.aclose()
        await _record(store, "up-b", result.gate, clock.monotonic())
        assert store._held() == (0, 0)  # before: (1, 0)
        assert await _fleet_state(redis_url, clock, "up-b") == "open"  # before: closed
    finally:
        await store.aclose()


async def _taken(redis_url: str, clock: FakeClock, key: str) -> int:
    """Units gone from the fleet's bucket for `key`: a peek's remaining (what would be
    left after one more request: BURST - 1 on a full bucket), against the burst."""
    other = _redis(redis_url, clock)
    try:
        result = await other.peek([key], [SLOW], clock.monotonic())
    finally:
        await other.aclose()
    return BURST - 1 - result.limits[0].remaining


async def test_a_lease_in_flight_at_the_close_is_given_back(redis_url: str) -> None:
    clock = FakeClock()
    store = _tiered(redis_url, clock)
    key = "slow|close-lease"
    try:
        await store.admit("warm", ONE_FAILURE, (), (), clock.monotonic())  # a client made
        request = asyncio.create_task(store.admit(None, None, [key], [SLOW], clock.monotonic()))
        # its lease call is out (the batch flushed, the slice waits on it)
        await _until(
            lambda: (
                store._lease_batch is None
                and key in store.slices
                and store.slices[key].pending is not None
            )
        )
        await asyncio.wait_for(store.aclose(), WAIT_S)
        result = await asyncio.wait_for(request, WAIT_S)
        assert result.admitted
        # the request's unit spent, the rest of the lease given back
        assert await _taken(redis_url, clock, key) == 1  # before: 2, one unit never returned
    finally:
        await store.aclose()


async def test_a_record_queued_at_the_redis_stores_close_is_sent(redis_url: str) -> None:
    """The Redis store's own close cancelled the coalescer's batches: a failure a
    request recorded just before it (queued for the next tick) was dropped, counted in
    `dropped_records` only. Now the batches queued or out go first (bounded)."""
    clock = FakeClock()
    store = _redis(redis_url, clock)
    try:
        gate, _source, _age = await store.breaker_gate("up-c", ONE_FAILURE, clock.monotonic())
        now = clock.monotonic()
        recording = asyncio.create_task(
            store.record("up-c", ONE_FAILURE, gate, FAILURE, False, now)
        )
        await asyncio.sleep(0)  # queued: its batch goes out in the next tick
        assert store.coalescer._tasks
        await store.aclose()  # (in this task: before the batch's first step)
        assert await asyncio.wait_for(recording, WAIT_S) == "open"  # before: closed
        assert store.stats.dropped_records == 0  # before: 1
        assert await _fleet_state(redis_url, clock, "up-c") == "open"
    finally:
        await store.aclose()


async def test_a_sync_cancelled_with_outcomes_counts_them(redis_url: str) -> None:
    """A sync cancelled before its call went out (waiting for a pooled connection, when
    the close's bounded wait ends or a loop ends with the task) took the breakers'
    outcomes with it: gone from the cache, never sent, never counted in
    `dropped_records`. Now counted, as a lost reply's outcomes are. (Cancelled once its
    call is out, the call itself answers None and they are counted there.)"""
    clock = FakeClock()
    store = _tiered(redis_url, clock)
    try:
        result = await store.admit("up-d", ONE_FAILURE, (), (), clock.monotonic())
        assert result.gate is not None
        for _ in range(3):
            now = clock.monotonic()
            assert store.record_now("up-d", ONE_FAILURE, result.gate, FAILURE, False, now)
        assert store._held() == (3, 0)
        # every pooled connection busy (other requests' calls): the sync waits for one
        slots = store.exact._bound[2]
        taken = 0
        while slots.try_acquire():
            taken += 1
        clock.advance(store.sync_s)
        store._maybe_sync(clock.monotonic())
        task = store._sync_task
        assert task is not None
        await _until(lambda: store._held() == (0, 0))  # taken from the cache: it waits
        assert not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()
        assert store.exact.stats.dropped_records == 3  # before: 0, and nothing held
        for _ in range(taken):
            slots.release()
    finally:
        await store.aclose()
