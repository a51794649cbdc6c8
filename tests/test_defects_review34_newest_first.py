"""`newest_first` (issue 15's overload goal): while pacing, a loop turn's arrivals are held
and the newest is admitted (decide/concurrency.py), and the request admitted before them
defers to that decision (`Deferring`, inbound/bulkhead.py). No real sleeps: the decisions
are pure, the loop-turn mechanics are asyncio steps counted with `sleep(0)`."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import pytest

from _asgi import http_scope
from fidelity_mw import Policy
from fidelity_mw.context import ALLOW, SHED
from fidelity_mw.decide.concurrency import (
    AT_LIMIT,
    CRITICAL,
    DEFAULT,
    NEWEST_IN_TURN,
    OLDER_IN_TURN,
    PACED,
    PRIORITY_SHARE,
    SHEDDABLE,
    ConcurrencyLimiter,
    ConcurrencySpec,
)
from fidelity_mw.errors import PolicyError
from fidelity_mw.inbound.bulkhead import Bulkheads, Deferring, Turn
from fidelity_mw.policy import ConcurrencyConfig
from fidelity_mw.testing import FakeClock
from test_bulkhead import Service, _raw_get, concurrency_decisions

pytestmark = pytest.mark.anyio


def _lagging(limit: int = 4, newest_first: bool = True, lag_s: float = 0.006) -> ConcurrencyLimiter:
    """An adaptive limiter with a 10 ms floor whose last release reported `lag_s`."""
    lim = ConcurrencyLimiter(
        ConcurrencySpec(limit=limit, adaptive=True, measure_samples=0, newest_first=newest_first)
    )
    for lag in (0.0, lag_s):
        assert lim.try_acquire(CRITICAL).admitted
        lim.release(0.01, lag_s=lag)
        lim.new_turn()
    assert lim.limit == limit
    return lim


# ------------------------------------------------------------ the pure decision


def test_a_route_holds_arrivals_when_asked_whether_or_not_it_paces() -> None:
    assert _lagging().holding
    # (held while the loop keeps up too: the deferral hides the lag it would pace by)
    assert _lagging(lag_s=0.0).holding
    assert not _lagging(newest_first=False).holding  # pacing as before
    fixed = ConcurrencyLimiter(ConcurrencySpec(limit=4, newest_first=True))
    assert not fixed.holding


def test_the_newest_of_a_turn_is_admitted_and_the_older_ones_refused() -> None:
    lim = _lagging()
    assert lim.try_acquire(DEFAULT).admitted  # one in flight
    answers = lim.admit_turn([DEFAULT, DEFAULT, DEFAULT], now=1.0)
    assert [(a.admitted, a.reason) for a in answers] == [
        (False, OLDER_IN_TURN),
        (False, OLDER_IN_TURN),
        (True, NEWEST_IN_TURN),
    ]
    assert lim.in_flight == 2
    # one per turn even with nothing in flight: the turn is the pacing
    idle = _lagging()
    answers = idle.admit_turn([DEFAULT, DEFAULT], now=1.0)
    assert [a.admitted for a in answers] == [False, True]
    assert idle.in_flight == 1
    assert idle.admit_turn([]) == []


def test_the_best_class_with_room_goes_first_then_the_newest_of_it() -> None:
    lim = _lagging()
    answers = lim.admit_turn([SHEDDABLE, DEFAULT, DEFAULT, SHEDDABLE])
    assert [(a.admitted, a.reason) for a in answers] == [
        (False, OLDER_IN_TURN),
        (False, OLDER_IN_TURN),
        (True, NEWEST_IN_TURN),
        (False, PACED),  # newer, of a lower class
    ]
    # sheddable's share (2 of 4) is full: the default behind it gets the turn
    full = _lagging()
    assert full.try_acquire(CRITICAL).admitted
    assert full.try_acquire(CRITICAL).admitted
    answers = full.admit_turn([DEFAULT, SHEDDABLE])
    assert [(a.admitted, a.reason) for a in answers] == [
        (True, NEWEST_IN_TURN),
        (False, PACED),
    ]


def test_a_full_route_refuses_the_whole_turn_and_says_why() -> None:
    lim = _lagging(limit=2)
    lim.binding = False
    assert lim.try_acquire(CRITICAL).admitted
    assert lim.try_acquire(CRITICAL).admitted
    answers = lim.admit_turn([SHEDDABLE, DEFAULT])
    assert [(a.admitted, a.reason) for a in answers] == [
        (False, AT_LIMIT),
        (False, AT_LIMIT),
    ]
    assert lim.in_flight == 2
    assert lim.binding  # the limit held it back: evidence to grow it
    share = _lagging(limit=4)
    for _ in range(2):
        assert share.try_acquire(CRITICAL).admitted
    (answer,) = share.admit_turn([SHEDDABLE])
    assert (answer.admitted, answer.reason) == (False, PRIORITY_SHARE)


def test_a_turn_does_not_overtake_the_queue() -> None:
    lim = ConcurrencyLimiter(
        ConcurrencySpec(limit=1, adaptive=True, measure_samples=0, newest_first=True, max_queue=2)
    )
    assert lim.try_acquire(DEFAULT).admitted
    assert not lim.enqueue(DEFAULT, "waiter")
    lim.release(None)  # (no sample) the waiter has the slot
    assert lim.in_flight == 1
    lim.release(0.01, lag_s=0.006)
    assert not lim.enqueue(DEFAULT, "second", paced=True)
    assert lim.in_flight == 0
    (answer,) = lim.admit_turn([DEFAULT])
    assert (answer.admitted, answer.reason) == (False, PACED)  # (it queues behind)


def test_policy_newest_first_needs_adaptive_and_excludes_shed_stale() -> None:
    with pytest.raises(PolicyError, match="newest_first"):
        Policy.from_dict({"concurrency": {"limit": 4, "newest_first": True}})
    with pytest.raises(PolicyError, match="newest_first"):
        Policy.from_dict(
            {"concurrency": {"adaptive": True, "newest_first": True, "shed_stale": True}}
        )
    policy = Policy.from_dict({"concurrency": {"adaptive": True, "newest_first": True}})
    assert policy.concurrency is not None
    assert policy.concurrency.newest_first


# ------------------------------------------------------------ Deferring: exact pass-through


def _turn(lim: ConcurrencyLimiter | None = None) -> Turn:
    return Turn(asyncio.get_running_loop(), lim or _lagging(), lambda: 0.0)


async def test_the_wrapper_passes_return_values_and_exceptions_through() -> None:
    turn = _turn()

    async def returns() -> Any:
        await asyncio.sleep(0)
        return 42

    async def raises() -> None:
        await asyncio.sleep(0)
        raise KeyError("app")

    assert await Deferring(returns(), turn) == 42
    with pytest.raises(KeyError, match="app"):
        await Deferring(raises(), turn)


async def test_the_wrapper_passes_cancellation_to_the_app_and_its_answer_back() -> None:
    turn = _turn()
    reached = asyncio.Event()

    async def catches() -> str:
        try:
            reached.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return "caught"
        return "not reached"

    async def does_not_catch() -> None:
        reached.set()
        await asyncio.Event().wait()

    async def run(app: Any) -> Any:
        return await Deferring(app, turn)

    task = asyncio.create_task(run(catches()))
    await reached.wait()
    task.cancel()
    assert await task == "caught"
    reached.clear()
    task = asyncio.create_task(run(does_not_catch()))
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class _Echo:
    """An awaitable that yields what it is given and returns what it is sent."""

    def __await__(self) -> Generator[Any, Any, Any]:
        got = yield "first"
        try:
            got = yield ("second", got)
        except ValueError as exc:
            return ("thrown", str(exc))
        return ("sent", got)


async def test_the_wrapper_yields_what_the_app_yields_and_sends_what_it_is_sent() -> None:
    turn = _turn()
    steps = Deferring(_Echo(), turn).__await__()
    assert steps.send(None) == "first"
    assert steps.send(7) == ("second", 7)
    with pytest.raises(StopIteration) as stop:
        steps.send(8)
    assert stop.value.value == ("sent", 8)
    steps = Deferring(_Echo(), turn).__await__()
    steps.send(None)
    steps.send(1)
    with pytest.raises(StopIteration) as stop:
        steps.throw(ValueError("in"))
    assert stop.value.value == ("thrown", "in")


# ------------------------------------------------------------ the loop-turn mechanics


async def _ordering(defer: bool) -> list[str]:
    """Request A (admitted, its await just over) resumes in the same pass as the turn's
    arrival B is held: with the wrapper, B's first step runs before A's CPU step."""
    lim = _lagging()
    assert lim.try_acquire(DEFAULT).admitted  # A's slot
    turn = _turn(lim)
    log: list[str] = []

    async def a_app() -> None:
        await asyncio.sleep(0)  # its await
        log.append("A cpu")

    async def run_a() -> None:
        await (Deferring(a_app(), turn) if defer else a_app())

    async def arrival() -> None:
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        turn.hold(answer, DEFAULT)
        admission = await answer
        log.append(f"B first step {admission.reason}")

    a = asyncio.create_task(run_a())
    b = asyncio.create_task(arrival())
    await asyncio.gather(a, b)
    return log


async def test_an_admitted_request_lets_the_turn_decide_before_its_next_cpu_step() -> None:
    assert await _ordering(defer=True) == ["B first step newest_in_turn", "A cpu"]
    # (without the wrapper: the newcomer's await starts after A's CPU, overlapping nothing)
    assert await _ordering(defer=False) == ["A cpu", "B first step newest_in_turn"]


async def test_a_turn_ends_by_itself_when_nobody_resumes_first() -> None:
    lim = _lagging()
    turn = _turn(lim)
    answers = [asyncio.get_running_loop().create_future() for _ in range(3)]
    for answer in answers:
        turn.hold(answer, DEFAULT)
    for _ in range(Turn.READ_PASSES):  # (passes for arrivals read with these)
        await asyncio.sleep(0)
        assert not any(a.done() for a in answers)
    await asyncio.sleep(0)  # the turn's end ran
    assert [a.result().admitted for a in answers] == [False, False, True]
    assert turn.held == []
    assert not turn.pending


async def test_a_cancelled_held_arrival_takes_nothing_and_the_rest_are_decided() -> None:
    lim = _lagging()
    turn = _turn(lim)
    answers = [asyncio.get_running_loop().create_future() for _ in range(2)]
    for answer in answers:
        turn.hold(answer, DEFAULT)
    answers[1].cancel()  # the newest left before its turn ended
    for _ in range(Turn.READ_PASSES + 1):
        await asyncio.sleep(0)
    assert answers[0].result().reason == NEWEST_IN_TURN
    assert lim.in_flight == 1


# ------------------------------------------------------------ through the middleware


async def _pacing_service(clock: FakeClock) -> Service:
    policy = Policy(
        breaker=None,
        priority_header="x-priority",
        concurrency=ConcurrencyConfig(limit=4, adaptive=True, max_limit=100, newest_first=True),
    )
    svc = Service(policy, clock, work_s=0.01)
    svc.busy_after_s = 0.008  # the loop lags: pacing
    for _ in range(21):  # the floor, then one more so the lag is reported
        assert (await svc.client.get("/w")).status_code == 200
        await asyncio.sleep(0)
    limiter = svc.mw.engine.bulkheads["/w"]
    assert limiter.holding
    return svc


async def test_the_middleware_admits_the_newest_of_a_turn(clock: FakeClock) -> None:
    svc = await _pacing_service(clock)
    limiter = svc.mw.engine.bulkheads["/w"]
    first = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
    await svc.in_flight(22)
    assert limiter.in_flight == 1
    # one turn's arrivals: three defaults and a critical one, which is never held
    batch = [asyncio.create_task(_raw_get(svc.mw, "/w?hold=1")) for _ in range(2)]
    batch.append(asyncio.create_task(_raw_get(svc.mw, "/w?hold=1", {b"x-priority": b"critical"})))
    batch.append(asyncio.create_task(_raw_get(svc.mw, "/w?hold=1")))
    await svc.in_flight(24)
    assert limiter.in_flight == 3
    svc.gate.set()
    results = [await t for t in [*batch, first]]
    assert [status for status, _ctx in results] == [503, 503, 200, 200, 200]
    reasons = [[(d.verdict, d.reason) for d in concurrency_decisions(ctx)] for _s, ctx in results]
    assert reasons[:4] == [
        [(SHED, OLDER_IN_TURN)],
        [(SHED, OLDER_IN_TURN)],
        [(ALLOW, "under_limit")],  # decided on arrival
        [(ALLOW, NEWEST_IN_TURN)],
    ]
    assert limiter.in_flight == 0


async def test_a_held_request_cancelled_after_its_turn_gave_it_a_slot_frees_it(
    clock: FakeClock,
) -> None:
    svc = await _pacing_service(clock)
    limiter = svc.mw.engine.bulkheads["/w"]
    first = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
    await svc.in_flight(22)
    held = [asyncio.create_task(_raw_get(svc.mw, "/w?hold=1")) for _ in range(2)]
    for _ in range(3):  # their first steps: both held, not yet decided
        await asyncio.sleep(0)
        if len(svc.mw._bulkheads._turns["/w"].held) == 2:
            break
    turn = svc.mw._bulkheads._turns["/w"]
    assert len(turn.held) == 2
    assert limiter.in_flight == 1
    turn.decide()  # the newest holds a slot now, and has not run since
    assert limiter.in_flight == 2
    held[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await held[1]
    assert limiter.in_flight == 1  # it gave back the slot it took, and only that
    assert (await held[0])[0] == 503
    svc.gate.set()
    assert (await first)[0] == 200
    assert limiter.in_flight == 0
    assert svc.entered == 22


async def test_a_held_request_whose_client_left_frees_its_slot(clock: FakeClock) -> None:
    svc = await _pacing_service(clock)
    limiter = svc.mw.engine.bulkheads["/w"]
    first = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
    await svc.in_flight(22)
    statuses: list[int] = []

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = http_scope("/w", headers=[(b"host", b"svc")], server=("svc", 80))
    await svc.mw(scope, gone, send)  # held, admitted as its turn's newest, served
    (decision,) = concurrency_decisions(scope["state"]["fidelity"])
    assert decision.reason == NEWEST_IN_TURN
    assert limiter.in_flight == 1
    svc.gate.set()
    assert (await first)[0] == 200
    assert limiter.in_flight == 0


async def test_while_the_loop_keeps_up_a_turn_admits_as_many_as_have_room_newest_first(
    clock: FakeClock,
) -> None:
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
    assert limiter.limit == 4
    # Six arrive in one turn: not one per turn (the loop keeps up), but the four the
    # limit has room for, the newest four; the two oldest are refused at the limit.
    batch = [asyncio.create_task(_raw_get(svc.mw, f"/w?hold=1&n={i}")) for i in range(6)]
    await svc.in_flight(25)
    assert limiter.in_flight == 4
    svc.gate.set()
    results = [await task for task in batch]
    assert [status for status, _ in results] == [503, 503, 200, 200, 200, 200]
    reasons = [[d.reason for d in concurrency_decisions(ctx)] for _, ctx in results]
    assert reasons == [["at_limit"]] * 2 + [["newest_in_turn"]] * 4
    assert limiter.in_flight == 0


def test_under_trio_nothing_is_held_and_the_app_is_not_wrapped() -> None:
    trio = pytest.importorskip("trio")
    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=4, adaptive=True, newest_first=True)
    )
    from fidelity_mw import FidelityMiddleware

    mw = FidelityMiddleware(lambda *a: None, policy=policy, telemetry=False)
    bulkheads: Bulkheads = mw._bulkheads
    limiter = _lagging()
    seen: list[Any] = []

    async def main() -> None:
        seen.append(bulkheads._turn("/w", limiter))

    trio.run(main)
    assert seen == [None]


def test_the_map_says_a_route_admits_the_newest_of_each_turn() -> None:
    from fidelity_mw.tools.statemap import from_policy

    policy = Policy.from_dict({"concurrency": {"limit": 4, "adaptive": True, "newest_first": True}})
    (row,) = [row for row in from_policy(policy, "t").layers if row.layer == "concurrency"]
    assert "admits the newest of each loop turn's arrivals (one per turn while" in row.data
    assert "never fewer in flight than keep the loop 90 % busy" in row.data
    assert "sheds" not in row.data
