"""What the decision code reads from its configuration, and small frozen values that provide it.

Each `*Params` protocol lists the read-only attributes one algorithm needs.
The policy's config objects (`BreakerConfig`, `RetryConfig`) satisfy them as
they are, so the stores pass those through without a conversion on the hot
path; the frozen `*Spec` classes satisfy them too, for code and tests that
want the arithmetic without a policy.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from .gcra import LimitSpec as LimitSpec  # (compiled with gcra: a native class)

# A source of uniform floats in [0, 1). `random.Random(seed).random` fits.
RandomSource = Callable[[], float]


class BreakerParams(Protocol):
    @property
    def failure_ratio(self) -> float: ...
    @property
    def min_calls(self) -> int: ...
    @property
    def window_s(self) -> float: ...
    @property
    def open_s(self) -> float: ...
    @property
    def open_min_s(self) -> float: ...
    @property
    def open_jitter(self) -> float: ...
    @property
    def half_open_probes(self) -> int: ...
    @property
    def probe_lease_s(self) -> float: ...
    @property
    def slow_call_ratio(self) -> float | None: ...
    @property
    def consecutive_failures(self) -> int | None: ...


class BudgetParams(Protocol):
    @property
    def budget_ratio(self) -> float: ...
    @property
    def budget_min_per_s(self) -> float: ...
    @property
    def budget_window_s(self) -> float: ...


class RetryParams(BudgetParams, Protocol):
    @property
    def attempts(self) -> int: ...
    @property
    def base_ms(self) -> int: ...
    @property
    def max_ms(self) -> int: ...
    @property
    def jitter(self) -> str: ...
    @property
    def retry_after_max_s(self) -> float: ...
    @property
    def on_status(self) -> Collection[int]: ...
    @property
    def on_connect_error(self) -> bool: ...
    @property
    def on_read_timeout(self) -> bool: ...
    @property
    def on_429(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class BreakerSpec:
    """A breaker's parameters (defaults as the policy's)."""

    failure_ratio: float = 0.5
    min_calls: int = 20
    window_s: float = 30.0
    open_s: float = 5.0
    open_min_s: float = 0.5
    open_jitter: float = 0.2
    half_open_probes: int = 3
    probe_lease_s: float = 30.0
    slow_call_ratio: float | None = None
    consecutive_failures: int | None = None


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """A retry budget: retries <= ratio x requests + min_per_s x window, over the window."""

    budget_ratio: float = 0.2
    budget_min_per_s: float = 3.0
    budget_window_s: float = 10.0


@dataclass(frozen=True, slots=True)
class RetrySpec:
    """Retry planning parameters (defaults as the policy's), budget included."""

    attempts: int = 3
    base_ms: int = 100
    max_ms: int = 2_000
    jitter: str = "full"
    retry_after_max_s: float = 30.0
    on_status: Collection[int] = (502, 503, 504)
    on_connect_error: bool = True
    on_read_timeout: bool = True
    on_429: bool = True
    budget_ratio: float = 0.2
    budget_min_per_s: float = 3.0
    budget_window_s: float = 10.0
