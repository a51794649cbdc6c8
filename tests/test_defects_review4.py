"""Defects a fourth review found in the route bulkhead and the deadline watch.

A bulkhead is shared by requests on event loops in different threads (one middleware
served by several loops: tests/test_deadline_threads.py), so its limiter must keep its
count and queue under thread switches; a queued request's deadline ends its wait only
where the route enforces deadlines, and then as the deadline's own 504; a slot handed to
a waiter whose loop is gone goes on to the next; a late expiry after a disarm is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from fidelity_mw import FidelityMiddleware, Policy, RouteConfig
from fidelity_mw.context import LAYER_DEADLINE, REJECT, DecisionContext
from fidelity_mw.decide.concurrency import ConcurrencyLimiter, ConcurrencySpec
from fidelity_mw.engine import Engine
from fidelity_mw.inbound.watch import DeadlineWatch, ResponseWatcher
from fidelity_mw.policy import ConcurrencyConfig
from fidelity_mw.testing import FakeClock
from test_bulkhead import Service, concurrency_decisions
from test_deadline_threads import loops_in_threads, statuses_of


@contextmanager
def frequent_thread_switches() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


# ---------------------------------------------------------------- 1. a lock in the limiter


def test_the_limiter_keeps_its_count_and_queue_when_threads_share_it() -> None:
    """Threads admit, hold, queue, give up and release on one limiter the way the bulkhead
    does. Every slot taken (at once, or handed over by a release) is given back, so at the
    end nothing is in flight or waiting, and no thread saw an error (equal arrival numbers
    make the heap compare the tokens)."""
    with frequent_thread_switches():
        for _ in range(30):  # a round that races is likely, not certain: several rounds
            limiter = ConcurrencyLimiter(ConcurrencySpec(limit=1, max_queue=1000))
            errors = _share(limiter, threads=4, rounds=2000)
            assert not errors, repr(errors[0])
            assert limiter.waiting == 0
            assert limiter.in_flight == 0


def _share(limiter: ConcurrencyLimiter, threads: int, rounds: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def worker() -> None:
        held = 0
        try:
            for n in range(rounds):
                if limiter.try_acquire("default", None).admitted:
                    held += 1
                    if held > 1 or n % 3 == 0:  # some slots are held over a turn
                        held -= 1
                        limiter.release()
                    continue
                token = object()
                limiter.enqueue("default", token)
                if not limiter.abandon(token):  # a release handed it a slot meanwhile
                    limiter.release()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            for _ in range(held):
                limiter.release()

    started = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(60)
    return errors


def test_one_bulkhead_served_by_loops_in_threads_loses_no_slot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three loops in three threads serve one middleware whose route admits two at a time
    and queues the rest 2 ms: every request is answered 200 or 503, the middleware never
    fails to decide (it logs that, and decides without state), and once all are done the
    bulkhead holds no slot."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=2, max_queue=1000, queue_timeout_ms=2)
    )
    caplog.set_level(logging.WARNING, logger="fidelity_mw")
    with frequent_thread_switches(), loops_in_threads(3) as loops:
        for _ in range(10):  # a round that races is likely, not certain: several rounds
            mw = FidelityMiddleware(app, policy=policy, telemetry=False)

            async def burst(mw: Any = mw) -> list[int]:
                answers = await asyncio.gather(*(statuses_of(mw, "/w", []) for _ in range(30)))
                return [status for statuses in answers for status in statuses]

            futures = [
                asyncio.run_coroutine_threadsafe(burst(), loop) for loop in loops for _ in range(4)
            ]
            statuses = [status for future in futures for status in future.result(60)]
            assert len(statuses) == 3 * 4 * 30
            assert set(statuses) <= {200, 503}
            assert not [r.getMessage() for r in caplog.records]
            [limiter] = mw.engine.bulkheads.values()
            assert limiter.waiting == 0
            assert limiter.in_flight == 0


# ------------------------------------------------- 2. the deadline of a queued request


async def _queue_behind_one(
    svc: Service, headers: dict[str, str]
) -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
    """The first request holds the only slot; the second (with `headers`) waits for it."""
    first = asyncio.create_task(svc.client.get("/w?hold=1"))
    await svc.in_flight(1)
    queued = asyncio.create_task(svc.client.get("/w", headers=headers))
    limiter = svc.mw.engine.bulkheads["/w"]
    for _ in range(500):
        if limiter.waiting:
            break
        await asyncio.sleep(0)
    assert limiter.waiting == 1
    return first, queued


def _queue_policy(enforce: bool, queue_timeout_ms: int) -> Policy:
    return Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=1, max_queue=1, queue_timeout_ms=queue_timeout_ms),
        routes=(RouteConfig(match="/w", enforce=enforce),),
    )


@pytest.mark.anyio
async def test_a_route_that_only_records_deadlines_serves_a_request_handed_a_slot_late(
    clock: FakeClock,
) -> None:
    """`enforce = false`: the deadline is recorded, never acted on; a queued request
    waits its queue timeout only and is served when a slot comes, however late."""
    svc = Service(_queue_policy(enforce=False, queue_timeout_ms=60_000), clock)
    first, queued = await _queue_behind_one(svc, {"x-request-timeout-ms": "100"})
    clock.advance(1.0)  # past the queued request's deadline
    svc.gate.set()
    assert (await first).status_code == 200
    assert (await queued).status_code == 200
    assert svc.entered == 2
    assert svc.mw.engine.bulkheads["/w"].in_flight == 0


@pytest.mark.anyio
async def test_a_route_that_only_records_deadlines_queues_for_the_queue_timeout(
    clock: FakeClock,
) -> None:
    """With a deadline shorter than the queue timeout, `enforce = false` does not cut the
    wait at the deadline: the request is still waiting once its deadline has passed (in the
    loop's own time), and is served when the slot comes."""
    svc = Service(_queue_policy(enforce=False, queue_timeout_ms=60_000), clock)
    first, queued = await _queue_behind_one(svc, {"x-request-timeout-ms": "1"})
    await asyncio.sleep(0.02)  # the loop's time past the 1 ms deadline
    assert not queued.done()
    svc.gate.set()
    assert (await first).status_code == 200
    assert (await queued).status_code == 200


@pytest.mark.anyio
async def test_a_queued_request_whose_deadline_ends_its_wait_gets_the_deadlines_504(
    clock: FakeClock,
) -> None:
    """Enforced: a deadline shorter than the queue timeout ends the wait, and the answer is
    the deadline's (504, `deadline`, no Retry-After), as for any other expiry."""
    svc = Service(_queue_policy(enforce=True, queue_timeout_ms=60_000), clock)
    first, queued = await _queue_behind_one(svc, {"x-request-timeout-ms": "1"})
    refused = await queued
    assert refused.status_code == 504
    assert refused.headers["x-fidelity-decided-by"] == LAYER_DEADLINE
    assert "retry-after" not in refused.headers
    assert "deadline-expired" in refused.json()["type"]
    ctx = svc.contexts[-1]
    assert ctx.outcome == "expired"
    last = ctx.decisions[-1]
    assert (last.layer, last.verdict, last.reason) == (LAYER_DEADLINE, REJECT, "expired_in_queue")
    assert not concurrency_decisions(ctx)  # the deadline decided, not the bulkhead
    svc.gate.set()
    assert (await first).status_code == 200
    assert svc.entered == 1
    assert svc.mw.engine.bulkheads["/w"].in_flight == 0


@pytest.mark.anyio
async def test_a_queued_request_handed_a_slot_past_its_deadline_gets_504_and_passes_it_on(
    clock: FakeClock,
) -> None:
    svc = Service(_queue_policy(enforce=True, queue_timeout_ms=60_000), clock)
    first, queued = await _queue_behind_one(svc, {"x-request-timeout-ms": "100"})
    clock.advance(1.0)  # past the queued request's deadline
    svc.gate.set()
    assert (await first).status_code == 200
    refused = await queued
    assert refused.status_code == 504
    assert refused.headers["x-fidelity-decided-by"] == LAYER_DEADLINE
    assert svc.entered == 1
    limiter = svc.mw.engine.bulkheads["/w"]
    assert limiter.in_flight == 0
    assert (await svc.client.get("/w")).status_code == 200


@pytest.mark.anyio
async def test_a_queue_timeout_shorter_than_the_deadline_is_still_the_bulkheads_503(
    clock: FakeClock,
) -> None:
    svc = Service(_queue_policy(enforce=True, queue_timeout_ms=1), clock)
    first, queued = await _queue_behind_one(svc, {"x-request-timeout-ms": "60000"})
    refused = await queued
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert concurrency_decisions(svc.contexts[-1])[-1].reason == "queue_timeout"
    svc.gate.set()
    await first


# ------------------------------------------------------------ 3. a late expiry after disarm


@pytest.mark.anyio
async def test_an_expiry_that_arrives_after_the_request_disarmed_cancels_nothing() -> None:
    """The timer of another thread's loop posts `expire`; the request disarmed meanwhile
    (its response started, or the app returned): the late expiry must leave it alone."""
    clock = FakeClock()
    watch = DeadlineWatch(clock.monotonic, clock.call_later)
    engine = Engine(Policy(), clock=clock)
    ctx = DecisionContext(engine, "inbound", "GET", clock.monotonic())

    async def send(message: Any) -> None:
        pass

    watcher = ResponseWatcher.watching(send, ctx, None, None, watch, 10.0, 0.0)
    assert watcher.task is asyncio.current_task()
    watcher.disarm()
    watcher.expire()
    assert not watcher.expired
    await asyncio.sleep(0)  # a cancellation would land here
    assert not watch.inflight


# ------------------------------------------------- 4. a waiter whose event loop is gone


async def _slot_for_a_gone_loop(svc: Service, gone: asyncio.AbstractEventLoop) -> Any:
    """One request holds the only slot; the first waiter is a request of `gone` (queued
    there from another thread), the second a request of this loop."""
    first = asyncio.create_task(svc.client.get("/w?hold=1"))
    await svc.in_flight(1)
    limiter = svc.mw.engine.bulkheads["/w"]
    limiter.enqueue("critical", gone.create_future())  # ahead of any default request
    queued = asyncio.create_task(svc.client.get("/w"))
    for _ in range(500):
        if limiter.waiting == 2:
            break
        await asyncio.sleep(0)
    assert limiter.waiting == 2
    svc.gate.set()
    assert (await first).status_code == 200
    return queued


@pytest.mark.anyio
async def test_a_slot_for_a_waiter_on_a_closed_loop_goes_to_the_next(clock: FakeClock) -> None:
    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=1, max_queue=4, queue_timeout_ms=60_000)
    )
    svc = Service(policy, clock)
    gone = asyncio.new_event_loop()
    try:
        gone.close()
        queued = await asyncio.wait_for(_slot_for_a_gone_loop(svc, gone), 10)
        assert (await asyncio.wait_for(queued, 10)).status_code == 200
    finally:
        gone.close()
    limiter = svc.mw.engine.bulkheads["/w"]
    assert limiter.in_flight == 0
    assert limiter.waiting == 0


@pytest.mark.anyio
async def test_a_loop_that_closes_while_its_waiter_is_woken_loses_no_slot(
    clock: FakeClock,
) -> None:
    """The loop was open when checked and closed before the wake-up reached it:
    `call_soon_threadsafe` raises. The releasing request still ends normally (its
    observer and context reset run) and the slot goes to the next waiter."""
    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=1, max_queue=4, queue_timeout_ms=60_000)
    )
    svc = Service(policy, clock)
    gone = asyncio.new_event_loop()

    def closed_meanwhile(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Event loop is closed")

    gone.call_soon_threadsafe = closed_meanwhile  # type: ignore[method-assign]
    try:
        queued = await asyncio.wait_for(_slot_for_a_gone_loop(svc, gone), 10)
        assert (await asyncio.wait_for(queued, 10)).status_code == 200
    finally:
        gone.close()
    limiter = svc.mw.engine.bulkheads["/w"]
    assert limiter.in_flight == 0
    assert limiter.waiting == 0
