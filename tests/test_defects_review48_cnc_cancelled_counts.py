"""Review 48 (cnc48): counts a Redis or tiered store call carried away when it was
cancelled, or left unfinished by an event loop that closed.

A call takes what it sends out of the store's tables before it goes: the retry-budget
request counts waiting (`budget_request`, tiered mode), the plain successes deferred,
a late probe outcome, the leased units a tiered sync gives back. Cancelled (a close's
bounded wait, `aclose` cancelling the flush task, a request's deadline) or left by a
loop that closed (its `except` and `finally` never run), what it carried was gone
without a count, and the close's line did not say it:

1. a budget flush cancelled while it waited for a pooled connection lost its counts
   (never sent: now they wait again); cancelled once sent, they were not counted (now
   `stats.dropped_budget_counts` and a warning);
2. a close whose bounded flush ran out while the counts waited for a connection said
   nothing of them (now its line names them);
3. the Redis store's background calls of a loop that closed: budget counts and
   deferred successes uncounted (now counted by the next loop), a late probe outcome
   gone (now sent on the next loop);
4. a tiered close whose give-back of leased units was cancelled said nothing of the
   units (now `stats.units_not_returned` and the close's line).

Against the real redis-server the suite starts; every pooled connection is held by the
test where a call must wait for one, and Redis is paused (`CLIENT PAUSE`) where a call
must be out. Each test fails on the old code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from fidelity_mw.decide.breaker import SUCCESS
from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore, Slots
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [
    pytest.mark.redis,
    # (a closed loop's tasks hold coroutines that never ran on)
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]

CFG = RetryConfig()
BREAKER = BreakerConfig()
WAIT_S = 60.0  # a bound on waits that end as soon as the store has acted


def _store(redis_url: str, clock: FakeClock) -> RedisStore:
    return RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)


def _dropped_counts(store: RedisStore) -> int:
    return int(getattr(store.stats, "dropped_budget_counts", 0))


def _hold_every_connection(slots: Slots) -> int:
    held = 0
    while slots.try_acquire():
        held += 1
    return held


async def _until(done: Callable[[], bool]) -> None:
    """Let the store's tasks run until `done` (bounded: a few steps when quiet)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + WAIT_S
    while not done():
        assert loop.time() < end, "the store never got there"
        await asyncio.sleep(0.001)


async def _requested(redis_url: str, store: RedisStore, key: str) -> int:
    """The budget's request count in Redis (its window's slots summed)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        rq = await client.hget(store.key("bu", key), "rq")
    finally:
        await client.aclose()
    return sum(int(n) for n in rq.split(b",")) if rq else 0


async def _start_flush(store: RedisStore, clock: FakeClock, key: str, n: int) -> None:
    """`n` counts waiting on `key`, then the flush the timer starts, which takes them."""
    for _ in range(n):
        await store.budget_request(key, CFG, clock.monotonic())
    assert store._unsent()[2] == n
    clock.advance(store.sync_s)
    store._pending_due()  # (what the timer does at that time)
    await _until(lambda: store._unsent()[2] == 0)  # taken by the flush
    assert store._flush_task is not None
    assert not store._flush_task.done()


@pytest.fixture
def paused(redis_url: str) -> Iterator[Callable[[], None]]:
    """`pause()` holds every script call (`CLIENT PAUSE ... WRITE`), until the test ends."""
    admin = redis.Redis.from_url(redis_url)

    def pause() -> None:
        admin.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")

    try:
        yield pause
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()


@pytest.mark.anyio
async def test_a_budget_flush_cancelled_waiting_for_a_connection_keeps_its_counts(
    redis_url: str,
) -> None:
    clock = FakeClock()
    store = _store(redis_url, clock)
    await store.breaker_gate("warm", BREAKER, clock.monotonic())  # the loop's client
    slots = store._bound[2]
    held = _hold_every_connection(slots)
    await _start_flush(store, clock, "cnc48:kept", 3)
    store._flush_task.cancel()  # as `aclose` cancels it
    await asyncio.gather(store._flush_task, return_exceptions=True)
    assert store._unsent()[2] == 3  # before: 0, the three counts gone, uncounted
    assert _dropped_counts(store) == 0
    for _ in range(held):
        slots.release()
    await store.aclose()  # sends what waits
    assert await _requested(redis_url, store, "cnc48:kept") == 3  # before: 0


@pytest.mark.anyio
async def test_a_budget_flush_cancelled_once_sent_counts_its_counts_lost(
    redis_url: str, paused: Callable[[], None], caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = _store(redis_url, clock)
    await store.breaker_gate("warm", BREAKER, clock.monotonic())
    slots = store._bound[2]
    free = slots.free
    paused()  # the flush's call goes out and waits for its reply
    await _start_flush(store, clock, "cnc48:sent", 3)
    await _until(lambda: slots.free == free - 1)  # the call has its connection
    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        store._flush_task.cancel()
        await asyncio.gather(store._flush_task, return_exceptions=True)
    # Redis may have counted them: not resent, but counted and said
    assert _dropped_counts(store) == 3  # before: nowhere
    assert store._unsent()[2] == 0
    assert "3 retry-budget request count(s) lost" in caplog.text
    store.health.up = False  # (paused: the close sends nothing, waits for nothing)
    await store.aclose()


@pytest.mark.anyio
async def test_a_close_whose_flush_runs_out_names_the_counts_it_carried(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = _store(redis_url, clock)
    await store.breaker_gate("warm", BREAKER, clock.monotonic())
    _hold_every_connection(store._bound[2])  # the close's flush waits for one: 1 s
    for _ in range(4):
        await store.budget_request("cnc48:close", CFG, clock.monotonic())
    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        await store.aclose()
    # before: no line at all (the flush had taken the counts, `_unsent` saw none)
    assert "and 4 retry-budget request count(s) not sent" in caplog.text
    assert _dropped_counts(store) == 4


# ---------------------------------------------------------------- a loop that closed


def _run_then_close(step: Callable[[], Awaitable[Any]]) -> Any:
    """Run `step` on a new loop, then close the loop without cancelling its tasks."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(step())
    finally:
        loop.close()


