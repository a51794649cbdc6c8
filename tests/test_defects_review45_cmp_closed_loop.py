"""Round 45 (cmp45): a store's background task of an event loop that closed no longer
blocks the same work on the loops after it.

The Redis store keeps one task each for its budget-count flush, its probe while Redis is
down, its deferred and late breaker outcomes and its fleet announcement, and starts one
only when the last has ended (`task is None or task.done()`); the tiered store the same
for its sync, and its requests join the lease in flight (a future). A loop closed
without cancelling its tasks (`run_until_complete`, then `close()`, as a worker or a
test runner may do) leaves them pending for good, so on a later loop: budget counts were
never flushed, a store that saw Redis down never probed again (every call fell back for
the life of the process), the tiered cache never synced, a request that joined the
closed loop's lease waited for it for good, and `aclose` raised (a task of a closed loop
cannot be cancelled: "Event loop is closed").

Two event loops in sequence, the first closed with its store's task in flight, against
the real redis-server the suite starts. Each test fails on the old code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fidelity_mw.decide.breaker import FAILURE
from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [
    pytest.mark.redis,
    # (the closed loop's tasks hold coroutines of redis-py that never ran on)
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]

CFG = RetryConfig()


class WaitingClock(FakeClock):
    """A fake clock whose `sleep` waits until the test moves the clock past its end, as a
    real sleep waits for time to pass (`FakeClock.sleep` moves the clock itself): a task
    sleeping on it stays where it is when its loop closes."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        woken = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not woken.done() and not woken.get_loop().is_closed():
                woken.get_loop().call_soon_threadsafe(_resolve, woken)

        self.call_later(max(0.0, seconds), wake)
        await woken


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _run_then_close(step: Callable[[], Awaitable[Any]]) -> Any:
    """Run `step` on a new loop, then close the loop without cancelling its tasks."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(step())
    finally:
        loop.close()


def _run(step: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(step())


async def _aclose(store: RedisStore | TieredStore) -> str | None:
    """Close the store; what it raised (before: cancelling the closed loop's task raised
    RuntimeError, "Event loop is closed")."""
    try:
        await store.aclose()
    except RuntimeError as exc:
        return repr(exc)
    return None


def _drop(*tasks: asyncio.Future[Any] | None) -> None:
    """Close the coroutines of the closed loop's tasks (else "never awaited" warnings)."""
    for task in tasks:
        if isinstance(task, asyncio.Task):
            task.get_coro().close()


async def _settle(task_of: Callable[[], asyncio.Future[Any] | None]) -> None:
    """Let a task of this loop that the store started run to its end (bounded)."""
    loop = asyncio.get_running_loop()
    for _ in range(5):
        await asyncio.sleep(0)
        task = task_of()
        if task is not None and not task.done() and task.get_loop() is loop:
            await asyncio.wait_for(asyncio.shield(task), 60)


async def _counted(store: RedisStore, key: str) -> int:
    rq = await store.client().hget(store.key("bu", key), "rq")
    return sum(int(n) for n in rq.split(b",")) if rq else 0


def test_budget_counts_are_flushed_on_the_next_loop(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)

    async def first() -> asyncio.Future[Any] | None:
        await store.budget_request("budget:old", CFG, clock.monotonic())
        clock.advance(store.sync_s)  # due: the timer starts a flush, which this loop ends in
        return store._flush_task

    stale = _run_then_close(first)
    assert stale is not None
    assert not stale.done()  # and never will be

    async def second() -> tuple[int, int, str | None]:
        await store.budget_request("budget:new", CFG, clock.monotonic())
        clock.advance(store.sync_s)  # due on this loop; no other call comes
        await _settle(lambda: store._flush_task)
        left = store._unsent()[2]
        counted = await _counted(store, "budget:new")
        return left, counted, await _aclose(store)

    left, counted, close_error = _run(second)
    assert (left, counted) == (0, 1)  # before: 1 and 0, for as long as the process ran
    assert close_error is None
    _drop(stale)


