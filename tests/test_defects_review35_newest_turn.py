"""`newest_first`, second round (issue 15's overload goal): a turn waits for the arrivals
read with its first, and the busy floor keeps a CPU-bound route's limit where the loop
stays busy. Measured first (benchmarks/overload.py --components): at 4x a served request
was now and then a whole CPU step old when it was admitted, because it had been held
alone in the pass before the fresh arrivals reached the gate; and the latency gradient
pulled a route whose two in flight take 1.6x the floor to a limit of 1, where the core
idles through every await. No real sleeps: loop passes are counted with `sleep(0)`, time
is a FakeClock."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.decide.concurrency import (
    BUSY_SHARE,
    DEFAULT,
    NEWEST_IN_TURN,
    OLDER_IN_TURN,
    ConcurrencyLimiter,
    ConcurrencySpec,
)
from fidelity_mw.inbound.bulkhead import Deferring, Turn
from fidelity_mw.policy import ConcurrencyConfig
from fidelity_mw.testing import FakeClock
from test_defects_review34_newest_first import _lagging

pytestmark = pytest.mark.anyio


def _floored(
    limit: int = 4, measure_limit: int = 4, newest_first: bool = True
) -> ConcurrencyLimiter:
    """An adaptive limiter whose floor latency is 10 ms."""
    lim = ConcurrencyLimiter(
        ConcurrencySpec(
            limit=limit,
            adaptive=True,
            measure_samples=0,
            measure_limit=measure_limit,
            newest_first=newest_first,
        )
    )
    assert lim.try_acquire(DEFAULT).admitted
    lim.release(0.010)
    assert lim.estimate is not None
    assert lim.estimate.baseline_s == 0.010
    return lim


# ------------------------------------------------------------ the turn waits for its arrivals


async def test_an_arrival_held_in_the_pass_after_the_first_joins_its_turn() -> None:
    """The first was read in the pass before another's CPU step, its task started only
    after it; the fresh arrivals reach the gate one pass later. The turn takes the newest
    of them all, not the stale one alone."""
    lim = _lagging()
    turn = Turn(asyncio.get_running_loop(), lim, lambda: 0.0)
    stale: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    fresh: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    turn.hold(stale, DEFAULT)
    await asyncio.sleep(0)  # one pass: the turn's end has run once, and waits on
    assert not stale.done()
    turn.hold(fresh, DEFAULT)
    for _ in range(Turn.READ_PASSES + 1):
        await asyncio.sleep(0)
    assert (fresh.result().reason, stale.result().reason) == (NEWEST_IN_TURN, OLDER_IN_TURN)
    assert lim.in_flight == 1
    assert not turn.pending
    assert turn.held == []


async def test_a_resumed_request_lets_the_arrivals_read_with_the_held_ones_join() -> None:
    """An admitted request resuming while one arrival is held: before it decides the
    turn, the arrival read in the next pass is held too, and the newest is admitted
    before the resumed request's CPU step."""
    lim = _lagging()
    assert lim.try_acquire(DEFAULT).admitted  # A's slot
    turn = Turn(asyncio.get_running_loop(), lim, lambda: 0.0)
    log: list[str] = []

    async def a_app() -> None:
        await asyncio.sleep(0)  # its await
        log.append("A cpu")

    async def arrival(name: str, passes: int) -> None:
        for _ in range(passes):
            await asyncio.sleep(0)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        turn.hold(answer, DEFAULT)
        admission = await answer
        log.append(f"{name} {admission.reason}")

    tasks = [
        asyncio.create_task(_run(Deferring(a_app(), turn))),
        asyncio.create_task(arrival("old", 0)),
        asyncio.create_task(arrival("new", 2)),
    ]
    await asyncio.gather(*tasks)
    assert log == ["new newest_in_turn", "old older_in_turn", "A cpu"]


async def _run(awaitable: Any) -> Any:
    return await awaitable


# ------------------------------------------------------------ time on the loop


async def test_the_wrapper_counts_the_apps_steps_not_its_awaits() -> None:
    clock = FakeClock()
    lim = _floored()
    turn = Turn(asyncio.get_running_loop(), lim, clock.monotonic)

    async def app() -> str:
        clock.advance(0.003)  # CPU in its first step
        asyncio.get_running_loop().call_soon(clock.advance, 0.050)  # others', while it awaits
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        clock.advance(0.005)  # CPU in its last step
        return "done"

    assert await Deferring(app(), turn) == "done"
    assert lim._busy_s == pytest.approx(0.008)
    # An app that raises ran on the loop too: its steps count.

    async def fails() -> None:
        clock.advance(0.004)
        await asyncio.sleep(0)
        raise KeyError("app")

    with pytest.raises(KeyError):
        await Deferring(fails(), turn)
    smoothing = lim.spec.smoothing
    assert lim._busy_s == pytest.approx((1 - smoothing) * 0.008 + smoothing * 0.004)


# ------------------------------------------------------------ the busy floor (pure)