def _drop(store: RedisStore, task: asyncio.Future[Any] | None) -> None:
    """Close the coroutines the closed loop left (its task's, its coalescer's): else
    "never awaited" and "Event loop is closed" when they are collected."""
    tasks = [task, *store.coalescer._tasks]
    for each in tasks:
        if isinstance(each, asyncio.Task) and each.get_loop().is_closed():
            with contextlib.suppress(RuntimeError):  # (a `finally` that needs its loop)
                each.get_coro().close()


def test_budget_counts_of_a_closed_loops_flush_are_counted(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = _store(redis_url, clock)

    async def first() -> asyncio.Future[Any] | None:
        await store.breaker_gate("warm", BREAKER, clock.monotonic())
        _hold_every_connection(store._bound[2])
        await _start_flush(store, clock, "cnc48:loop", 5)
        return store._flush_task

    stale = _run_then_close(first)

    async def second() -> int:
        await store.breaker_gate("warm", BREAKER, clock.monotonic())  # this loop's client
        dropped = _dropped_counts(store)
        await store.aclose()
        return dropped

    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        assert asyncio.run(second()) == 5  # before: 0, the five counts gone uncounted
    assert "5 retry-budget request count(s) lost" in caplog.text
    _drop(store, stale)


def test_deferred_successes_of_a_closed_loops_flush_are_counted(redis_url: str) -> None:
    clock = FakeClock()
    store = _store(redis_url, clock)

    async def first() -> asyncio.Future[Any] | None:
        gate, _source, _age = await store.breaker_gate("cnc48:up", BREAKER, clock.monotonic())
        for _ in range(4):
            store.record_now("cnc48:up", BREAKER, gate, SUCCESS, False, clock.monotonic())
        assert store._unsent()[1] == 4
        _hold_every_connection(store._bound[2])
        clock.advance(store.sync_s)
        store._deferred_due()  # (the timer's work)
        await _until(lambda: store._unsent()[1] == 0)  # taken by the flush, which waits
        return store._deferred_task

    stale = _run_then_close(first)
    dropped = store.stats.dropped_records

    async def second() -> int:
        await store.breaker_gate("other", BREAKER, clock.monotonic())
        lost = store.stats.dropped_records - dropped
        await store.aclose()
        return lost

    assert asyncio.run(second()) == 4  # before: 0
    _drop(store, stale)


def test_a_late_probe_outcome_of_a_closed_loop_is_sent_on_the_next(redis_url: str) -> None:
    clock = FakeClock()
    store = _store(redis_url, clock)
    breaker = BreakerConfig(probe_lease_s=600.0)

    async def first() -> asyncio.Future[Any] | None:
        await store.breaker_gate("warm", BREAKER, clock.monotonic())
        _hold_every_connection(store._bound[2])
        store._report_late("cnc48:late", breaker, 4242, SUCCESS, False)  # starts its task
        await _until(lambda: not store._late)  # taken by the task, which waits
        return store._late_task

    stale = _run_then_close(first)

    async def second() -> tuple[int, int]:
        await store.breaker_gate("warm", BREAKER, clock.monotonic())
        waiting = store._unsent()[0]
        await store.aclose()  # sends it
        return waiting, store.stats.dropped_records

    # before: (0, 0): gone, its probe slot held fleet-wide until its lease ended
    assert asyncio.run(second()) == (1, 0)
    _drop(store, stale)


# ---------------------------------------------------------------- tiered


@pytest.mark.anyio
async def test_a_tiered_close_names_the_units_its_cancelled_give_back_carried(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = TieredStore(
        config=StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET), clock=clock
    )
    spec = LimitSpec("cnc48", 0.01, 10.0, 1, False)  # 100/s, a burst of 1000
    result = await store.admit(None, None, ["cnc48|k"], [spec], clock.monotonic())
    assert result.admitted
    units = store._held()[1]
    assert units > 0
    _hold_every_connection(store.exact._bound[2])  # the give-back waits: the close's 1 s
    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        await store.aclose()
    # before: no line (the slice was taken off before the call, `_held` saw none)
    assert f"and {units} leased unit(s) not given back" in caplog.text
    assert getattr(store.stats, "units_not_returned", 0) == units
