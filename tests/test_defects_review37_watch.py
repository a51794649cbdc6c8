"""A middleware's one timer, shared by event loops in several threads, is touched only by
the thread of the loop it was set on.

One FidelityMiddleware may serve several event loops, each in a thread of its own (its
watches already hand a request of another loop's over with `call_soon_threadsafe`). The
send-stall watch (`StallWatch`) and the deadline watch (`DeadlineWatch`) each keep one
timer, set on the loop of the request that set it last. Setting it again from another
loop's thread (an earlier bound: a route with a shorter `send_stall_timeout_s` or
deadline) cancelled the first loop's handle from that thread: asyncio's `cancel` then
updates the other loop's bookkeeping unlocked, and uvloop's stops a libuv timer from a
foreign thread, which libuv does not allow. Now a handle of another loop is cancelled
in that loop's own thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fidelity_mw.inbound.watch import DeadlineWatch, StallWatch


class RecordingLoop(asyncio.SelectorEventLoop):
    """Says from which threads its timer handles were cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled_from: list[int] = []

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        self.cancelled_from.append(threading.get_ident())
        super()._timer_handle_cancelled(handle)  # type: ignore[misc]


class LoopThread:
    """An event loop running in a thread of its own."""

    def __init__(self) -> None:
        self.loop = RecordingLoop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ident = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.ident = threading.get_ident()
        self.loop.call_soon(self.ready.set)
        self.loop.run_forever()

    def call(self, fn: Callable[[], Any]) -> Any:
        """`fn()` run in the loop's thread, inside the loop (the running loop)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30.0)

    def settle(self) -> None:
        """Every callback queued so far has run."""
        self.call(lambda: None)
        self.call(lambda: None)


@pytest.fixture
def two_loops() -> Iterator[tuple[LoopThread, LoopThread]]:
    threads = (LoopThread(), LoopThread())
    for t in threads:
        t.thread.start()
        assert t.ready.wait(30.0)
    try:
        yield threads
    finally:
        for t in threads:
            if not t.loop.is_closed():
                t.loop.call_soon_threadsafe(t.loop.stop)
                t.thread.join(30.0)
                t.loop.close()


def _pending(loop: asyncio.AbstractEventLoop) -> list[asyncio.TimerHandle]:
    return [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]


def test_the_stall_watch_cancels_another_loops_timer_in_that_loops_thread(
    two_loops: tuple[LoopThread, LoopThread],
) -> None:
    a, b = two_loops
    watch = StallWatch(time.monotonic, None)
    now = time.monotonic()
    a.call(lambda: watch._schedule(now + 100.0))  # a send on loop A: its timer
    assert len(_pending(a.loop)) == 1
    b.call(lambda: watch._schedule(now + 50.0))  # an earlier bound, on loop B
    a.settle()
    # before: cancelled from B's thread
    assert a.loop.cancelled_from == [a.ident]
    assert _pending(a.loop) == []  # cancelled all the same
    assert len(_pending(b.loop)) == 1  # the watch's timer now: B's
    b.call(lambda: watch._schedule(now + 25.0))  # its own loop's: cancelled at once
    assert b.loop.cancelled_from == [b.ident]
    assert len(_pending(b.loop)) == 1


def test_the_deadline_watch_cancels_another_loops_timer_in_that_loops_thread(
    two_loops: tuple[LoopThread, LoopThread],
) -> None:
    a, b = two_loops
    watch = DeadlineWatch(time.monotonic, None)
    now = time.monotonic()
    a.call(lambda: watch._schedule(now + 100.0))  # a request's deadline on loop A
    b.call(lambda: watch._schedule(now + 50.0))  # an earlier one, on loop B
    a.settle()
    assert a.loop.cancelled_from == [a.ident]  # before: B's thread
    assert _pending(a.loop) == []
    assert len(_pending(b.loop)) == 1


def test_a_closed_loops_timer_is_left_alone(two_loops: tuple[LoopThread, LoopThread]) -> None:
    """A loop that is gone: its handle never fires; the watch sets its timer anew."""
    a, b = two_loops
    watch = StallWatch(time.monotonic, None)
    now = time.monotonic()
    a.call(lambda: watch._schedule(now + 100.0))
    a.loop.call_soon_threadsafe(a.loop.stop)
    a.thread.join(30.0)
    a.loop.close()
    b.call(lambda: watch._schedule(now + 50.0))
    assert a.loop.cancelled_from == []
    assert len(_pending(b.loop)) == 1
