"""Review 45 (fin45, left by cmp45): a budget count for a key already waiting from an
event loop that closed re-armed no timer on the new loop.

`RedisStore.budget_request` armed its flush timer only for a new key. The first loop's
count armed it there; that loop closed without firing it (its handle went with it), and
a count of the same key on the next loop found the key waiting and armed nothing: with
no further request (a process gone quiet) its counts waited for a new key's count, or
for ever. Two loops in sequence against the real redis-server the suite starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fidelity_mw.policy import RetryConfig, StateConfig
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.redis]

CFG = RetryConfig()


def _run_then_close(step: Callable[[], Awaitable[Any]]) -> Any:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(step())
    finally:
        loop.close()


def test_a_waiting_keys_count_on_a_new_loop_arms_the_timer_there(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)

    async def first() -> None:
        await store.budget_request("budget:k", CFG, clock.monotonic())  # armed on this loop

    _run_then_close(first)  # closed before the timer was due

    async def second() -> tuple[int, int]:
        try:
            await store.budget_request("budget:k", CFG, clock.monotonic())
            clock.advance(store.sync_s)  # due; no other call comes
            for _ in range(5):
                await asyncio.sleep(0)
                task = store._flush_task
                if task is not None and not task.done():
                    await asyncio.wait_for(asyncio.shield(task), 60)
            left = store._unsent()[2]
            rq = await store.client().hget(store.key("bu", "budget:k"), "rq")
            return left, sum(int(n) for n in rq.split(b",")) if rq else 0
        finally:
            await store.aclose()

    assert asyncio.run(second()) == (0, 2)  # before: (2, 0), both counts left waiting
