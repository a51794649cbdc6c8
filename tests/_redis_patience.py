"""Calls a test needs Redis to answer, on a store whose `timeout_ms` is small on purpose.

Tests of a slow or paused Redis give their store a small `timeout_ms` (100 ms) so that
the call made during the stall times out. The calls around it (a warm-up that brings the
connection up, the call that ends the outage) must be answered by Redis, and a starved
Redis on a busy machine answers past 100 ms: the store then rightly decides on its
fallback state and the test failed at its warm-up. These helpers make such a call again
until Redis answers it (the store comes back on its own: its probe, or, for the blocking
client, its next call past the reconnect pause), bounded by a generous budget; they
return the last answer for the test's own assertion to judge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fidelity_mw.state.redis_sync import PROBE_CAP_S
from fidelity_mw.testing import FakeClock

T = TypeVar("T")
BUDGET_S = 30.0
# past any reconnect pause of the blocking client, and no further: time on the store's
# clock also ends the leases of probe outcomes it holds (`probe_lease_s`)
PAST_THE_PAUSE_S = 2.0 * PROBE_CAP_S


async def answered_by_redis(
    call: Callable[[], Awaitable[T]], source: Callable[[T], str], store: Any
) -> T:
    """`await call()` until `source(answer)` is "redis" (or the budget is spent),
    letting the store's probe bring it back up between tries."""
    deadline = time.monotonic() + BUDGET_S
    while True:
        got = await call()
        if source(got) == "redis" or time.monotonic() > deadline:
            return got
        for _ in range(int(BUDGET_S / 0.005)):  # (its probe, on the event loop)
            if store.health.up or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.005)


def answered_by_redis_sync(
    call: Callable[[], T], source: Callable[[T], str], clock: FakeClock
) -> T:
    """The same over the blocking client, whose outage ends at its next call after its
    reconnect pause: `clock` (the store's) is moved past the pause between tries."""
    deadline = time.monotonic() + BUDGET_S
    while True:
        got = call()
        if source(got) == "redis" or time.monotonic() > deadline:
            return got
        clock.advance(PAST_THE_PAUSE_S)
