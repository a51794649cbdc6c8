"""Review 46 (rsk46), the bulkhead's queue and its loop clock.

- A queued request whose slot and its client's disconnect came in the same wake-up
  took the slot (the slot was looked at first) and ran the app for a client that was
  gone; now it gives the slot to the next waiter and is shed `client_gone`.
- The loop clock's heartbeat (`shed_stale`) stopped `IDLE_S` after the last request
  by its time source: on a FakeClock that is not advanced it never went idle and
  ticked every ms until the loop closed (a user's fake-clock test burned CPU).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.context import LAYER_CONCURRENCY
from fidelity_mw.inbound.bulkhead import LoopClock, loop_clock
from fidelity_mw.policy import ConcurrencyConfig
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


async def test_a_slot_and_a_disconnect_in_one_wake_up_do_not_run_the_app(
    clock: FakeClock,
) -> None:
    release = asyncio.Event()
    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["query_string"].decode())
        if scope["query_string"] == b"hold":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=1, max_queue=2, queue_timeout_ms=60_000)
    )
    mw = FidelityMiddleware(app, policy=policy, clock=clock, telemetry=False)

    def call(query: bytes, left: asyncio.Event) -> tuple[Any, list[Any], dict[str, Any]]:
        sent: list[Any] = []
        scope = http_scope("/w", query_string=query, server=("svc", 80))
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            sent.append(message)

        return mw(scope, receive, send), sent, scope

    held_task = asyncio.ensure_future(call(b"hold", asyncio.Event())[0])
    for _ in range(100):
        await asyncio.sleep(0)
    leaves = asyncio.Event()
    queued, queued_sent, queued_scope = call(b"gone", leaves)
    queued_task = asyncio.ensure_future(queued)
    [limiter] = mw.engine.bulkheads.values()
    for _ in range(100):
        await asyncio.sleep(0)
    assert limiter.waiting == 1
    # the held request ends (its slot handed to the queued one) as the queued one's
    # client leaves: both wake the waiting request at once
    leaves.set()
    release.set()
    await held_task
    await queued_task
    assert ran == ["hold"]  # old: ["hold", "gone"], the app ran for nobody
    assert queued_sent == []
    ctx = queued_scope["state"]["fidelity"]
    (decision,) = [d for d in ctx.decisions if d.layer == LAYER_CONCURRENCY]
    assert (decision.verdict, decision.reason) == ("shed", "client_gone")
    assert (limiter.in_flight, limiter.waiting) == (0, 0)


async def test_the_loop_clocks_heartbeat_goes_idle_on_a_clock_that_does_not_move() -> None:
    clock = FakeClock()
    heart = loop_clock(clock.monotonic)
    assert heart.waited(clock.monotonic()) is None  # starts the heartbeat
    # (a 1 ms sleep each, a tick or more each: at most ~2 s of the real clock, never
    # one long sleep)
    slept = 0
    while heart._handle is not None and slept < 2000:
        await asyncio.sleep(0.001)
        slept += 1
    # old: still ticking after 2000 sleeps, every tick with the clock at 0
    assert heart._handle is None
    assert slept < 10 * LoopClock.IDLE_TICKS  # (ticks about 1 a sleep; slack for a busy loop)
    # a request after it starts it again, and its bound is known after a tick
    assert heart.waited(clock.monotonic()) is None
    for _ in range(100):
        await asyncio.sleep(0.001)
        if heart.last is not None:
            break
    assert heart.waited(clock.monotonic()) is not None
