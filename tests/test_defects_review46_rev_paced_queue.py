"""Review 46: a request an adaptive route's pacing refused, put in the route's queue,
waited there beside free slots until a request in flight ended (a release was the only
thing that woke a waiter), and every later arrival of its class queued behind it
(`_waiters_ahead`): with the requests in flight long ones, the route admitted nothing
more, at any turn, though pacing promises one more per turn up to the limit. Now the
queue gets a pacing turn of its own every PACE_S while its first waiter has room.
Fake clock throughout: the turns are the clock's advances and asyncio steps."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fidelity_mw import Policy
from fidelity_mw.context import LAYER_CONCURRENCY
from fidelity_mw.decide.concurrency import (
    CRITICAL,
    DEFAULT,
    PACE_S,
    PACED,
    ConcurrencyLimiter,
    ConcurrencySpec,
)
from fidelity_mw.policy import ConcurrencyConfig
from fidelity_mw.testing import FakeClock
from test_bulkhead import Service, _raw_get

pytestmark = pytest.mark.anyio


def _lagging(limit: int = 4, newest_first: bool = False) -> ConcurrencyLimiter:
    """An adaptive limiter with a 10 ms floor whose loop lags: it paces."""
    lim = ConcurrencyLimiter(
        ConcurrencySpec(
            limit=limit, adaptive=True, measure_samples=0, max_queue=4, newest_first=newest_first
        )
    )
    for lag in (0.0, 0.006):
        assert lim.try_acquire(CRITICAL).admitted
        lim.release(0.01, lag_s=lag)
        lim.new_turn()
    assert lim.pacing
    assert lim.limit == limit
    return lim


def test_the_queue_gets_a_pacing_turn_when_the_limit_has_room() -> None:
    lim = _lagging()
    assert lim.try_acquire(DEFAULT, now=1.0).admitted
    refused = lim.try_acquire(DEFAULT, now=1.0)
    assert (refused.admitted, refused.reason) == (False, PACED)
    assert not lim.enqueue(DEFAULT, "paced", paced=True)
    assert lim.queue_has_room()
    assert lim.admit_waiter(1.0) is None  # not within the pacing gap of the last admission
    assert lim.admit_waiter(1.0 + 2 * PACE_S) == "paced"
    assert (lim.in_flight, lim.waiting) == (2, 0)
    assert not lim.queue_has_room()
    assert lim.admit_waiter(2.0) is None  # nobody waits


def test_a_waiter_the_limit_refused_still_waits_for_a_release() -> None:
    lim = ConcurrencyLimiter(
        ConcurrencySpec(limit=1, adaptive=True, measure_samples=0, max_queue=2)
    )
    assert lim.try_acquire(DEFAULT, now=1.0).admitted
    assert not lim.enqueue(DEFAULT, "waiter")
    assert not lim.queue_has_room()
    assert lim.admit_waiter(5.0) is None
    assert lim.release(0.01) == ["waiter"]


def _policy() -> Policy:
    return Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=4, adaptive=True, max_queue=8, queue_timeout_ms=60_000),
    )


def _pace(svc: Service) -> ConcurrencyLimiter:
    """The route's limiter, measured (10 ms floor) and with a lagging loop: it paces."""
    limiter: ConcurrencyLimiter = svc.mw.engine.bulkheads["/w"]
    estimate = limiter.estimate
    assert estimate is not None
    estimate._measuring = False
    estimate.baseline_s = 0.01
    estimate.value = 4.0
    limiter._lag_peak = 0.006
    assert limiter.pacing
    assert limiter.limit == 4
    return limiter


def _queued(ctx: Any) -> bool:
    return any(
        (d.verdict, d.reason) == ("queued", "slot_freed")
        for d in ctx.decisions
        if d.layer == LAYER_CONCURRENCY
    )


async def _steps(n: int = 40) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.parametrize("newest_first", [True, False])
async def test_a_paced_request_in_the_queue_is_admitted_beside_long_requests(
    clock: FakeClock, newest_first: bool
) -> None:
    """Two long requests in flight of a limit of 4; a request pacing refused waits in the
    queue; in the turns after (10 ms apart) it is admitted, and so is an arrival, up to
    the limit. Before: 2 in flight for every turn, the waiter and every arrival queued
    (waiting 1 -> 6) until the long requests ended."""
    policy = _policy()
    assert policy.concurrency is not None
    if not newest_first:
        policy = Policy(
            breaker=None,
            concurrency=ConcurrencyConfig(
                limit=4, adaptive=True, max_queue=8, queue_timeout_ms=60_000, newest_first=False
            ),
        )
    svc = Service(policy, clock)
    assert (await _raw_get(svc.mw, "/w"))[0] == 200  # the route's bulkhead is made
    limiter = _pace(svc)
    assert limiter.holding is newest_first
    first = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
    await svc.in_flight(2)
    clock.advance(0.01)
    # one turn, two arrivals: one is admitted, the other refused by pacing and queued
    pair = [asyncio.create_task(_raw_get(svc.mw, "/w?hold=1")) for _ in range(2)]
    await _steps()
    assert (limiter.in_flight, limiter.waiting, svc.entered) == (2, 1, 3)
    clock.advance(0.01)  # the next turn
    await _steps()
    later = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
    await _steps()
    clock.advance(0.01)  # (first come, first served: it waits out the pacing gap in the queue)
    await _steps()
    assert (limiter.in_flight, limiter.waiting, svc.entered) == (4, 0, 5)
    clock.advance(0.01)
    await _steps()
    over = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))  # the limit is full: it waits
    await _steps()
    assert (limiter.in_flight, limiter.waiting) == (4, 1)
    svc.gate.set()
    results = await asyncio.gather(first, *pair, later, over)
    assert [status for status, _ in results] == [200] * 5
    # the paced one and `over`; first come, first served, `later` waited a turn in the queue
    assert sum(_queued(ctx) for _, ctx in results) == (2 if newest_first else 3)
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


async def test_the_queues_turn_runs_on_the_event_loop_without_a_clock_timer(
    clock: FakeClock,
) -> None:
    """A clock without timers of its own (the system clock's case): the queue's turn is a
    loop timer. The clock is moved past the pacing gap; the loop's 1 ms timer admits it."""

    class NoTimers:
        def monotonic(self) -> float:
            return clock.monotonic()

        def wall(self) -> float:
            return clock.wall()

        async def sleep(self, seconds: float) -> None:
            await clock.sleep(seconds)

        def sleep_sync(self, seconds: float) -> None:
            clock.sleep_sync(seconds)

    svc = Service(_policy(), clock)
    svc.mw._bulkheads.call_later = None  # as with a clock that has no timers
    svc.mw._bulkheads.monotonic = NoTimers().monotonic
    assert (await _raw_get(svc.mw, "/w"))[0] == 200
    limiter = _pace(svc)
    first = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
    await svc.in_flight(2)
    clock.advance(0.01)
    pair = [asyncio.create_task(_raw_get(svc.mw, "/w?hold=1")) for _ in range(2)]
    await _steps()
    assert (limiter.in_flight, limiter.waiting) == (2, 1)
    clock.advance(0.01)
    for _ in range(2000):  # the loop's 1 ms timer: a bound, not a wait for a window
        if limiter.waiting == 0:
            break
        await asyncio.sleep(0.001)
    await _steps()
    assert (limiter.in_flight, limiter.waiting, svc.entered) == (3, 0, 4)
    svc.gate.set()
    results = await asyncio.gather(first, *pair)
    assert [status for status, _ in results] == [200] * 3
