"""Helpers for tests, this project's and its users': a clock you drive by hand."""

from __future__ import annotations

import asyncio
import random

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

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not run backwards")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)  # still a scheduling point, like a real sleep

    def sleep_sync(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))


def seeded_random(seed: int = 0) -> RandomSource:
    """A reproducible random source for `rng=` arguments."""
    return random.Random(seed).random


__all__ = ["FakeClock", "seeded_random"]