def test_a_store_that_saw_redis_down_probes_again_on_the_next_loop(redis_url: str) -> None:
    clock = WaitingClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    breaker = BreakerConfig()

    async def first() -> asyncio.Future[Any] | None:
        store.health.up = False  # as a failed call leaves it
        store.health.down_since = clock.monotonic()
        _gate, source, _age = await store.breaker_gate("up", breaker, clock.monotonic())
        assert source == "fallback"
        return store.health.probe_task  # asleep for its backoff

    stale = _run_then_close(first)
    assert stale is not None
    assert not stale.done()

    async def second() -> tuple[bool, str]:
        await store.breaker_gate("up", breaker, clock.monotonic())  # falls back, probes
        for _ in range(3000):  # 30 s at most on a starved machine; a few steps when quiet
            clock.advance(1.0)  # past any backoff (at most 0.5 s)
            await asyncio.sleep(0.01)  # (the probe's round trips to Redis)
            if store.health.up:
                break
        _gate, source, _age = await store.breaker_gate("up", breaker, clock.monotonic())
        return store.health.up, source, await _aclose(store)

    up, source, close_error = _run(second)
    assert (up, source) == (True, "redis")  # before: down for good, every call `fallback`
    assert close_error is None
    _drop(stale)


def test_tiered_outcomes_sync_on_the_next_loop(redis_url: str) -> None:
    clock = FakeClock()
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)
    store = TieredStore(config=config, clock=clock)
    breaker = BreakerConfig(min_calls=5, failure_ratio=0.5, window_s=600.0, open_s=600.0)

    async def first() -> asyncio.Future[Any] | None:
        await store.admit("a", breaker, (), (), clock.monotonic())
        clock.advance(store.sync_s * 0.9)
        await store.admit("a", breaker, (), (), clock.monotonic())  # starts the sync due
        return store._sync_task  # which this loop ends in

    stale = _run_then_close(first)
    assert stale is not None
    assert not stale.done()

    async def second() -> tuple[int, int, str, str | None]:
        gates = []
        for _ in range(6):  # the first refreshes the breaker; the rest decide on the cache
            result = await store.admit("up", breaker, (), (), clock.monotonic())
            assert result.gate is not None
            gates.append(result.gate)
        syncs = store.stats.syncs
        for gate in gates:
            store.record_now("up", breaker, gate, FAILURE, False, clock.monotonic())
        clock.advance(store.sync_s * 0.9)  # a sync is due; the breaker is fresh still
        await store.admit("up", breaker, (), (), clock.monotonic())  # on the cache
        await _settle(lambda: store._sync_task)
        other = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
        gate, _source, _age = await other.breaker_gate("up", breaker, clock.monotonic())
        await other.aclose()
        synced, held = store.stats.syncs - syncs, store.breakers["up"].calls
        return synced, held, gate.state, await _aclose(store)

    synced, held, fleet_state, close_error = _run(second)
    assert synced == 1  # before: 0 (the closed loop's sync "still running")
    assert held == 0  # before: 6 outcomes held
    assert fleet_state == "open"  # before: closed
    assert close_error is None
    _drop(stale)


def test_tiered_request_does_not_join_a_closed_loops_lease(redis_url: str) -> None:
    clock = FakeClock()
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)
    store = TieredStore(config=config, clock=clock)
    spec = LimitSpec("a", 0.01, 10.0, 1, False)

    async def first() -> None:
        # a request that needs a lease, and the loop closes before the lease goes out
        asyncio.get_running_loop().create_task(
            store.admit(None, None, ["a|k"], [spec], clock.monotonic())
        )

    _run_then_close(first)
    assert store._lease_batch is not None  # the closed loop's, never sent
    stale = list(store._lease_tasks)

    async def second() -> tuple[bool, str | None]:
        # (bounded: before, the request waited on the closed loop's lease for good)
        admit = store.admit(None, None, ["a|k"], [spec], clock.monotonic())
        result = await asyncio.wait_for(admit, 60)
        return result.admitted, await _aclose(store)

    assert _run(second) == (True, None)  # before: TimeoutError
    _drop(*stale)
