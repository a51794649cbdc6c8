"""Arming the deadline finds the request's own task, without a running-loop lookup each time.

`asyncio.get_running_loop()` costs a getpid() system call per call on Python 3.11;
the middleware looks the loop up once per thread and loop, and still finds the right
task when the loop changes (a new loop in the same thread, loops in other threads).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.inbound.watch import ResponseWatcher

Scope = dict[str, Any]


def scope() -> Scope:
    return http_scope(
        "/task", headers=[(b"x-request-timeout-ms", b"5000")], client=("192.0.2.7", 5000)
    )


class TaskCheckingApp:
    """Answers 200 when the send it got was armed with the task running it, else 500."""

    def __init__(self) -> None:
        self.armed = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        watcher = getattr(send, "__self__", send)  # (the watcher's bound method)
        ok = isinstance(watcher, ResponseWatcher) and watcher.task is asyncio.current_task()
        self.armed += ok
        await send({"type": "http.response.start", "status": 200 if ok else 500, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def call(app: Any) -> int:
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope(), receive, send)
    return statuses[0]


def middleware() -> tuple[FidelityMiddleware, TaskCheckingApp]:
    inner = TaskCheckingApp()
    return FidelityMiddleware(inner, policy=Policy(), telemetry=False), inner


@pytest.fixture
def loop_lookups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts running-loop lookups, both asyncio's public name and the one tasks use."""
    counted = [0]
    real = asyncio.events.get_running_loop

    def counting() -> asyncio.AbstractEventLoop:
        counted[0] += 1
        return real()

    monkeypatch.setattr(asyncio, "get_running_loop", counting)
    monkeypatch.setattr(asyncio.events, "get_running_loop", counting)
    return counted


def test_many_requests_on_one_loop_look_the_loop_up_once(loop_lookups: list[int]) -> None:
    mw, inner = middleware()

    async def requests() -> list[int]:
        before = loop_lookups[0]
        statuses = [await call(mw) for _ in range(20)]
        # concurrent ones too: each its own task
        statuses += await asyncio.gather(*(call(mw) for _ in range(20)))
        return [*statuses, loop_lookups[0] - before]

    *statuses, lookups = asyncio.run(requests())
    assert statuses == [200] * 40
    assert inner.armed == 40
    # the app's own asyncio.current_task() looks it up once per request; the middleware
    # at its first arming (and when it sets the deadline timer: one more)
    assert lookups - 40 <= 2


def test_a_new_loop_in_the_same_thread_is_found_again() -> None:
    mw, inner = middleware()
    for _ in range(3):
        loop = asyncio.new_event_loop()
        try:  # the previous loop is stopped (and closed) but still remembered
            assert loop.run_until_complete(call(mw)) == 200
            assert loop.run_until_complete(call(mw)) == 200
        finally:
            loop.close()
    assert inner.armed == 6


def test_a_stopped_loop_that_is_not_closed_is_not_asked() -> None:
    mw, inner = middleware()
    first = asyncio.new_event_loop()
    second = asyncio.new_event_loop()
    try:
        assert first.run_until_complete(call(mw)) == 200
        assert second.run_until_complete(call(mw)) == 200
        assert first.run_until_complete(call(mw)) == 200
    finally:
        first.close()
        second.close()
    assert inner.armed == 3


def test_loops_running_in_two_threads_each_get_their_own_tasks() -> None:
    mw, inner = middleware()
    loops = [asyncio.new_event_loop() for _ in range(2)]
    threads = [threading.Thread(target=loop.run_forever, daemon=True) for loop in loops]
    for thread in threads:
        thread.start()
    try:
        statuses = []
        for i in range(10):  # alternating, and both at once
            loop = loops[i % 2]
            statuses.append(asyncio.run_coroutine_threadsafe(call(mw), loop).result(10))
            both = [asyncio.run_coroutine_threadsafe(call(mw), lp) for lp in loops]
            statuses += [f.result(10) for f in both]
        assert statuses == [200] * 30
        assert inner.armed == 30
    finally:
        for loop in loops:
            loop.call_soon_threadsafe(loop.stop)
        for thread in threads:
            thread.join(10)
        for loop in loops:
            loop.close()


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_a_loop_run_again_in_another_thread_does_not_lend_its_task(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """The loop this thread last armed on, stopped here and now running elsewhere, has a
    current task there: that task is not this request's (cancelling it at the deadline
    would cut another thread's work, from the wrong thread, and leave ours running)."""
    mw, inner = middleware()
    first, second = new_loop(), new_loop()
    in_step = threading.Event()
    release = threading.Event()

    async def busy() -> None:
        in_step.set()
        release.wait(10)  # in the middle of a step: first's current task is this one

    elsewhere = threading.Thread(target=first.run_until_complete, args=(busy(),), daemon=True)
    try:
        assert first.run_until_complete(call(mw)) == 200  # remembered in this thread
        elsewhere.start()
        assert in_step.wait(10)
        assert second.run_until_complete(call(mw)) == 200
        assert inner.armed == 2
    finally:
        release.set()
        elsewhere.join(10)
        first.close()
        second.close()


def test_the_task_lookup_agrees_with_asyncio_current_task() -> None:
    """watch.current_task (one C call on 3.11) answers what asyncio.current_task does."""
    from fidelity_mw.inbound import watch

    async def inside() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        other = asyncio.new_event_loop()
        try:
            mine = watch.current_task(loop)
            return mine is asyncio.current_task() and mine is not None, (
                watch.current_task(other) is None
            )
        finally:
            other.close()

    assert asyncio.run(inside()) == (True, True)
    loop = asyncio.new_event_loop()
    try:
        assert watch.current_task(loop) is None  # not running: no task
    finally:
        loop.close()
