"""Review 45 (fin45): what a store's `aclose` lets run while it waits.

`aclose` awaits several times (the flush of what is queued, the coalescer, each
background task it cancelled) and cancelled its timers only at the end. A timer that
fired meanwhile (a request's budget count made during the close, its interval passed)
started a flush task after the list of tasks to cancel was read: nothing cancelled it
or waited for it (it ran on with the client being closed, or made a new one after).
Now such timers start nothing during the close, and the close sends what requests
queued meanwhile itself.

And `aclose` waited for each task it cancelled under `suppress(CancelledError)`, which
swallowed a cancellation of `aclose` itself: a shutdown timeout or a task group that
cancelled the close found it going on, and ending normally.

The interleavings are made deterministic with a background task of the store's that
ends only when the test says (cancelled, it waits for an event), and a FakeClock the
test advances while `aclose` waits for that task. Against the real redis-server the
suite starts; each test fails on the old code.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.state.timer import alive
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

CFG = RetryConfig()
WAIT_S = 60.0  # a bound on waits that end as soon as the other side has acted


class SlowToEnd:
    """A background task that, cancelled, ends only once `release` is set (or it is
    cancelled again), as a task finishing a round trip does."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            await self.release.wait()
            raise


def _redis(redis_url: str, clock: FakeClock) -> RedisStore:
    return RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)


async def test_a_timer_firing_during_aclose_starts_no_flush(redis_url: str) -> None:
    clock = FakeClock()
    store = _redis(redis_url, clock)
    try:
        await store.breaker_gate("up", BreakerConfig(), clock.monotonic())  # a client made
        slow = SlowToEnd()
        await asyncio.sleep(0)
        store._late_task = slow.task  # type: ignore[assignment]
        closing = asyncio.create_task(store.aclose())
        await asyncio.wait_for(slow.cancelled.wait(), WAIT_S)
        # while aclose waits for it: a request's budget count, and its interval passes
        await store.budget_request("budget:late", CFG, clock.monotonic())
        clock.advance(store.sync_s)
        started: Any = store._flush_task
        slow.release.set()
        await asyncio.wait_for(closing, WAIT_S)
        if alive(started):  # (what it does once aclose has ended)
            await asyncio.wait_for(asyncio.shield(started), WAIT_S)
        assert started is None  # before: a flush task, started after the list was read
        assert store._unsent() == (0, 0, 0)  # the count made meanwhile sent by the close
        assert store._closed
        assert asyncio.get_running_loop() not in store._clients
        other = _redis(redis_url, clock)
        try:
            rq = await other.client().hget(other.key("bu", "budget:late"), "rq")
        finally:
            await other.aclose()
        assert rq is not None
        assert sum(int(n) for n in rq.split(b",")) == 1
    finally:
        await store.aclose()


async def _cancel_while_closing(store: RedisStore | TieredStore, slow: SlowToEnd) -> bool:
    """Cancel `aclose` while it waits for `slow`; whether the close ended cancelled."""
    closing = asyncio.create_task(store.aclose())
    await asyncio.wait_for(slow.cancelled.wait(), WAIT_S)
    closing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(closing, WAIT_S)
    return closing.cancelled()


async def test_a_cancelled_redis_aclose_ends_cancelled(redis_url: str) -> None:
    clock = FakeClock()
    store = _redis(redis_url, clock)
    try:
        await store.breaker_gate("up", BreakerConfig(), clock.monotonic())
        slow = SlowToEnd()
        await asyncio.sleep(0)
        store._late_task = slow.task  # type: ignore[assignment]
        assert await _cancel_while_closing(store, slow)  # before: False, went on to the end
        assert slow.task.cancelled()
    finally:
        await store.aclose()
    assert store._closed


async def test_a_cancelled_tiered_aclose_ends_cancelled(redis_url: str) -> None:
    clock = FakeClock()
    store = TieredStore(
        config=StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET), clock=clock
    )
    try:
        await store.admit("up", BreakerConfig(), (), (), clock.monotonic())
        slow = SlowToEnd()
        await asyncio.sleep(0)
        store._sync_task = slow.task
        assert await _cancel_while_closing(store, slow)  # before: False
    finally:
        await store.aclose()
    assert store.exact._closed


async def test_aclose_in_a_cancelled_tasks_handler_still_closes(redis_url: str) -> None:
    """The task calling aclose was cancelled before (its shutdown runs in the handler):
    the tasks aclose cancels itself end as before, and the close goes to its end."""
    clock = FakeClock()
    store = _redis(redis_url, clock)
    await store.breaker_gate("up", BreakerConfig(), clock.monotonic())
    slow = SlowToEnd()
    await asyncio.sleep(0)
    store._late_task = slow.task  # type: ignore[assignment]
    slow.release.set()
    started = asyncio.Event()

    async def shutting_down() -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await store.aclose()
            raise

    task = asyncio.create_task(shutting_down())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)
    assert slow.task.cancelled()
    assert store._closed
