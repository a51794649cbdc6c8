"""While pacing, a request ending woke every waiter the room allowed at once.

Pacing promises at most one admission per pacing turn (docs/inbound.md): requests let in
together wait out their awaits side by side, then queue for the CPU one behind the
other. A release hands the slot it frees to a waiter; when the adaptive limit grew with
that release's sample, the room was bigger than the one slot, and `_free_one` handed
all of it out in that one wake-up: 2 waiters let in together (limit 4 -> 5). Now, while
pacing, a release (or a slot given back) hands one slot to one waiter; the room the
limit grew by goes to the queue's own pacing turns (every PACE_S, as rev46 gave the
queue), one waiter a turn. Not pacing (a loop that keeps up, or a fixed limit), a
release still wakes every waiter the room allows. FakeClock throughout.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware
from fidelity_mw.context import LAYER_CONCURRENCY
from fidelity_mw.decide.concurrency import (
    CRITICAL,
    DEFAULT,
    PACE_S,
    ConcurrencyLimiter,
    ConcurrencySpec,
)
from fidelity_mw.testing import FakeClock
from test_bulkhead import _raw_get
from test_defects_review46_rev_paced_queue import _pace, _policy, _steps


def _full_and_queued(adaptive_pacing: bool) -> ConcurrencyLimiter:
    """Limit 4 (10 ms floor), 4 in flight, 4 waiting at the limit; pacing or not."""
    lim = ConcurrencyLimiter(
        ConcurrencySpec(limit=4, adaptive=True, measure_samples=0, max_queue=8, max_limit=64)
    )
    for lag in (0.0, 0.006 if adaptive_pacing else 0.0):
        assert lim.try_acquire(CRITICAL).admitted
        lim.release(0.01, lag_s=lag)
        lim.new_turn()
    assert lim.pacing is adaptive_pacing
    for _ in range(4):
        assert lim.try_acquire(CRITICAL).admitted
    for token in "abcd":
        assert not lim.enqueue(DEFAULT, token)
    assert (lim.in_flight, lim.waiting, lim.limit) == (4, 4, 4)
    return lim


def test_a_release_while_pacing_hands_one_slot_and_the_rest_goes_one_per_turn() -> None:
    lim = _full_and_queued(adaptive_pacing=True)
    now = 10.0
    woken = []
    for _ in range(2):  # quick requests end: each sample grows the limit (4 -> 5)
        now += 0.005
        woken.append(lim.release(0.005, now=now))
    assert lim.pacing
    assert lim.limit == 5
    # before: [['a'], ['b', 'c']]: the second release let two in at once
    assert woken == [["a"], ["b"]]
    assert (lim.in_flight, lim.waiting) == (4, 2)
    assert lim.queue_has_room()
    assert lim.admit_waiter(now) is None  # not in the same pacing turn as the hand-over
    assert lim.admit_waiter(now + 2 * PACE_S) == "c"
    assert lim.admit_waiter(now + 4 * PACE_S) is None  # the limit is full again
    assert (lim.in_flight, lim.waiting) == (5, 1)


def test_a_slot_given_back_while_pacing_goes_to_one_waiter() -> None:
    lim = _full_and_queued(adaptive_pacing=True)
    lim.estimate.value = 6.0  # type: ignore[union-attr]  # grown: room for 2 more
    assert lim.limit == 6
    assert lim.give_back(10.0) == ["a"]  # before: ['a', 'b', 'c']
    assert lim.admit_waiter(10.0 + 2 * PACE_S) == "b"
    assert lim.admit_waiter(10.0 + 4 * PACE_S) == "c"
    assert (lim.in_flight, lim.waiting) == (6, 1)


def test_not_pacing_a_release_still_wakes_every_waiter_the_room_allows() -> None:
    lim = _full_and_queued(adaptive_pacing=False)
    lim.estimate.value = 6.0  # type: ignore[union-attr]
    assert lim.release(0.01, now=10.0) == ["a", "b", "c"]
    fixed = ConcurrencyLimiter(ConcurrencySpec(limit=2, max_queue=4))
    assert fixed.try_acquire(DEFAULT).admitted
    assert fixed.try_acquire(DEFAULT).admitted
    assert not fixed.enqueue(DEFAULT, "x")
    assert fixed.release() == ["x"]


class Held:
    """Route /w: each request waits on its own event (`?id=N`) until the test ends it."""

    def __init__(self, clock: FakeClock) -> None:
        self.ends: dict[str, asyncio.Event] = {}
        self.entered: list[str] = []

        async def work(request: Request) -> Response:
            name = request.query_params.get("id", "")
            self.entered.append(name)
            if name:
                await self.ends.setdefault(name, asyncio.Event()).wait()
            return PlainTextResponse("ok")

        app = Starlette(routes=[Route("/w", work)])
        self.mw = FidelityMiddleware(app, policy=_policy(), clock=clock, telemetry=False)

    def get(self, name: str) -> asyncio.Task[tuple[int, Any]]:
        self.ends.setdefault(name, asyncio.Event())
        return asyncio.create_task(_raw_get(self.mw, f"/w?id={name}"))


@pytest.mark.anyio
async def test_through_the_middleware_a_grown_limit_admits_its_waiters_one_per_turn(
    clock: FakeClock,
) -> None:
    """A paced route of limit 4 full of long requests; 3 more wait in its queue. One long
    request ends, and the limit grows to 5 with its sample: its slot goes to one waiter
    at once, the other slot to the next at the queue's pacing turn, PACE_S later.
    Before: both entered the app in the release's one wake-up."""
    svc = Held(clock)
    assert (await _raw_get(svc.mw, "/w"))[0] == 200  # the route's bulkhead is made
    limiter = _pace(svc)  # type: ignore[arg-type]
    estimate = limiter.estimate
    assert estimate is not None
    # a floor far above these requests' latency: each sample grows the limit (the loop
    # lags as much, so it still paces)
    estimate.baseline_s = 10.0
    limiter._lag_peak = 5.0
    estimate.value = 4.4
    assert (limiter.pacing, limiter.limit) == (True, 4)
    long = [svc.get(f"long{i}") for i in range(4)]
    for _ in range(4):  # one per pacing turn, up to the limit
        await _steps()
        clock.advance(0.01)
    waiting = []
    for i in range(3):
        waiting.append(svc.get(f"wait{i}"))
        await _steps()
    assert (limiter.in_flight, limiter.waiting) == (4, 3)
    assert sorted(svc.entered[1:]) == ["long0", "long1", "long2", "long3"]
    clock.advance(0.01)
    svc.ends["long0"].set()
    await _steps()
    assert limiter.limit == 5  # grown with long0's sample
    # before: ['wait0', 'wait1'] in this one wake-up
    assert svc.entered[5:] == ["wait0"]
    assert (limiter.in_flight, limiter.waiting) == (4, 2)
    clock.advance(2 * PACE_S)  # the queue's pacing turn
    await _steps()
    assert svc.entered[5:] == ["wait0", "wait1"]
    assert (limiter.in_flight, limiter.waiting) == (5, 1)
    for event in svc.ends.values():
        event.set()
    results = await asyncio.gather(*long, *waiting)
    assert [status for status, _ in results] == [200] * 7
    assert all(_queued(ctx) for _, ctx in results[4:])  # the three that waited
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


def _queued(ctx: object) -> bool:
    return any(
        (d.verdict, d.reason) == ("queued", "slot_freed")
        for d in getattr(ctx, "decisions", ())
        if d.layer == LAYER_CONCURRENCY
    )
