"""Review 36: a `newest_first` route's per-turn admission count comes back to 0 once its
loop went round, whatever happened to the requests its turn admitted (cancelled before
they ran again, several admitted in one turn). Stuck at 1 or more, every later request
the route decides at once (a thread's loop other than the one holding arrivals, trio)
was refused `paced` while anything was in flight, turn after turn, for good."""

from __future__ import annotations

import asyncio

import pytest

from fidelity_mw import Policy
from fidelity_mw.decide.concurrency import DEFAULT, PACED
from fidelity_mw.policy import ConcurrencyConfig
from fidelity_mw.testing import FakeClock
from test_bulkhead import Service, _raw_get
from test_defects_review34_newest_first import _pacing_service

pytestmark = pytest.mark.anyio


async def _passes(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_held_request_cancelled_after_its_admission_leaves_no_turn_count(
    clock: FakeClock,
) -> None:
    svc = await _pacing_service(clock)
    limiter = svc.mw.engine.bulkheads["/w"]
    first = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
    await svc.in_flight(22)
    await _passes()
    assert limiter.admitted_in_turn == 0
    held = [asyncio.create_task(_raw_get(svc.mw, "/w?hold=1")) for _ in range(2)]
    for _ in range(3):
        await asyncio.sleep(0)
        if len(svc.mw._bulkheads._turns["/w"].held) == 2:
            break
    turn = svc.mw._bulkheads._turns["/w"]
    assert len(turn.held) == 2
    turn.decide()  # the newest holds a slot, and is cancelled before it runs again
    held[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await held[1]
    assert (await held[0])[0] == 503
    await _passes()
    assert limiter.in_flight == 1
    assert limiter.admitted_in_turn == 0
    # what the count decides: a request decided at once while one is in flight and the
    # route paces is paced only within the turn of an admission, not for good
    assert limiter.pacing
    admission = limiter.try_acquire(DEFAULT, clock.monotonic() + 1.0)
    assert admission.admitted, admission.reason
    limiter.release(None)
    svc.gate.set()
    assert (await first)[0] == 200
    assert limiter.in_flight == 0


async def test_a_turn_that_admitted_several_leaves_no_turn_count(clock: FakeClock) -> None:
    policy = Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=4, adaptive=True, max_limit=100, newest_first=True),
    )
    svc = Service(policy, clock, work_s=0.01)
    for _ in range(21):
        assert (await svc.client.get("/w")).status_code == 200
    limiter = svc.mw.engine.bulkheads["/w"]
    assert not limiter.pacing
    assert limiter.holding
    batch = [asyncio.create_task(_raw_get(svc.mw, "/w?hold=1")) for _ in range(3)]
    await svc.in_flight(24)
    await _passes()
    assert limiter.in_flight == 3
    assert limiter.admitted_in_turn == 0  # (was 3, and stayed: nobody saw it at 1)
    svc.gate.set()
    assert [(await t)[0] for t in batch] == [200, 200, 200]
    await _passes()
    assert limiter.in_flight == 0
    assert limiter.admitted_in_turn == 0


async def test_after_a_turn_of_several_a_paced_route_still_admits_one_per_turn(
    clock: FakeClock,
) -> None:
    # The consequence, end to end: the count left at 3 by a turn while the loop kept up,
    # then the loop lags (pacing): a request decided at once (try_acquire, as on a
    # thread's loop other than the holding one) is refused `paced` in every turn.
    policy = Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=4, adaptive=True, max_limit=100, newest_first=True),
    )
    svc = Service(policy, clock, work_s=0.01)
    for _ in range(21):
        assert (await svc.client.get("/w")).status_code == 200
    limiter = svc.mw.engine.bulkheads["/w"]
    batch = [asyncio.create_task(_raw_get(svc.mw, "/w?hold=1")) for _ in range(3)]
    await svc.in_flight(24)
    svc.gate.set()
    await asyncio.gather(*batch)
    svc.gate.clear()
    svc.busy_after_s = 0.008  # the loop lags now
    for _ in range(3):
        assert (await svc.client.get("/w")).status_code == 200
        await asyncio.sleep(0)
    first = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
    await svc.in_flight(25)
    await _passes()
    assert limiter.pacing
    assert limiter.in_flight == 1
    refusals = []
    for _ in range(3):
        clock.advance(0.1)  # (past PACE_S: only the turn's count paces it)
        admission = limiter.try_acquire(DEFAULT, clock.monotonic())
        if admission.admitted:
            limiter.release(None)
            limiter.new_turn()  # (as its caller has the loop do: bulkhead.enter_now)
        else:
            refusals.append(admission.reason)
        await _passes()
    assert PACED not in refusals
    svc.gate.set()
    assert (await first)[0] == 200
