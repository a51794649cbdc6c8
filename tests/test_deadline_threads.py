"""Deadline enforcement when the clock's timers fire in another thread.

A FakeClock fires its timers in whichever thread advances it (a test's helper
thread that moves time while a server runs: tests/test_faults_upstream.py). The
expiry cancels the request's task, which only the event loop's own thread may do:
from another thread the loop is not even woken up, and the request hangs.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from fidelity_mw import DeadlineConfig, FidelityMiddleware, Policy
from fidelity_mw.testing import FakeClock


def scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/parked",
        "raw_path": b"/parked",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": ("192.0.2.1", 5000),
        "server": ("testserver", 80),
    }


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
