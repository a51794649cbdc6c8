"""Helpers for tests, this project's and its users': a clock you drive by hand, and
`fake_time()`, which puts every engine of an app on one for the length of a block."""

from __future__ import annotations

import asyncio
import gc
import heapq
import itertools
import random
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ._types import Clock, RandomSource
from .clock import TESTING


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


class FakeTimeWarning(UserWarning):
    """A middleware built before a `fake_time()` block keeps the clock it was built with."""


@contextmanager
def fake_time(
    clock: FakeClock | None = None,
    *,
    seed: int = 0,
    rng: RandomSource | None = None,
    app: Any = None,
) -> Iterator[FakeClock]:
    """Run an app's fidelity_mw on a fake clock without touching the app's code.

    Inside the block every engine built without its own `clock=` / `rng=` takes
    `clock` (default: a new FakeClock, yielded) and one seeded random source
    (`seeded_random(seed)`, or `rng`): backoffs, `Retry-After` waits and breaker
    open times are recorded in `clock.sleeps` and skipped, never slept, and limit
    windows move only with `clock.advance(...)`. A Redis store's background work runs
    on the clock's timers and waits for `advance` too (its deferred breaker successes,
    and its probe while Redis is unreachable: the next runs once the clock moves by the
    probe's interval, at most 0.5 s). That covers

    - a `FidelityMiddleware` added at import time: Starlette builds the stack at the
      first request or lifespan startup, so a stack first built in the block is on
      the clock. Pass `app=` (a Starlette or FastAPI app) to have its stack rebuilt
      in the block, with fresh limits and breakers, and again after it: the form for
      an app imported once and used by many tests;
    - a `FidelityTransport()` built at import time: inside a request it uses the
      middleware's engine (above); outside one, its own engine. That engine, and any
      other built before the block that no middleware holds (a `Fidelity()` forms'
      own, one of yours), is put on the clock for the block with a fresh in-memory
      state, and given back its clock and state when the block ends.

    A middleware already built before the block (its stack not rebuilt with `app=`)
    keeps the clock it was built with, the system clock or an earlier block's:
    entering a block without `app=` while such a middleware is alive warns
    (`FakeTimeWarning`) once, with the count. With `app=` the other apps' stacks
    are yours to rebuild (or leave: they are not warned about). Engines given
    `clock=` or `engine=` explicitly are left as they are. A Redis-backed state
    decides on the Redis server's clock: keep tests on `memory://`.
    """
    clock = clock if clock is not None else FakeClock()
    source = rng if rng is not None else seeded_random(seed)
    reset = _stack_resetter(app)
    reset()
    previous = TESTING.current
    TESTING.current = (clock, source)
    swapped = _take_over(clock, source, warn=app is None)
    _BLOCKS.append((clock, source, swapped))
    try:
        yield clock
    finally:
        _BLOCKS.pop()
        for engine, (old_clock, old_rng, old_store) in swapped:
            engine.clock, engine.rng, engine.store = old_clock, old_rng, old_store
        TESTING.current = previous
        reset()


_Saved = tuple[Clock, RandomSource, Any]
# The open fake_time() blocks, outermost first: each one's clock, random source and the
# engines it put on them (to give back their clock and state when it ends).
_BLOCKS: list[tuple[FakeClock, RandomSource, list[tuple[Any, _Saved]]]] = []


def adopt_engine(engine: Any) -> None:
    """An engine built in a block that stands for one made before it (the engine a
    `Fidelity()` made at import builds at its first request): each open block takes it
    over as if it had been there when the block began, and gives back its clock and
    state when it ends. Built on the block's clock, it kept that clock, stopped, and the
    block's state for the rest of the process (a limit that never refilled)."""
    for clock, source, swapped in _BLOCKS:
        saved = _swap(engine, clock, source)
        if saved is not None:
            swapped.append((engine, saved))


def _stack_resetter(app: Any) -> Callable[[], None]:
    """Drops a Starlette app's built middleware stack: the next request or lifespan
    builds it again from `app.user_middleware` (what Starlette does on the first)."""
    if app is None:
        return lambda: None
    if not hasattr(app, "middleware_stack") or not hasattr(app, "user_middleware"):
        raise TypeError(
            f"fake_time(app=...) takes a Starlette or FastAPI app, got {type(app).__name__}"
        )

    def reset() -> None:
        app.middleware_stack = None
        # A mounted app builds a stack of its own at its first request: a middleware on
        # it (`v2.add_middleware(FidelityMiddleware, ...)`) kept the clock and the state
        # of the stack built before the block, silently (no FakeTimeWarning with app=).
        for sub in _mounted_apps(app):
            sub.middleware_stack = None

    return reset


def _mounted_apps(app: Any, depth: int = 0) -> list[Any]:
    """The Starlette apps mounted under `app` (`Mount`, `Host`), at any depth."""
    found: list[Any] = []
    if depth > 16:
        return found
    for route in getattr(app, "routes", None) or ():
        if not hasattr(route, "routes"):
            continue  # not a Mount or a Host
        sub = getattr(route, "app", None)
        if hasattr(sub, "middleware_stack") and hasattr(sub, "user_middleware"):
            found.append(sub)
        found += _mounted_apps(sub, depth + 1)
    return found


def _take_over(clock: FakeClock, rng: RandomSource, warn: bool) -> list[tuple[Any, _Saved]]:
    """Put the engines built before the block that no middleware holds (a transport's
    own, the forms') on `clock`, their state swapped for a fresh one: they read the
    clock and the store through the engine at every call. Warn (`warn`: no app=
    named) about middleware engines, which cannot be: a middleware keeps what it
    read of its engine when it was built."""
    swapped: list[tuple[Any, _Saved]] = []
    stale = _stale_middleware(clock) if warn else 0
    if stale:
        gc.collect()  # stacks of apps gone (a test's own app) are not worth a warning
        stale = _stale_middleware(clock)
    for engine in list(TESTING.defaulted):
        saved = _swap(engine, clock, rng)
        if saved is not None:
            swapped.append((engine, saved))
    if stale:
        warnings.warn(
            f"fake_time(): {stale} FidelityMiddleware built before this block keep their "
            "clock (the system clock or an earlier block's); a request through one is not "
            "on this block's clock. Pass fake_time(app=app) to rebuild the app's stack "
            "in the block, or build the app inside it.",
            FakeTimeWarning,
            stacklevel=4,  # the `with` line: this, fake_time, contextlib's __enter__
        )
    return swapped


def _swap(engine: Any, clock: FakeClock, rng: RandomSource) -> _Saved | None:
    """Put an engine that took its clock by default, and that no middleware holds, on
    `clock` with a fresh in-memory state; what it had, or None when it is left alone."""
    from .state.factory import store_from_policy

    if engine not in TESTING.defaulted or engine.clock is clock or engine.route_app is not None:
        return None
    if not engine.policy.state.url.startswith("memory://"):
        return None
    saved: _Saved = (engine.clock, engine.rng, engine.store)
    engine.clock, engine.rng = clock, rng
    engine.store = store_from_policy(engine.policy, rng, clock)
    return saved


def _stale_middleware(clock: FakeClock) -> int:
    return sum(
        1
        for engine in list(TESTING.defaulted)
        if engine.route_app is not None and engine.clock is not clock
    )


__all__ = ["FakeClock", "FakeTimeWarning", "fake_time", "seeded_random"]
