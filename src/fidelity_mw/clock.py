"""The real clock. The fake one for tests lives in `fidelity_mw.testing`."""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any, Final

from ._types import Clock, RandomSource


class SystemClock:
    """Monotonic time for decisions, wall time only where HTTP needs a date."""

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time_ns() / 1e9

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def sleep_sync(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


SYSTEM_CLOCK: Clock = SystemClock()


class TestingDefaults:
    """What an engine built without `clock=` / `rng=` takes while a test's
    `fidelity_mw.testing.fake_time()` block is open (`current`; None: the system clock
    and a fresh random source), and the engines that took their clock by default
    (`defaulted`, weakly), so a block can find those built before it. Read once per
    engine built, never per request."""

    current: tuple[Clock, RandomSource] | None = None
    defaulted: weakref.WeakSet[Any] = weakref.WeakSet()


TESTING: Final = TestingDefaults()
