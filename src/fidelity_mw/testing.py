"""Helpers for tests, this project's and its users': a clock you drive by hand."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import threading
from collections.abc import Callable

from ._types import RandomSource


class FakeClock:
    """Time that moves only when told to. `sleep` advances it instead of waiting.

    Pass it as `clock=` to FidelityMiddleware / FidelityTransport / Engine.
    `sleeps` records every sleep asked for, so tests can assert on backoff.
    """

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self.sleeps: list[float] = []
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._order = itertools.count()
        self._cancelled = 0
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        """Move time on and fire the timers now due, in this thread (thread-safe: a
        test may move time from a helper thread while a server's loop sleeps on it)."""
        if seconds < 0:
            raise ValueError("time does not run backwards")
        lock = self._lock
        with lock:
            self._now += seconds
        while True:
            with lock:
                timers = self._timers
                if not timers or timers[0][0] > self._now:
                    return
                timer = heapq.heappop(timers)[2]
                due = not timer.cancelled
                timer.cancelled = True
            if due:
                timer.callback()

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        """Run `callback` once the clock is advanced `delay` seconds past now (the
        middleware's deadline enforcement schedules through this when present). With
        `delay <= 0` it is due already: called from a running event loop, it runs on
        that loop's next iteration, as `loop.call_later(0, ...)` would; with no loop in
        the calling thread, at the next `advance`."""
        timer = FakeTimer(callback, self)
        with self._lock:
            timers = self._timers
            if len(timers) > 64 and self._cancelled * 2 > len(timers):
                # drop cancelled timers, as asyncio does: a clock that is not advanced
                # would keep every finished request's timer otherwise
                timers[:] = [t for t in timers if not t[2].cancelled]
                heapq.heapify(timers)
                self._cancelled = 0
            heapq.heappush(timers, (self._now + max(0.0, delay), next(self._order), timer))
        if delay <= 0.0:
            # Due already: an event loop's call_later(0) runs it on the loop's next
            # iteration, not whenever a test next moves the clock.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread: the next advance() runs it
                return timer
            loop.call_soon(timer.fire)
        return timer

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)  # still a scheduling point, like a real sleep

    def sleep_sync(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))


class FakeTimer:
    """What `FakeClock.call_later` returns: cancel it before it fires to stop it."""

    __slots__ = ("callback", "cancelled", "clock")

    def __init__(self, callback: Callable[[], None], clock: FakeClock) -> None:
        self.callback = callback
        self.cancelled = False
        self.clock = clock

    def fire(self) -> None:
        """Run the callback unless cancelled or run already (by `advance`)."""
        with self.clock._lock:
            if self.cancelled:
                return
            self.cancelled = True
        self.callback()

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.clock._cancelled += 1


def seeded_random(seed: int = 0) -> RandomSource:
    """A reproducible random source for `rng=` arguments."""
    return random.Random(seed).random


__all__ = ["FakeClock", "seeded_random"]
