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


def up_after_probe(store: Any, waits: list[float] | None = None) -> bool:
    """Whether `store` (a RedisStore) is up, after moving its clock, when that is a
    FakeClock, to the time of the probe its probe loop waits for: the probe waits on
    the clock's timer, which fires only when the clock moves. The clock moves as far as
    the probe's own sleep moved it before review 45 (it slept on the clock, each wait in
    `clock.sleeps`; now in `waits` when given), and only between probes, never while
    one is under way."""
    health = store.health
    clock = store._clock
    # (a probe time already reached has fired: its probe runs, or is about to)
    if not health.up and isinstance(clock, FakeClock) and health.probe_at > clock.monotonic():
        wait = health.probe_at - clock.monotonic()
        if health.probe_at != float("inf"):
            if waits is not None:
                waits.append(wait)
            clock.advance(wait)
    return bool(health.up)


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
            if up_after_probe(store) or time.monotonic() > deadline:
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
