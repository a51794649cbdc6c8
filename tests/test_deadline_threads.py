"""Deadline enforcement when the clock's timers fire in another thread.

A FakeClock fires its timers in whichever thread advances it (a test's helper
thread that moves time while a server runs: tests/test_faults_upstream.py). The
expiry cancels the request's task, which only the event loop's own thread may do:
from another thread the loop is not even woken up, and the request hangs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from _asgi import http_scope
from fidelity_mw import DeadlineConfig, FidelityMiddleware, Policy
from fidelity_mw.policy import ConcurrencyConfig
from fidelity_mw.testing import FakeClock


def scope() -> dict[str, Any]:
    return http_scope("/parked", client=("192.0.2.1", 5000))


async def statuses_of(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> list[int]:
    """The response statuses `app` sends for one GET of `path`."""
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    here = {**scope(), "path": path, "raw_path": path.encode(), "headers": headers}
    await app(here, receive, send)
    return statuses


@contextmanager
def loops_in_threads(count: int) -> Iterator[list[asyncio.AbstractEventLoop]]:
    """`count` event loops, each running in a thread of its own until the block ends."""
    loops = [asyncio.new_event_loop() for _ in range(count)]
    threads = [threading.Thread(target=loop.run_forever, daemon=True) for loop in loops]
    for thread in threads:
        thread.start()
    try:
        yield loops
    finally:
        for loop in loops:
            loop.call_soon_threadsafe(loop.stop)
        for thread in threads:
            thread.join(10)
        for loop in loops:
            loop.close()


def test_a_clock_advanced_from_another_thread_expires_the_request_on_its_loop() -> None:
    clock = FakeClock()
    started = threading.Event()
    done = threading.Event()
    release: list[asyncio.Event] = []
    statuses: list[int] = []

    async def parked(scope: Any, receive: Any, send: Any) -> None:
        event = asyncio.Event()
        release.append(event)
        started.set()
        await event.wait()  # nothing else is scheduled on the loop meanwhile
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    policy = Policy(deadline=DeadlineConfig(default_ms=1000))
    app = FidelityMiddleware(parked, policy=policy, clock=clock, telemetry=False)
    loop = asyncio.new_event_loop()

    async def request() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope(), receive, send)

    def serve() -> None:
        try:
            loop.run_until_complete(request())
        finally:
            done.set()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        assert started.wait(10.0)
        clock.advance(5.0)  # from this thread: past the request's deadline
        expired = done.wait(10.0)
        assert expired, "the expiry never reached the event loop: the request hangs"
        assert statuses == [504]
    finally:
        if not done.is_set():
            loop.call_soon_threadsafe(release[0].set)
            done.wait(10.0)
        server.join(10.0)
        loop.close()


def test_a_deadline_timer_of_one_loop_expires_a_request_of_another_on_its_own_loop() -> None:
    """One middleware, two event loops in two threads: the deadline timer lives on the
    loop that set it, and expires every request past its deadline, others' too. A
    request of the other loop is cancelled on its own loop (from this thread, its loop
    is not even woken up, and the request hangs)."""
    entered = {"/a": threading.Event(), "/b": threading.Event()}

    async def parked(scope: Any, receive: Any, send: Any) -> None:
        entered[scope["path"]].set()
        await asyncio.Event().wait()  # only the deadline ends it

    app = FidelityMiddleware(parked, policy=Policy(), telemetry=False)

    def request(path: str, deadline_ms: int) -> Any:
        return statuses_of(app, path, [(b"x-request-timeout-ms", str(deadline_ms).encode())])

    with loops_in_threads(2) as loops:
        # the first loop's timer is set for its own request; the second request's
        # deadline is later, so no timer of its loop is set for it
        first = asyncio.run_coroutine_threadsafe(request("/a", 40), loops[0])
        assert entered["/a"].wait(10)
        second = asyncio.run_coroutine_threadsafe(request("/b", 80), loops[1])
        assert entered["/b"].wait(10)
        assert first.result(10) == [504]
        assert second.result(10) == [504], "the other loop never ran the cancellation"


def test_a_bulkhead_slot_freed_on_one_loop_reaches_a_request_queued_on_another() -> None:
    """The route's bulkhead is one per route, whichever loop serves the request: a slot
    released in one thread is handed to a request queued on another thread's loop, which
    is woken up for it (else it sat out its whole queue timeout and was refused 503)."""
    release: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    entered = threading.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/hold":
            event = asyncio.Event()
            release.append((asyncio.get_running_loop(), event))
            entered.set()
            await event.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=1, max_queue=1, queue_timeout_ms=10_000)
    )
    mw = FidelityMiddleware(app, policy=policy, telemetry=False)

    def request(path: str) -> Any:
        return statuses_of(mw, path, [])

    with loops_in_threads(2) as loops:
        held = asyncio.run_coroutine_threadsafe(request("/hold"), loops[0])
        assert entered.wait(10)
        queued = asyncio.run_coroutine_threadsafe(request("/next"), loops[1])
        (limiter,) = mw.engine.bulkheads.values()
        for _ in range(1000):  # until it waits in the queue
            if limiter.waiting == 1:
                break
            threading.Event().wait(0.001)
        assert limiter.waiting == 1
        loop, event = release[0]
        loop.call_soon_threadsafe(event.set)
        assert held.result(10) == [200]
        assert queued.result(5) == [200], "the queued request never got the slot"
