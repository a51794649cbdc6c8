"""The contract every state store keeps: atomic decisions that report their provenance."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import NamedTuple

from ..breaker import Gate
from ..policy import BreakerConfig
from ..ratelimit import LimitVerdict


class LimitSpec(NamedTuple):
    """One rate limit as the store sees it: arithmetic only, no policy objects."""

    name: str
    interval_s: float
    tolerance_s: float
    cost: int
    shadow: bool


class InboundResult(NamedTuple):
    """The answer to `admit`: the breaker gate, each limit's verdict, and provenance."""

    gate: Gate | None  # None when the route has no breaker
    limits: tuple[LimitVerdict, ...]  # same order as the specs; () when the breaker shed
    admitted: bool
    source: str  # memory | redis | cache | fallback
    age_s: float  # how old the state behind this decision was


class StateStore(abc.ABC):
    """Atomic breaker and limiter operations.

    `admit` decides the route breaker and every rate limit of one request in
    one step: limits are committed only if the breaker admits and every
    enforced limit allows (a rejection consumes no quota anywhere), and a
    probe slot taken by the gate is given back when a limit rejects.
    """

    source: str = "memory"

    @abc.abstractmethod
    async def admit(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
    ) -> InboundResult: ...

    @abc.abstractmethod
    async def record(
        self,
        breaker_key: str,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        slow: bool,
        now: float,
    ) -> str:
        """Report how an admitted call ended. Returns the breaker state afterwards."""

    @abc.abstractmethod
    async def breaker_gate(
        self, breaker_key: str, breaker: BreakerConfig, now: float
    ) -> tuple[Gate, str, float]:
        """Gate one call on a breaker alone (outbound). Returns (gate, source, age_s)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections. The memory store holds none."""
