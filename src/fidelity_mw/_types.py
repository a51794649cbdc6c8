"""ASGI aliases and the protocols through which effects (time, sleep, randomness) are injected."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from .decide.specs import RandomSource as RandomSource  # one definition, in the pure core

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Clock(Protocol):
    """Where every layer gets its time from. Tests pass a `FakeClock`."""

    def monotonic(self) -> float:
        """Seconds on a monotonic scale; only differences are meaningful."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch (for HTTP-date values only)."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def sleep_sync(self, seconds: float) -> None: ...
