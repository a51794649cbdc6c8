"""The real clock. The fake one for tests lives in `fidelity_mw.testing`."""

from __future__ import annotations

import asyncio
import time

from ._types import Clock


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