def test_the_busy_floor_is_the_fewest_in_flight_that_keep_the_loop_busy() -> None:
    lim = _floored()
    lim.busy_sample(0.008)  # 10 ms floor, 8 of it on the loop: r = 1.25
    assert lim.busy_floor == 2 == -(-BUSY_SHARE * 1.25 // 1)
    pure_cpu = _floored()
    pure_cpu.busy_sample(0.010)  # nothing to overlap: one at a time keeps it busy
    assert pure_cpu.busy_floor == 1
    halves = _floored()
    halves.busy_sample(0.005)  # r = 2: two staggered keep it busy
    assert halves.busy_floor == 2


def test_the_gradient_cannot_pull_the_limit_below_the_busy_floor() -> None:
    lim = _floored()
    lim.busy_sample(0.008)
    for _ in range(200):  # two in flight take 1.8x the floor, the loop lags: overload
        assert lim.try_acquire(DEFAULT).admitted
        lim.release(0.018, lag_s=0.006)
    assert lim.estimate is not None
    assert lim.estimate.current() < 1.5
    assert lim.limit == 2
    admitted = []
    for _ in range(3):  # (one a turn: the loop lags)
        admitted.append(lim.try_acquire(DEFAULT).admitted)
        lim.new_turn()
    assert admitted == [True, True, False]
    # Without the floor (newest_first off) the same samples leave a limit of 1.
    plain = _floored(newest_first=False)
    plain.busy_sample(0.008)
    assert plain.busy_floor == 0
    for _ in range(200):
        assert plain.try_acquire(DEFAULT).admitted
        plain.release(0.018, lag_s=0.006)
    assert plain.limit == 1


def test_the_busy_floor_is_capped_where_the_gradient_sizes_the_route() -> None:
    lim = _floored(measure_limit=4)
    lim.busy_sample(0.0005)  # mostly awaits: r = 20, the gradient's to size
    assert lim.busy_floor == 4
    lim = _floored(measure_limit=3)
    lim.busy_sample(0.0005)
    assert lim.busy_floor == 3


def test_no_busy_floor_before_the_route_has_a_floor_latency() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=4, adaptive=True, newest_first=True))
    lim.busy_sample(0.001)
    assert lim.busy_floor == 0  # (its floor latency is still being measured)
    lim.busy_sample(0.0)  # nothing measured: no sample
    assert lim._busy_s == 0.001


# ------------------------------------------------------------ through the middleware


async def test_a_cpu_bound_route_gets_its_busy_floor_from_its_own_requests() -> None:
    clock = FakeClock()

    async def work(request: Request) -> Response:
        # 2 ms awaiting (another task's time), then 8 ms on the loop
        asyncio.get_running_loop().call_soon(clock.advance, 0.002)
        await asyncio.sleep(0)
        clock.advance(0.008)
        return PlainTextResponse("ok")

    policy = Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=4, adaptive=True, newest_first=True),
    )
    mw = FidelityMiddleware(
        Starlette(routes=[Route("/w", work)]), policy=policy, clock=clock, telemetry=False
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=mw), base_url="http://svc"
    ) as client:
        for _ in range(25):  # the floor latency is measured first (20 samples)
            assert (await client.get("/w")).status_code == 200
    limiter = mw.engine.bulkheads["/w"]
    assert limiter.estimate is not None
    assert limiter.estimate.baseline_s == pytest.approx(0.010, abs=1e-6)
    assert limiter._busy_s == pytest.approx(0.008, abs=1e-6)
    assert limiter.busy_floor == 2


def test_slow_samples_the_others_cpu_explains_do_not_replace_the_floor() -> None:
    """Two in flight on one loop, no lag seen (the deferral lets the lag probe run
    before the CPU steps): each takes 18 ms on a 10 ms floor, 8 of it the other's CPU
    step. That is load, not a route that durably got slower: the floor stays, and the
    limit stays at the busy floor (it was restored to 4 with an 18 ms floor)."""
    lim = _floored()
    lim.busy_sample(0.008)
    assert lim.try_acquire(DEFAULT).admitted
    for _ in range(300):  # each released with the other still in flight
        assert lim.try_acquire(DEFAULT).admitted
        lim.release(0.018)
    assert lim.estimate is not None
    assert lim.estimate.baseline_s == 0.010
    assert lim.limit == 2


# ------------------------------------------------------------ the default


def test_an_adaptive_limit_admits_the_newest_by_default() -> None:
    """Unset, `newest_first` is on for an adaptive limit that does not shed stale requests
    (the measured better answer at 1x and 4x, for a CPU-bound and an await-bound route);
    `false` keeps first come, first served; a fixed limit or `shed_stale` never holds."""
    from fidelity_mw.tools.statemap import from_policy

    def limiter(**conc: Any) -> ConcurrencyLimiter:
        policy = Policy.from_dict({"concurrency": conc})
        mw = FidelityMiddleware(Starlette(), policy=policy, telemetry=False)
        plan = mw.engine.plan_for({"type": "http", "path": "/w", "method": "GET"})
        assert plan.bulkhead is not None
        return plan.bulkhead

    assert limiter(limit=4, adaptive=True).holding
    assert limiter(limit=4, adaptive=True, newest_first=True).holding
    assert not limiter(limit=4, adaptive=True, newest_first=False).holding
    assert not limiter(limit=4, adaptive=True, shed_stale=True).holding
    assert not limiter(limit=4).holding
    assert ConcurrencyConfig(limit=4, adaptive=True).admits_newest
    assert not ConcurrencyConfig(limit=4).admits_newest
    policy = Policy.from_dict({"concurrency": {"limit": 4, "adaptive": True}})
    (row,) = [row for row in from_policy(policy, "t").layers if row.layer == "concurrency"]
    assert "admits the newest of each loop turn's arrivals" in row.data
