"""Review 46: a FakeClock advanced in another thread (a test beside Starlette's TestClient,
whose app runs on a loop in a thread of its own, or beside a server) did not end a queued
request's wait: its timer set the wait's future from the test's thread, which queued the
wake-up on a loop asleep in its selector. docs/inbound.md ("The queue on a test clock")
and `FakeClock.advance` promise the wait ends when the clock is advanced past it.
Measured through TestClient before the fix: a 20 s queue timeout the test advanced past
answered 19.7 s after the advance; now at once.

The loop runs in debug mode: there a call from the wrong thread raises at once, so the
old code fails here deterministically, without waiting for anything."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.policy import ConcurrencyConfig
from fidelity_mw.testing import FakeClock

# A bound on the answer the fixed code gives at once (a loaded box), not a measured wait:
# before the fix the answer came only at the queue timeout, in the loop's own time.
_SLACK_S = 30.0


@pytest.fixture
def loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    loop.set_debug(True)  # a non-thread-safe call from another thread raises
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_SLACK_S)
        loop.close()


def test_advancing_the_clock_in_another_thread_ends_a_queued_wait(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    clock = FakeClock()
    release = asyncio.Event()  # (bound to the loop at its first wait, in its thread)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["query_string"] == b"hold=1":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    policy = Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=1, max_queue=1, queue_timeout_ms=20_000),
    )
    mw = FidelityMiddleware(app, policy=policy, clock=clock, telemetry=False)

    async def request(query: bytes) -> int:
        statuses: list[int] = []
        quiet = asyncio.Event()  # the client stays: a read after the body waits

        async def receive() -> dict[str, Any]:
            if statuses or quiet.is_set():
                await asyncio.Event().wait()
            quiet.set()
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await mw(http_scope("/w", query_string=query), receive, send)
        return statuses[0]

    held = asyncio.run_coroutine_threadsafe(request(b"hold=1"), loop_thread)

    async def in_flight() -> tuple[int, int]:
        # (one route: a bare ASGI app has no router to name it)
        limiters = list(mw.engine.bulkheads.values())
        return (0, 0) if not limiters else (limiters[0].in_flight, limiters[0].waiting)

    def state() -> tuple[int, int]:
        return asyncio.run_coroutine_threadsafe(in_flight(), loop_thread).result(_SLACK_S)

    for _ in range(10_000):
        if state() == (1, 0):
            break
    queued = asyncio.run_coroutine_threadsafe(request(b""), loop_thread)
    for _ in range(10_000):
        if state() == (1, 1):
            break
    assert state() == (1, 1)
    clock.advance(25.0)  # past the queue timeout, from this thread (old code: RuntimeError)
    assert queued.result(_SLACK_S) == 503  # the queue timeout's shed
    assert state() == (1, 0)
    loop_thread.call_soon_threadsafe(release.set)
    assert held.result(_SLACK_S) == 200
    assert state() == (0, 0)
